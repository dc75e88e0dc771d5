/* LoRA (the LoRA op): each token's row of a Linear's output plus its adapter's low-rank
 * product, y[t] = y_in[t] + scale[l] * (x[t] A[l]^T) B[l]^T with l = ids[t] (-1: no adapter),
 * so requests with different adapters, and none, share one step without merging weights.
 *
 * Team code, as the MoE op: counting-sort the tokens by adapter slot (one thread), gather
 * each slot's rows of x widened to float32, then for each slot in use the team runs the two
 * small Linears (x A^T: (m, R); times scale; then B: (m, N)) with pxl_linear's own team code,
 * and each thread adds its tokens' products into y, rounding once to dt. A and B are float32
 * whatever the model's dtype: they are small, and the product is then exact to float32.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pxl_kernels.h"

/* The MoE op's scratch slot: LoRA and MoE both call Linear (slots 0-3) but never each other. */
#define LORA_SCRATCH 4
#define PXL_LORA_MAX_SLOTS 256

typedef struct {
    int dt;
    size_t T, N, K, R, L;
    const void *x, *y_in;
    const float *A, *B, *scale;
    const int64_t *ids;
    void *y;
} lora_args;

PXL_INLINE float ld(int dt, const void *p, size_t i) {
    return dt == PXL_F32 ? ((const float *)p)[i] : pxl_bf16_to_f32(((const uint16_t *)p)[i]);
}
PXL_INLINE void st(int dt, void *p, size_t i, float v) {
    if (dt == PXL_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = pxl_f32_to_bf16(v);
}

static void lora_team(const lora_args *a) {
    const size_t T = a->T, N = a->N, K = a->K, R = a->R, L = a->L, es = a->dt == PXL_F32 ? 4 : 2;
    size_t n = 0; /* rows with an adapter */
    for (size_t t = 0; t < T; t++) n += a->ids[t] >= 0 && (size_t)a->ids[t] < L;
    size_t i0, i1;
    if (a->y != a->y_in) {
        pxl_split(T, 1, &i0, &i1);
        memcpy((char *)a->y + i0 * N * es, (const char *)a->y_in + i0 * N * es, (i1 - i0) * N * es);
    }
    if (!n) return;
    char *arena;
#pragma omp single copyprivate(arena)
    arena = pxl_scratch(LORA_SCRATCH, (L + 1) * sizeof(size_t) + n * sizeof(int32_t) + 128 +
                                          n * (K + R + N) * sizeof(float));
    size_t *start = (size_t *)arena;                          /* (L+1,) first sorted row per slot */
    int32_t *tok = (int32_t *)(start + L + 1);                /* (n,) sorted row -> token */
    float *xg = (float *)(((uintptr_t)(tok + n) + 63) & ~(uintptr_t)63); /* (n, K) */
    float *xa = xg + n * K, *out = xa + n * R;                /* (n, R), (n, N) */
#pragma omp single
    { /* counting sort of the adapted tokens by slot, ascending within a slot */
        memset(start, 0, (L + 1) * sizeof *start);
        for (size_t t = 0; t < T; t++)
            if (a->ids[t] >= 0 && (size_t)a->ids[t] < L) start[a->ids[t] + 1]++;
        for (size_t l = 0; l < L; l++) start[l + 1] += start[l];
        size_t pos[PXL_LORA_MAX_SLOTS];
        memcpy(pos, start, L * sizeof *pos);
        for (size_t t = 0; t < T; t++)
            if (a->ids[t] >= 0 && (size_t)a->ids[t] < L) tok[pos[a->ids[t]]++] = (int32_t)t;
    } /* (implicit barrier) */
    pxl_split(n, 1, &i0, &i1);
    for (size_t r = i0; r < i1; r++)
        for (size_t k = 0; k < K; k++) xg[r * K + k] = ld(a->dt, a->x, (size_t)tok[r] * K + k);
#pragma omp barrier
    for (size_t l = 0; l < L; l++) {
        size_t r0 = start[l], m = start[l + 1] - r0;
        if (!m) continue;
        pxl_linear(PXL_F32, PXL_F32, m, R, K, xg + r0 * K, a->A + l * R * K, NULL, xa + r0 * R);
#pragma omp barrier
        pxl_split(m, 1, &i0, &i1);
        for (size_t r = r0 + i0; r < r0 + i1; r++)
            for (size_t j = 0; j < R; j++) xa[r * R + j] *= a->scale[l];
#pragma omp barrier
        pxl_linear(PXL_F32, PXL_F32, m, N, R, xa + r0 * R, a->B + l * N * R, NULL, out + r0 * N);
#pragma omp barrier
    }
    pxl_split(n, 1, &i0, &i1);
    for (size_t r = i0; r < i1; r++) {
        size_t t = (size_t)tok[r];
        for (size_t j = 0; j < N; j++) st(a->dt, a->y, t * N + j, ld(a->dt, a->y, t * N + j) + out[r * N + j]);
    }
}

void pxl_lora(int dt, size_t T, size_t N, size_t K, size_t R, size_t L, const void *x, const void *y_in,
              const float *A, const float *B, const float *scale, const int64_t *ids, void *y) {
    if (L > PXL_LORA_MAX_SLOTS) { /* a caller's bug: the plugin checks max_loras */
        fprintf(stderr, "pxl_lora: %zu adapter slots, at most %d\n", L, PXL_LORA_MAX_SLOTS);
        abort();
    }
    const lora_args a = {dt, T, N, K, R, L, x, y_in, A, B, scale, ids, y};
    int nth = pxl_num_threads();
    PXL_ON_TEAM(nth, lora_team(&a));
}
