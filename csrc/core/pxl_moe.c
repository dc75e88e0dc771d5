/* Sparse mixture of experts (the MoE op): routing, then each expert's SwiGLU MLP over the
 * tokens routed to it, so every expert's weights are read once per call (not once per token),
 * and the weighted sum per token.
 *
 * Team code, in phases separated by barriers: route (threads split the tokens), sort the
 * (token, expert) assignments by expert (one thread: T * top_k is small), gather each
 * expert's rows of x, then for each expert in turn the team runs its gate and up Linears on
 * those rows (pxl_linear's own team code: any weight format, packed or not), SiLU-mul, the
 * down Linear, and finally each thread sums its tokens' expert outputs in ascending expert
 * order (HF's MixtralExperts order). Large steps run in chunks of tokens to bound the scratch.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "pxl_kernels.h"

/* assignments (token, expert) per chunk: bounds the scratch at CHUNK_ROWS * (D + 2F) values */
#define CHUNK_ROWS 2048
#define MOE_SCRATCH 4 /* pxl_scratch slot (0-3 are pxl_linear's) */

PXL_INLINE float ld(int dt, const void *p, size_t i) {
    return dt == PXL_F32 ? ((const float *)p)[i] : pxl_bf16_to_f32(((const uint16_t *)p)[i]);
}
PXL_INLINE float rnd(int dt, float v) { return dt == PXL_F32 ? v : pxl_round_bf16(v); }

