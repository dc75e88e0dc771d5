/* Paged attention over a block-table KV cache, decode and (chunked) prefill alike.
 *
 * Work items are (sequence, KV head, query token), in that order, shared out in chunks:
 * a thread gathers the sequence's keys for its KV head once, transposed to (hd, n) in
 * float32, and its values as (n, hd), and reuses them for every query token of the chunk
 * (a prefill's tokens all read the same keys; before, each re-read and widened them).
 * Per item, for the G query heads of the group: scores as hd broadcast FMAs over the key
 * rows (vectorised along keys, no horizontal sums), softmax in float32 with a vectorised
 * exp, then the weighted sum of value rows. The result of an item does not depend on the
 * chunking or on the other sequences (batch invariance).
 */
#include <float.h>
#include <math.h>

#include "pxl_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PXL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PXL_CLONES
#endif
#define CHUNK 32 /* items per scheduling chunk: consecutive tokens of one (sequence, KV head) */

static inline void load_f32(int dt, const void *p, size_t n, float *out) {
    if (dt == PXL_F32) memcpy(out, p, n * 4);
    else for (size_t i = 0; i < n; i++) out[i] = pxl_bf16_to_f32(((const uint16_t *)p)[i]);
}

/* keys [0, n) of one KV head: kt (hd, n) transposed, vv (n, hd), both float32 */
PXL_CLONES static void gather_kv(int dt, size_t n, size_t hd, const char *k_cache, const char *v_cache,
                                 const int64_t *table, size_t block_size, size_t row_bytes, size_t kv_off, float *kt,
                                 float *vv, float *row) {
    for (size_t j = 0; j < n; j++) {
        size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        load_f32(dt, k_cache + slot * row_bytes + kv_off, hd, row);
        for (size_t d = 0; d < hd; d++) kt[d * n + j] = row[d];
        load_f32(dt, v_cache + slot * row_bytes + kv_off, hd, vv + j * hd);
    }
}

/* s[j] = exp(s[j] - m) for j < n, returning their sum: 16 running partial sums in a fixed
 * lane order, so the result does not depend on where s sits in memory (vectorised loops
 * may peel by alignment) */
static inline float exp_sum(float *s, size_t n, float m) {
    float part[16] = {0};
    size_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) {
            s[j + l] = pxl_exp(s[j + l] - m);
            part[l] += s[j + l];
        }
    for (int l = 0; j < n; j++, l++) {
        s[j] = pxl_exp(s[j] - m);
        part[l] += s[j];
    }
    float sum = 0;
    for (int l = 0; l < 16; l++) sum += part[l];
    return sum;
}

/* decode (one query token of its sequence): keys read straight from the cache, 16 at a time
 * widened and transposed into an L1 tile, so scores are broadcast FMAs over 16 keys with
 * each score summed over d in order, exactly as attend() does */
