/* Paged attention over a block-table KV cache, decode and (chunked) prefill alike.
 *
 * Work items are (query token, KV head) pairs: the query heads of one GQA group share
 * each key and value row while it is in L1. Per item: scores for the visible keys into a
 * per-thread buffer, softmax in float32, then the weighted sum of values.
 */
#include <float.h>
#include <math.h>

#include "pxl_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PXL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PXL_CLONES
#endif

static inline void load_f32(int dt, const void *p, size_t n, float *out) {
    if (dt == PXL_F32) memcpy(out, p, n * 4);
    else for (size_t i = 0; i < n; i++) out[i] = pxl_bf16_to_f32(((const uint16_t *)p)[i]);
}

/* one query token x one KV head: G query heads q (G, hd) -> out (G, hd) */
PXL_CLONES static void attend(int dt, size_t G, size_t hd, const float *q, const char *k_cache, const char *v_cache,
                              const int64_t *table, size_t block_size, size_t row_bytes, size_t kv_off, size_t lo,
                              size_t hi, float *scores, float *krow, float *inv, float *out) {
    size_t n = hi - lo;
    for (size_t j = 0; j < n; j++) {
        size_t p = lo + j;
        const char *kr = k_cache + ((size_t)table[p / block_size] * block_size + p % block_size) * row_bytes + kv_off;
        const float *kf = (const float *)kr;
        if (dt != PXL_F32) { load_f32(dt, kr, hd, krow); kf = krow; }
        for (size_t g = 0; g < G; g++) {
            float s = 0;
#pragma omp simd reduction(+ : s)
            for (size_t d = 0; d < hd; d++) s += q[g * hd + d] * kf[d];
            scores[g * n + j] = s;
        }
    }
    for (size_t g = 0; g < G; g++) {
        float *s = scores + g * n, m = -FLT_MAX, sum = 0;
        for (size_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        for (size_t j = 0; j < n; j++) { s[j] = expf(s[j] - m); sum += s[j]; }
        inv[g] = 1.0f / sum;
        for (size_t d = 0; d < hd; d++) out[g * hd + d] = 0;
    }
    for (size_t j = 0; j < n; j++) {
        size_t p = lo + j;
        const char *vr = v_cache + ((size_t)table[p / block_size] * block_size + p % block_size) * row_bytes + kv_off;
        const float *vf = (const float *)vr;
        if (dt != PXL_F32) { load_f32(dt, vr, hd, krow); vf = krow; }
        for (size_t g = 0; g < G; g++) {
            float w = scores[g * n + j] * inv[g];
#pragma omp simd
            for (size_t d = 0; d < hd; d++) out[g * hd + d] += w * vf[d];
        }
    }
}

static void attention_team(int dt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                           const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                           const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                           const int64_t *seq_lens, const int64_t *query_start_loc, float scale, size_t window,
                           void *y) {
    size_t es = dt == PXL_F32 ? 4 : 2, row_bytes = Hkv * hd * es, G = H / Hkv;
    size_t t0, t1;
    pxl_split(T, 1, &t0, &t1);
    for (size_t t = t0; t < t1; t++) { /* write this step's keys and values; slot < 0 marks padding */
        if (slot_mapping[t] < 0) continue;
        memcpy((char *)k_cache + (size_t)slot_mapping[t] * row_bytes, (const char *)k + t * row_bytes, row_bytes);
        memcpy((char *)v_cache + (size_t)slot_mapping[t] * row_bytes, (const char *)v + t * row_bytes, row_bytes);
    }
    size_t items = T * Hkv, max_len = 0;
    for (size_t b = 0; b < B; b++) max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
    /* per thread: scores (G, max_len), q and out (G, hd), one widened K/V row, G inverses */
    float *scores = pxl_scratch(3, ((max_len + 1) * G + 2 * G * hd + hd + G) * sizeof(float));
    float *qf = scores + (max_len + 1) * G, *of = qf + G * hd, *krow = of + G * hd, *inv = krow + hd;
#pragma omp barrier /* every row of this step is in the cache before anyone reads it */
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t it = 0; it < items; it++) {
        size_t t = it / Hkv, kvh = it % Hkv;
        size_t b = 0;
        while ((size_t)query_start_loc[b + 1] <= t) b++;
        size_t qlen = query_start_loc[b + 1] - query_start_loc[b];
        size_t pos = seq_lens[b] - qlen + (t - query_start_loc[b]); /* this token's position */
        size_t lo = window && pos + 1 > window ? pos + 1 - window : 0;
        load_f32(dt, (const char *)q + (t * H + kvh * G) * hd * es, G * hd, qf);
        for (size_t i = 0; i < G * hd; i++) qf[i] *= scale;
        attend(dt, G, hd, qf, k_cache, v_cache, block_tables + b * max_blocks, block_size, row_bytes, kvh * hd * es,
               lo, pos + 1, scores, krow, inv, of);
        char *yr = (char *)y + (t * H + kvh * G) * hd * es;
        if (dt == PXL_F32) memcpy(yr, of, G * hd * 4);
        else for (size_t i = 0; i < G * hd; i++) ((uint16_t *)yr)[i] = pxl_f32_to_bf16(of[i]);
    }
}

void pxl_paged_attention(int dt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q, const void *k,
                         const void *v, void *k_cache, void *v_cache, size_t block_size, const int64_t *slot_mapping,
                         const int64_t *block_tables, size_t max_blocks, const int64_t *seq_lens,
                         const int64_t *query_start_loc, float scale, size_t window, void *y) {
    size_t max_len = 0;
    for (size_t b = 0; b < B; b++) max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
    int nth = T * Hkv * max_len < 4096 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, attention_team(dt, T, B, H, Hkv, hd, q, k, v, k_cache, v_cache, block_size, slot_mapping,
                                    block_tables, max_blocks, seq_lens, query_start_loc, scale, window, y));
}
