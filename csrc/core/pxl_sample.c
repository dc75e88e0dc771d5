/* Random sampling by inverse CDF, straight from logits: for each row, the token where the
 * running sum of softmax(row) first passes u (the engine's sampler, perfxlm/engine/sampler.py:
 * `inverse_cdf`, does the same on torch probabilities).
 *
 * A row is read twice, never written: its max, then exp(x - max) summed per block of 256
 * tokens; the block where the running sum of those passes u x total is then walked token by
 * token, where torch's path also writes a probability row (softmax), sums it per block and
 * gathers the block: fewer passes over the row (`perfxlm bench sampler` compares the two). A
 * decode step's logits come from DRAM, so each thread takes a run of rows and fetches the next
 * row while the exps of this one run.
 * Masked tokens (-inf) get exactly 0, so they are never drawn. A row whose max is not finite
 * (NaN, +inf, or every token masked) is left to the caller: out = -1.
 * Each row runs the same instructions whatever the other rows are (batch invariant). */
#include <math.h>

#pragma GCC diagnostic ignored "-Wpsabi" /* vector values in the non-AVX-512 clones: all inlined */

#include "pxl_kernels.h"

#define BLOCK 256

/* exp(x - m), exactly 0 far below the max (pxl_exp would clamp to e^-87, not 0: a masked
 * token must have no chance at all) */
static inline float weight(float x, float m) {
    float d = x - m;
    return d < -87.0f ? 0.0f : pxl_exp(d);
}

/* the row's max, 64 values at a time (a NaN shows later: its weight is NaN, so is the total) */
PXL_CLONES static float row_max(size_t V, const float *x) {
    f32x16 mv[4]; /* four running maxima: one would wait on the compare-select latency */
    for (int a = 0; a < 4; a++)
        for (int l = 0; l < 16; l++) mv[a][l] = -INFINITY;
    size_t i = 0;
    for (; i + 64 <= V; i += 64)
        for (int a = 0; a < 4; a++) {
            f32x16 v;
            memcpy(&v, x + i + 16 * a, sizeof v);
            i32x16 gt = v > mv[a];
            mv[a] = (f32x16)((gt & (i32x16)v) | (~gt & (i32x16)mv[a]));
        }
    float m = -INFINITY;
    for (int a = 0; a < 4; a++)
        for (int l = 0; l < 16; l++) m = mv[a][l] > m ? mv[a][l] : m;
    for (; i < V; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* sums[b] = sum of weight(x, m) over block b, in 16 running lanes (a fixed order). Meanwhile
 * the next row (`next`, V values, or NULL) is fetched into L2 a share a block: the row comes
 * from DRAM (the lm_head stores the logits around the caches), and the memory would otherwise
 * sit idle while these exps run from L2 */
PXL_CLONES static void block_sums(size_t V, const float *x, float m, float *sums, const float *next) {
    const size_t lines = (V * sizeof(float) + 63) / 64, nb = (V + BLOCK - 1) / BLOCK;
    for (size_t b0 = 0; b0 < V; b0 += BLOCK) {
        size_t n = V - b0 < BLOCK ? V - b0 : BLOCK;
        if (next)
            for (size_t l = lines * (b0 / BLOCK) / nb, e = lines * (b0 / BLOCK + 1) / nb; l < e; l++)
                __builtin_prefetch((const char *)next + 64 * l, 0, 2);
        float part[32] = {0}; /* two vectors of running sums, so two exps are in flight */
        size_t i = 0;
        for (; i + 32 <= n; i += 32)
            for (int l = 0; l < 32; l++) part[l] += weight(x[b0 + i + l], m);
        for (int l = 0; i < n; i++, l++) part[l] += weight(x[b0 + i], m);
        float s = 0;
        for (int l = 0; l < 32; l++) s += part[l];
        sums[b0 / BLOCK] = s;
    }
}

static int64_t sample_row(size_t V, const float *x, float u, float *sums, const float *next) {
    float m = row_max(V, x);
    if (!isfinite(m)) return -1;
    block_sums(V, x, m, sums, next);
    size_t nb = (V + BLOCK - 1) / BLOCK, b = 0, last = 0;
    double total = 0;
    for (size_t k = 0; k < nb; k++) {
        total += sums[k];
        last = sums[k] > 0 ? k : last; /* the max's own block always counts: weight 1 */
    }
    if (!isfinite(total)) return -1; /* a NaN in the row */
    double target = (double)u * total, before = 0;
    for (; b < nb; b++) { /* the first block whose running sum passes the target */
        if (before + sums[b] > target) break;
        before += sums[b];
    }
    if (b == nb) b = last, before = total - sums[last]; /* rounding left the target at the end */
    size_t i0 = b * BLOCK, i1 = i0 + BLOCK < V ? i0 + BLOCK : V;
    int64_t pick = -1;
    double run = before;
    for (size_t i = i0; i < i1; i++) {
        float w = weight(x[i], m);
        if (w == 0) continue;
        pick = (int64_t)i, run += w;
        if (run > target) break; /* else, past the block's end by rounding: its last drawable token */
    }
    return pick;
}

static void sample_team(size_t R, size_t V, const float *logits, size_t ld, const float *u, int64_t *out) {
    float *sums = pxl_scratch(0, (V + BLOCK - 1) / BLOCK * sizeof(float));
    size_t r0, r1;
    pxl_split(R, 1, &r0, &r1);
    for (size_t r = r0; r < r1; r++)
        out[r] = sample_row(V, logits + r * ld, u[r], sums, r + 1 < r1 ? logits + (r + 1) * ld : NULL);
}

void pxl_sample_rows(size_t R, size_t V, const float *logits, size_t ld, const float *u, int64_t *out) {
    int nth = R < 2 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, sample_team(R, V, logits, ld, u, out));
}