PXL_CLONES static void attend_direct(int dt, size_t G, size_t hd, const float *q, const char *k_cache,
                                     const char *v_cache, const int64_t *table, size_t block_size, size_t row_bytes,
                                     size_t kv_off, size_t lo, size_t hi, float *scores, float *row, float *tile,
                                     float *out) {
    size_t n = hi - lo;
    for (size_t j0 = 0; j0 < n; j0 += 16) {
        size_t jn = n - j0 < 16 ? n - j0 : 16;
        for (size_t jj = 0; jj < jn; jj++) {
            size_t p = lo + j0 + jj, slot = (size_t)table[p / block_size] * block_size + p % block_size;
            load_f32(dt, k_cache + slot * row_bytes + kv_off, hd, row);
            for (size_t d = 0; d < hd; d++) tile[d * 16 + jj] = row[d];
        }
        for (size_t g = 0; g < G; g++) {
            float acc[16] = {0};
            for (size_t d = 0; d < hd; d++) {
                float qd = q[g * hd + d];
                for (int l = 0; l < 16; l++) acc[l] += qd * tile[d * 16 + l];
            }
            for (size_t jj = 0; jj < jn; jj++) scores[g * n + j0 + jj] = acc[jj];
        }
    }
    for (size_t g = 0; g < G; g++) {
        float *s = scores + g * n, m = -FLT_MAX;
        for (size_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
        float inv = 1.0f / exp_sum(s, n, m);
        for (size_t j = 0; j < n; j++) s[j] *= inv;
        for (size_t d = 0; d < hd; d++) out[g * hd + d] = 0;
    }
    for (size_t j = 0; j < n; j++) {
        size_t p = lo + j, slot = (size_t)table[p / block_size] * block_size + p % block_size;
        load_f32(dt, v_cache + slot * row_bytes + kv_off, hd, row);
        for (size_t g = 0; g < G; g++) {
            float w = scores[g * n + j];
#pragma omp simd
            for (size_t d = 0; d < hd; d++) out[g * hd + d] += w * row[d];
        }
    }
}

/* G query heads q (G, hd), pre-scaled, over keys [lo, hi) of kt/vv (ld n) -> out (G, hd) */
PXL_CLONES static void attend(size_t G, size_t hd, size_t n, const float *q, const float *kt, const float *vv,
                              size_t lo, size_t hi, float *s, float *out) {
    for (size_t g = 0; g < G; g++) {
        const float *qg = q + g * hd;
        for (size_t j = lo; j < hi; j++) s[j] = 0;
        for (size_t d = 0; d < hd; d++) {
            float qd = qg[d];
            const float *kd = kt + d * n;
#pragma omp simd
            for (size_t j = lo; j < hi; j++) s[j] += qd * kd[j];
        }
        float m = -FLT_MAX;
        for (size_t j = lo; j < hi; j++) m = s[j] > m ? s[j] : m;
        float inv = 1.0f / exp_sum(s + lo, hi - lo, m), *o = out + g * hd;
        for (size_t j = lo; j < hi; j++) s[j] *= inv;
        for (size_t d = 0; d < hd; d++) o[d] = 0;
        for (size_t j = lo; j < hi; j++) {
            float w = s[j];
            const float *v = vv + j * hd;
#pragma omp simd
            for (size_t d = 0; d < hd; d++) o[d] += w * v[d];
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
    size_t max_len = 0;
    for (size_t b = 0; b < B; b++) max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
    /* per thread: kt and vv (2 n hd), scores (n), q and out (G hd), one widened row (hd) */
    float *kt = pxl_scratch(3, (2 * max_len * hd + G * max_len + 2 * G * hd + 17 * hd + 16) * sizeof(float));
    float *vv = kt + max_len * hd, *s = vv + max_len * hd, *qf = s + G * max_len, *of = qf + G * hd;
    float *row = of + G * hd, *tile = row + hd;
    size_t have_b = (size_t)-1, have_h = 0, n = 0; /* which keys kt/vv hold */
#pragma omp barrier /* every row of this step is in the cache before anyone reads it */
#pragma omp for schedule(dynamic, CHUNK) nowait
    for (size_t it = 0; it < T * Hkv; it++) { /* (sequence, KV head, token) order */
        size_t b = 0;
        while ((size_t)query_start_loc[b + 1] * Hkv <= it) b++;
        size_t qs = query_start_loc[b], qlen = query_start_loc[b + 1] - qs, r = it - qs * Hkv;
        size_t kvh = r / qlen, t = qs + r % qlen;
        size_t pos = seq_lens[b] - qlen + (t - qs); /* this token's position */
        size_t lo = window && pos + 1 > window ? pos + 1 - window : 0;
        load_f32(dt, (const char *)q + (t * H + kvh * G) * hd * es, G * hd, qf);
        for (size_t i = 0; i < G * hd; i++) qf[i] *= scale;
        if (qlen == 1) {
            attend_direct(dt, G, hd, qf, k_cache, v_cache, block_tables + b * max_blocks, block_size, row_bytes,
                          kvh * hd * es, lo, pos + 1, s, row, tile, of);
        } else {
            if (b != have_b || kvh != have_h) {
                n = seq_lens[b];
                gather_kv(dt, n, hd, k_cache, v_cache, block_tables + b * max_blocks, block_size, row_bytes,
                          kvh * hd * es, kt, vv, row);
                have_b = b, have_h = kvh;
            }
            attend(G, hd, n, qf, kt, vv, lo, pos + 1, s, of);
        }
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