/* one expert's weights in format fmt: (N, K) as pxl_linear reads it, experts back to back */
static size_t expert_bytes(int fmt, size_t N, size_t K) {
    switch (fmt) {
    case PXL_F32P: return (N + PXL_PANEL - 1) / PXL_PANEL * PXL_PANEL * K * 4;
    case PXL_BF16P: return (N + PXL_PANEL - 1) / PXL_PANEL * PXL_PANEL * K * 2;
    case PXL_Q8_0R: case PXL_Q4_0R: case PXL_Q4_1R: case PXL_Q4_KR: case PXL_Q5_KR: case PXL_Q6_KR:
        return (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * PXL_QR_ROWS * pxl_row_bytes(fmt, K);
    default: return N * pxl_row_bytes(fmt, K);
    }
}

/* token t's top_k experts by router logit (ties: the lower index), their softmax probabilities
 * over all E experts in float32, renormalised to sum 1 when norm */
static void route(int dt, size_t E, size_t k, int norm, const void *logits, size_t t, int32_t *ids, float *w) {
    float mx = -INFINITY;
    for (size_t e = 0; e < E; e++) mx = fmaxf(mx, ld(dt, logits, t * E + e));
    float total = 0;
    for (size_t e = 0; e < E; e++) total += pxl_exp(ld(dt, logits, t * E + e) - mx);
    for (size_t j = 0; j < k; j++) ids[j] = -1;
    for (size_t e = 0; e < E; e++) { /* insertion into the sorted top k */
        float v = ld(dt, logits, t * E + e);
        size_t j = k;
        while (j > 0 && (ids[j - 1] < 0 || v > ld(dt, logits, t * E + (size_t)ids[j - 1]))) j--;
        if (j == k) continue;
        for (size_t i = k - 1; i > j; i--) ids[i] = ids[i - 1];
        ids[j] = (int32_t)e;
    }
    float sum = 0;
    for (size_t j = 0; j < k; j++) sum += w[j] = pxl_exp(ld(dt, logits, t * E + (size_t)ids[j]) - mx) / total;
    if (norm)
        for (size_t j = 0; j < k; j++) w[j] /= sum;
}

typedef struct {
    int dt, fg, fu, fd;
    size_t D, F, E, k;
    int norm;
    const void *x, *logits, *Wg, *Wu, *Wd, *shared, *sgate;
    void *y;
} moe_args;

/* tokens [t0, t1): one pass of the phases above over their n = (t1 - t0) * k assignments */
static void moe_chunk(const moe_args *a, size_t t0, size_t t1, char *arena) {
    const int dt = a->dt;
    const size_t es = dt == PXL_F32 ? 4 : 2, k = a->k, D = a->D, F = a->F, E = a->E, n = (t1 - t0) * k;
    int32_t *ids = (int32_t *)arena;         /* (n,) expert of assignment t * k + j */
    float *w = (float *)(ids + n);           /* (n,) its weight */
    int32_t *row = (int32_t *)(w + n);       /* (n,) its row in the expert-sorted order */
    int32_t *tok = row + n;                  /* (n,) sorted row -> token (chunk-relative) */
    size_t *start = (size_t *)(((uintptr_t)(tok + n) + 63) & ~(uintptr_t)63); /* (E+1,) first row per expert */
    char *xg = (char *)(((uintptr_t)(start + E + 1) + 63) & ~(uintptr_t)63); /* (n, D): x rows, then outputs */
    char *g = xg + n * D * es, *u = g + n * F * es;                          /* (n, F) each */

    size_t i0, i1;
    pxl_split(t1 - t0, 1, &i0, &i1);
    for (size_t t = i0; t < i1; t++) route(dt, E, k, a->norm, a->logits, t0 + t, ids + t * k, w + t * k);
#pragma omp barrier
#pragma omp single
    { /* counting sort of the assignments by expert, tokens ascending within an expert */
        memset(start, 0, (E + 1) * sizeof *start);
        for (size_t i = 0; i < n; i++) start[ids[i] + 1]++;
        for (size_t e = 0; e < E; e++) start[e + 1] += start[e];
        for (size_t i = 0; i < n; i++) {
            size_t r = start[ids[i]]++;
            row[i] = (int32_t)r, tok[r] = (int32_t)(i / k);
        }
        for (size_t e = E; e > 0; e--) start[e] = start[e - 1];
        start[0] = 0;
    } /* (implicit barrier) */
    pxl_split(n, 1, &i0, &i1);
    for (size_t r = i0; r < i1; r++) memcpy(xg + r * D * es, (const char *)a->x + (t0 + tok[r]) * D * es, D * es);
#pragma omp barrier
    /* the team on one expert at a time: its gate and up Linears, SiLU-mul, then its down Linear
     * into the rows its x came from (free by then) */
    for (size_t e = 0; e < E; e++) {
        size_t r0 = start[e], m = start[e + 1] - r0;
        if (!m) continue;
        pxl_linear(dt, a->fg, m, F, D, xg + r0 * D * es, (const char *)a->Wg + e * expert_bytes(a->fg, F, D), NULL,
                   g + r0 * F * es);
#pragma omp barrier /* (a Linear of more than PXL_T_PRIVATE rows shares its prepared x: not reused while read) */
        pxl_linear(dt, a->fu, m, F, D, xg + r0 * D * es, (const char *)a->Wu + e * expert_bytes(a->fu, F, D), NULL,
                   u + r0 * F * es);
#pragma omp barrier
        pxl_silu_mul(dt, m * F, g + r0 * F * es, u + r0 * F * es, g + r0 * F * es);
#pragma omp barrier
        pxl_linear(dt, a->fd, m, D, F, g + r0 * F * es, (const char *)a->Wd + e * expert_bytes(a->fd, D, F), NULL,
                   xg + r0 * D * es);
#pragma omp barrier
    }
    /* each token: its experts' outputs times their weights, summed in ascending expert order,
     * rounded to dt after every product and sum (as torch's index_add_ in dt), then the shared expert */
    pxl_split(t1 - t0, 1, &i0, &i1);
    for (size_t t = i0; t < i1; t++) {
        int32_t order[64]; /* this token's assignments by expert (k <= 64: checked by pxl_moe) */
        for (size_t j = 0; j < k; j++) {
            size_t i = j;
            while (i > 0 && ids[t * k + (size_t)order[i - 1]] > ids[t * k + j]) order[i] = order[i - 1], i--;
            order[i] = (int32_t)j;
        }
        float gate = 0;
        if (a->shared) gate = rnd(dt, 1.0f / (1.0f + pxl_exp(-ld(dt, a->sgate, t0 + t))));
        for (size_t d = 0; d < D; d++) {
            float acc = 0;
            for (size_t j = 0; j < k; j++) {
                size_t i = t * k + (size_t)order[j];
                acc = rnd(dt, acc + rnd(dt, ld(dt, xg, (size_t)row[i] * D + d) * w[i]));
            }
            if (a->shared) acc = rnd(dt, acc + rnd(dt, gate * ld(dt, a->shared, (t0 + t) * D + d)));
            if (dt == PXL_F32) ((float *)a->y)[(t0 + t) * D + d] = acc;
            else ((uint16_t *)a->y)[(t0 + t) * D + d] = pxl_f32_to_bf16(acc);
        }
    }
}

static void moe_team(const moe_args *a, size_t T) {
    const size_t es = a->dt == PXL_F32 ? 4 : 2, per = CHUNK_ROWS / a->k ? CHUNK_ROWS / a->k : 1;
    for (size_t t0 = 0; t0 < T; t0 += per) {
        size_t t1 = t0 + per < T ? t0 + per : T, n = (t1 - t0) * a->k;
        char *arena;
        if (t0) {
#pragma omp barrier /* the last chunk's outputs are written before its scratch is reused */
        }
#pragma omp single copyprivate(arena)
        arena = pxl_scratch(MOE_SCRATCH, 4 * n * 4 + (a->E + 1) * sizeof(size_t) + 128 +
                                             n * (a->D + 2 * a->F) * es);
        moe_chunk(a, t0, t1, arena);
    }
}

void pxl_moe(int dt, int fmt_gate, int fmt_up, int fmt_down, size_t T, size_t D, size_t F, size_t E, size_t top_k,
             int norm_topk_prob, const void *x, const void *logits, const void *Wg, const void *Wu, const void *Wd,
             const void *shared, const void *shared_gate, void *y) {
    if (top_k < 1 || top_k > 64 || top_k > E) { /* a caller's bug: the exporter and plugin check it */
        fprintf(stderr, "pxl_moe: top_k %zu must be in [1, min(64, E = %zu)]\n", top_k, E);
        abort();
    }
    const moe_args a = {dt, fmt_gate, fmt_up, fmt_down, D, F, E, top_k, norm_topk_prob, x, logits, Wg, Wu, Wd,
                        shared, shared_gate, y};
    int nth = pxl_num_threads();
    PXL_ON_TEAM(nth, moe_team(&a, T));
}
