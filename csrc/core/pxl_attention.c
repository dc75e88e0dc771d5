/* Paged attention over a block-table KV cache, decode and (chunked) prefill alike.
 *
 * Work items are (sequence, KV head, query token), in that order, shared out in chunks.
 * Prefill: a thread gathers the sequence's keys for its KV head once, transposed to (hd, n)
 * in float32, and its values as (n, hd), and reuses them for every query token of the
 * chunk; scores are then vectorised along keys. Decode (one query token): the rows are
 * read in place, each key row once for the G query heads of the group, scores vectorised
 * along the head dim. Both compute a score in the same order (see scores_t), softmax in
 * float32 with a vectorised exp, and the weighted sum of value rows in increasing key
 * order, so an item's result does not depend on the chunking or on the other sequences
 * (batch invariance).
 */
#include <float.h>
#include <math.h>

#include "pxl_kernels.h"

#pragma GCC diagnostic ignored "-Wpsabi" /* vector values in the non-AVX-512 clones: all inlined */

#define CHUNK 32 /* items per scheduling chunk: consecutive tokens of one (sequence, KV head) */

static inline void load_f32(int dt, const void *p, size_t n, float *out) {
    if (dt == PXL_F32) memcpy(out, p, n * 4);
    else for (size_t i = 0; i < n; i++) out[i] = pxl_bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline size_t slot_of(const int64_t *table, size_t block_size, size_t pos) {
    return (size_t)table[pos / block_size] * block_size + pos % block_size;
}
static inline void prefetch_row(const char *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

/* keys [0, n) of one KV head: kt (hd, ld) transposed (columns n..ld zero), vv (n, hd), float32 */
PXL_CLONES static void gather_kv(int dt, size_t n, size_t ld, size_t hd, const char *k_cache, const char *v_cache,
                                 const int64_t *table, size_t block_size, size_t row_bytes, size_t kv_off, float *kt,
                                 float *vv, float *row) {
    for (size_t j = 0; j < n; j++) {
        size_t slot = slot_of(table, block_size, j);
        load_f32(dt, k_cache + slot * row_bytes + kv_off, hd, row);
        for (size_t d = 0; d < hd; d++) kt[d * ld + j] = row[d];
        load_f32(dt, v_cache + slot * row_bytes + kv_off, hd, vv + j * hd);
    }
    for (size_t d = 0; d < hd; d++)
        for (size_t j = n; j < ld; j++) kt[d * ld + j] = 0;
}

/* A score q.k in the one order both paths use, so a token's result does not depend on
 * whether it ran as a decode or inside a prefill chunk of any length (batch invariance):
 * lane l sums q[d] k[d] over d = l, l + 16, l + 32, ... in increasing d, then the 16 lanes
 * fold in halves (l += l + 8, then l + 4, l + 2, l + 1). Decode computes it per key with
 * the lanes along d (no transpose); prefill with 16 accumulators along keys. The loops use
 * GCC/Clang vector types: explicit registers (a widened row in a stack array would cost a
 * failed store-to-load forward per use), one source for AVX-512, AVX2 and RVV. */
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

static inline f32x16 ld16(int dt, const void *p) { /* 16 values at p (float32 or bf16), widened */
    f32x16 v;
    if (dt == PXL_F32) {
        memcpy(&v, p, sizeof v);
    } else {
        u16x16 h;
        memcpy(&h, p, sizeof h);
        u32x16 w = __builtin_convertvector(h, u32x16) << 16;
        memcpy(&v, &w, sizeof v);
    }
    return v;
}
static inline f32x16 splat16(float x) { return (f32x16){0} + x; } /* the form GCC broadcasts best in a clone */

static inline float fold16(f32x16 a) {
    f32x8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    f32x4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    f32x2 d = __builtin_shufflevector(c, c, 0, 1) + __builtin_shufflevector(c, c, 2, 3);
    return d[0] + d[1];
}

/* the scalar form of the same order, for a head dim that is not a multiple of 16 */
static float dot_scalar(size_t hd, const float *q, int dt, const void *k, size_t stride) {
    float acc[16] = {0};
    for (size_t d = 0; d < hd; d++)
        acc[d % 16] += q[d] * (dt == PXL_F32 ? ((const float *)k)[d * stride]
                                             : pxl_bf16_to_f32(((const uint16_t *)k)[d * stride]));
    for (int w = 8; w; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* s (n) = q . kt[:, lo .. lo + n) for kt (hd, ld) float32, 16 keys at a time; qb (hd) is
 * scratch for q's broadcasts (built once, then a plain vector load beside each FMA) */
PXL_CLONES static void scores_t(size_t hd, size_t ld, const float *q, const float *kt, size_t lo, size_t n,
                                float *s, f32x16 *qb) {
    if (hd % 16) {
        for (size_t j = 0; j < n; j++) s[j] = dot_scalar(hd, q, PXL_F32, kt + lo + j, ld);
        return;
    }
    for (size_t d = 0; d < hd; d++) qb[d] = splat16(q[d]);
    for (size_t j0 = 0; j0 < n; j0 += 16) {
        f32x16 acc[16];
        for (int l = 0; l < 16; l++) acc[l] = (f32x16){0};
        const float *k0 = kt + lo + j0;
        for (size_t d = 0; d < hd; d += 16)
#pragma GCC unroll 16
            for (int l = 0; l < 16; l++) acc[l] += qb[d + l] * ld16(PXL_F32, k0 + (d + l) * ld);
        for (int w = 8; w; w /= 2)
            for (int l = 0; l < w; l++) acc[l] += acc[l + w];
        if (n - j0 >= 16) memcpy(s + j0, &acc[0], sizeof acc[0]);
        else for (size_t jj = 0; jj < n - j0; jj++) s[j0 + jj] = acc[0][jj];
    }
}

/* s (G, n) = q (G, hd) . k for the n key rows at rows[j] (cache rows, dt), a key at a time;
 * vrows: the value rows weighted_sum reads next (prefetched) */
PXL_CLONES static void scores_rows(int dt, size_t G, size_t hd, const float *q, const char *const *rows,
                                   const char *const *vrows, size_t n, float *s) {
    size_t es = dt == PXL_F32 ? 4 : 2;
    for (size_t j = 0; j < n; j++) {
        if (j + 16 < n) { /* the cache is far bigger than L2: fetch ahead, the V rows for weighted_sum too */
            prefetch_row(rows[j + 16], hd * es);
            prefetch_row(vrows[j + 16], hd * es);
        }
        for (size_t g = 0; g < G; g++) {
            const float *qg = q + g * hd;
            if (hd % 16) {
                s[g * n + j] = dot_scalar(hd, qg, dt, rows[j], 1);
                continue;
            }
            f32x16 acc = {0};
            for (size_t d = 0; d < hd; d += 16) acc += ld16(PXL_F32, qg + d) * ld16(dt, rows[j] + d * es);
            s[g * n + j] = fold16(acc);
        }
    }
}

/* s[j] = exp(s[j] - max) / sum for j < n, the sum in 16 running lanes in a fixed order
 * (independent of where s sits in memory: vectorised loops may peel by alignment) */
PXL_CLONES static void softmax(float *s, size_t n) {
    float m = -FLT_MAX, part[16] = {0};
    for (size_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
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
    float inv = 1.0f / sum;
    for (j = 0; j < n; j++) s[j] *= inv;
}

/* out (G, hd) = sum_j w[g, j] v_j in increasing j, w (G, n), for the n value rows at
 * rows[j] (float32 or bf16, dt). Each (head, 16 dims) output is one accumulator; CNT of
 * them advance together over the keys, so CNT independent FMA chains hide the FMA latency
 * (one chain ran at a quarter of the rate). DT and CNT are constants in each instance. */
static inline __attribute__((always_inline)) void wsum_group(const int DT, const int CNT, size_t hd, const float *w,
                                                             size_t n, const char *const *rows, size_t p0,
                                                             float *out) {
    f32x16 acc[8] = {{0}};
    const float *wi[8];
    size_t off[8];
    for (int i = 0; i < CNT; i++) /* output offset (p0 + i) * 16 = g * hd + d0 */
        wi[i] = w + (p0 + i) * 16 / hd * n, off[i] = (p0 + i) * 16 % hd * (DT == PXL_F32 ? 4 : 2);
    for (size_t j = 0; j < n; j++)
        for (int i = 0; i < CNT; i++) acc[i] += splat16(wi[i][j]) * ld16(DT, rows[j] + off[i]);
    for (int i = 0; i < CNT; i++) memcpy(out + (p0 + i) * 16, &acc[i], sizeof acc[i]);
}

#define WSUM_CASES(DT)                                                                                                \
    switch (cnt) {                                                                                                     \
    case 8: wsum_group(DT, 8, hd, w, n, rows, p0, out); break;                                                         \
    case 7: wsum_group(DT, 7, hd, w, n, rows, p0, out); break;                                                         \
    case 6: wsum_group(DT, 6, hd, w, n, rows, p0, out); break;                                                         \
    case 5: wsum_group(DT, 5, hd, w, n, rows, p0, out); break;                                                         \
    case 4: wsum_group(DT, 4, hd, w, n, rows, p0, out); break;                                                         \
    case 3: wsum_group(DT, 3, hd, w, n, rows, p0, out); break;                                                         \
    case 2: wsum_group(DT, 2, hd, w, n, rows, p0, out); break;                                                         \
    default: wsum_group(DT, 1, hd, w, n, rows, p0, out); break;                                                        \
    }

PXL_CLONES static void weighted_sum(int dt, size_t G, size_t hd, const float *w, const char *const *rows, size_t n,
                                    float *out) {
    if (hd % 16) { /* a head dim that is not a multiple of 16: the same sums, one at a time */
        for (size_t g = 0; g < G; g++)
            for (size_t d = 0; d < hd; d++) {
                float acc = 0;
                for (size_t j = 0; j < n; j++)
                    acc += w[g * n + j] * (dt == PXL_F32 ? ((const float *)rows[j])[d]
                                                         : pxl_bf16_to_f32(((const uint16_t *)rows[j])[d]));
                out[g * hd + d] = acc;
            }
        return;
    }
    size_t np = G * hd / 16;
    for (size_t p0 = 0; p0 < np; p0 += 8) {
        size_t cnt = np - p0 < 8 ? np - p0 : 8;
        if (dt == PXL_F32) WSUM_CASES(PXL_F32)
        else WSUM_CASES(PXL_BF16)
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
    size_t ld_max = (max_len + 15) / 16 * 16;
    /* per thread: q's broadcasts (hd vectors); the n K and V row addresses of a decode and
     * the n row addresses of vv;
     * kt (hd, ld) and vv (n, hd); scores (G, n); q and out (G, hd); one widened row (hd) */
    f32x16 *qb = pxl_scratch(3, hd * sizeof(f32x16) + 3 * max_len * sizeof(char *) +
                                    ((ld_max + max_len) * hd + G * max_len + 2 * G * hd + hd) * sizeof(float));
    const char **krows = (const char **)(qb + hd), **vrows = krows + max_len, **vvrows = vrows + max_len;
    float *kt = (float *)(vvrows + max_len), *vv = kt + ld_max * hd, *s = vv + max_len * hd, *qf = s + G * max_len;
    float *of = qf + G * hd, *row = of + G * hd;
    size_t have_b = (size_t)-1, have_h = 0, n = 0, ld = 0; /* which keys kt/vv hold */
#pragma omp barrier /* every row of this step is in the cache before anyone reads it */
#pragma omp for schedule(dynamic, CHUNK) nowait
    for (size_t it = 0; it < T * Hkv; it++) { /* (sequence, KV head, token) order */
        size_t b = 0;
        while ((size_t)query_start_loc[b + 1] * Hkv <= it) b++;
        size_t qs = query_start_loc[b], qlen = query_start_loc[b + 1] - qs, r = it - qs * Hkv;
        size_t kvh = r / qlen, t = qs + r % qlen;
        size_t pos = seq_lens[b] - qlen + (t - qs); /* this token's position */
        size_t lo = window && pos + 1 > window ? pos + 1 - window : 0, nk = pos + 1 - lo;
        const int64_t *table = block_tables + b * max_blocks;
        load_f32(dt, (const char *)q + (t * H + kvh * G) * hd * es, G * hd, qf);
        for (size_t i = 0; i < G * hd; i++) qf[i] *= scale;
        if (qlen == 1) { /* decode: read the rows in place, each once for all G heads */
            for (size_t j = 0; j < nk; j++) {
                size_t off = slot_of(table, block_size, lo + j) * row_bytes + kvh * hd * es;
                krows[j] = (const char *)k_cache + off, vrows[j] = (const char *)v_cache + off;
            }
            scores_rows(dt, G, hd, qf, krows, vrows, nk, s);
            for (size_t g = 0; g < G; g++) softmax(s + g * nk, nk);
            weighted_sum(dt, G, hd, s, vrows, nk, of);
        } else { /* prefill: the sequence's keys once per thread, for all its tokens here */
            if (b != have_b || kvh != have_h) {
                n = seq_lens[b], ld = (n + 15) / 16 * 16;
                gather_kv(dt, n, ld, hd, k_cache, v_cache, table, block_size, row_bytes, kvh * hd * es, kt, vv, row);
                for (size_t j = 0; j < n; j++) vvrows[j] = (const char *)(vv + j * hd);
                have_b = b, have_h = kvh;
            }
            for (size_t g = 0; g < G; g++) {
                scores_t(hd, ld, qf + g * hd, kt, lo, nk, s + g * nk, qb);
                softmax(s + g * nk, nk);
            }
            weighted_sum(PXL_F32, G, hd, s, vvrows + lo, nk, of);
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
