/* Paged attention over a block-table KV cache, decode and (chunked) prefill alike.
 *
 * Work items are (sequence, KV head, tile of query tokens): a tile's query rows (its tokens
 * x the G heads of the KV head; one token for decode) read the key and value rows in place
 * from the cache, each key row once for all of them. Scores go 16 keys at a time: each
 * (row, key) is a 16-lane dot product along the head dim, and 16 of them fold together (a
 * transpose-add tree, no per-key horizontal sum). Softmax in float32 with a vectorised exp,
 * then each row's weighted sum of value rows in increasing key order.
 *
 * A decode step reads every sequence's keys and values from DRAM (the whole cache in use), so a
 * thread fetches its next item's rows while it computes this one's: the next keys during the
 * scores, the next values during the weighted sums (pf_queue).
 *
 * Every (row, key) score, softmax and weighted sum runs the same instructions whatever else
 * shares the tile or the step, so a token's result does not depend on the batch, on how
 * its prompt was chunked, or on whether it ran as a decode (batch invariance). One exception:
 * with tile kernels (AMX) a prefill's weighted sums run on tiles and a decode's in the fp32
 * loops, whose sums are in another order, unless batch-invariant mode sends both to the tiles.
 *
 * Not causal (an encoder's bidirectional attention): every token of a sequence sees all its
 * seq_lens[b] keys, so a tile's rows share one key range and take the tile's shared path.
 */
#include <float.h>
#include <stdint.h>
#include <math.h>

#include "pxl_kernels.h"

#pragma GCC diagnostic ignored "-Wpsabi" /* vector values in the non-AVX-512 clones: all inlined */

#define TILE_ROWS 12 /* query rows (tokens x heads of the group) per prefill tile */
#define CHUNK 16     /* items per scheduling chunk at most */
#define PF_KEYS 32   /* an unfetched item's own look-ahead in keys: covers DRAM latency (with none,
                        * the first keys wait on memory) */

/* Rows are fetched into L2 (locality 2: prefetcht1), not L1: an item's keys and values (tens
 * of KB, more than L1 holds) arrive a whole item ahead, and fetched into L1 they evicted each
 * other and the rows in use before they were read. */
static inline void prefetch_row(const char *p, size_t bytes) {
    if (bytes == 128) { /* a bf16 row of a 64-dim head, the common case: no loop in the key loops */
        __builtin_prefetch(p, 0, 2), __builtin_prefetch(p + 64, 0, 2);
        return;
    }
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

/* Cache rows still to prefetch: rows[at .. n) + off, `bytes` each. The key and value loops
 * take rows from these as they go, so fetching the next item's rows overlaps this item's
 * arithmetic (a decode item's rows come from DRAM, and it would otherwise wait on them). */
typedef struct {
    const char *const *rows;
    size_t off, bytes, at, n;
} pf_queue;
static inline void pf_take(pf_queue *q, size_t k) {
    size_t e = q->n - q->at < k ? q->n : q->at + k;
    for (; q->at < e; q->at++) prefetch_row(q->rows[q->at] + q->off, q->bytes);
}

/* GCC/Clang vector types (f32x16, i32x16: pxl_kernels.h): explicit registers (a widened row
 * in a stack array would cost a failed store-to-load forward per use), one source for AVX-512,
 * AVX2 and RVV */
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));

PXL_INLINE f32x16 ld16(int dt, const void *p) { /* 16 values at p (float32, bf16 or f16), widened */
    f32x16 v;
    if (dt == PXL_F32) {
        memcpy(&v, p, sizeof v);
    } else if (dt == PXL_F16) {
        v = pxl_f16x16_to_f32(p);
    } else { /* bf16 -> fp32: each value into the high half of a 32-bit lane (one vpermi2w) */
        u16x16 h, z = {0};
        memcpy(&h, p, sizeof h);
        u16x32 w = __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25,
                                           10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        memcpy(&v, &w, sizeof v);
    }
    return v;
}
/* 32 bf16 values at p (one cache line) widened by a shift and a mask, no shuffle: out[0] gets
 * the even-indexed ones (0, 2 .. 30), out[1] the odd ones */
static inline void widen_pairs(const void *p, f32x16 *out) {
    i32x16 w;
    memcpy(&w, p, sizeof w);
    out[0] = (f32x16)(w << 16), out[1] = (f32x16)(w & (int32_t)0xffff0000);
}
static inline f32x16 splat16(float x) { /* the form GCC turns into one vbroadcastss (from memory) in a clone */
    f32x16 v = {x};
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

/* The score order: lane l of a (row, key) accumulator sums q[d] k[d] over d = l, l + 16, ...
 * in increasing d; then the 16 lanes fold in halves (l + 8, then + 4, + 2, + 1).
 * fold16x16 does that fold for 16 accumulators at once: out[k] = fold(a[k]). Each step adds
 * the same lane pairs as folding one vector alone (only the packing differs), so the bits
 * are those of a per-key fold. */
#define SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
/* the first three levels for 8 keys: one vector of their 2 partials each */
static inline f32x16 fold8x16(const f32x16 *a) {
    f32x16 b[4], c[2];
    for (int i = 0; i < 4; i++) /* lanes l and l + 8 of keys 2i, 2i + 1: two keys x 8 partials */
        b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUF(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++) /* four keys x 4 partials */
        c[i] = SHUF(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUF(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    return SHUF(c[0], c[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) + /* eight keys x 2 */
           SHUF(c[0], c[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
/* the last level: keys 0-7 (lo) and 8-15 (hi) folded to one score each */
static inline f32x16 fold_last(f32x16 lo, f32x16 hi) {
    return SHUF(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUF(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
static inline f32x16 fold16x16(const f32x16 *a) { return fold_last(fold8x16(a), fold8x16(a + 8)); }

/* element d of a cache row in dt, as fp32 */
static inline float row_at(int dt, const void *row, size_t d) {
    if (dt == PXL_F32) return ((const float *)row)[d];
    uint16_t h = ((const uint16_t *)row)[d];
    return dt == PXL_F16 ? pxl_fp16_to_fp32(h) : pxl_bf16_to_f32(h);
}

/* the scalar form of the same order, for a head dim that is not a multiple of 16 */
static float dot_scalar(size_t hd, const float *q, int dt, const void *k) {
    float acc[16] = {0};
    for (size_t d = 0; d < hd; d++) acc[d % 16] += q[d] * row_at(dt, k, d);
    for (int w = 8; w; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* scores_tile's sums for RN <= 3 rows (a decode token's heads), keys widened in registers: 8
 * keys x RN rows of accumulators stay in registers and q comes from L1, where the tile path
 * stores every widened key row to scratch and reloads it per row (a decode item reads each key
 * row once, for few rows, so that staging costs more than it saves). Each accumulator adds the
 * same terms in the same order and the fold is fold16x16's, so the bits are the same. */
PXL_INLINE void scores_rows(const int DT, const int RN, size_t hd, const float *q, const char *const *krows,
                            size_t off, size_t n, float *s, size_t lds, const float *zero, pf_queue *pf, int npf) {
    const size_t es = DT == PXL_F32 ? 4 : 2;
    for (size_t j0 = 0; j0 < n; j0 += 16) {
        size_t cnt = n - j0 < 16 ? n - j0 : 16;
        f32x16 d[3][2];
        for (int h = 0; h < 2; h++) {
            f32x16 acc[3][8];
            for (int r = 0; r < RN; r++)
                for (int jj = 0; jj < 8; jj++) acc[r][jj] = (f32x16){0};
            for (int i = 0; i < npf; i++) pf_take(&pf[i], 8); /* a row of each queue per key */
            const char *kr[8]; /* keys past n read zeros (as bf16 too): no test in the loop */
            for (int jj = 0; jj < 8; jj++)
                kr[jj] = j0 + h * 8 + jj < n ? krows[j0 + h * 8 + jj] + off : (const char *)zero;
            for (size_t c = 0; c < hd; c += 16) {
                f32x16 qc[3];
                for (int r = 0; r < RN; r++) qc[r] = ld16(PXL_F32, q + r * hd + c);
#pragma GCC unroll 8
                for (int jj = 0; jj < 8; jj++) {
                    f32x16 kv = ld16(DT, kr[jj] + c * es);
                    for (int r = 0; r < RN; r++) acc[r][jj] += qc[r] * kv;
                }
            }
            for (int r = 0; r < RN; r++) d[r][h] = fold8x16(acc[r]);
        }
        for (int r = 0; r < RN; r++) {
            f32x16 out = fold_last(d[r][0], d[r][1]);
            if (cnt == 16) memcpy(s + r * lds + j0, &out, sizeof out);
            else for (size_t jj = 0; jj < cnt; jj++) s[r * lds + j0 + jj] = out[jj];
        }
    }
}

/* x = hi + mid + lo exactly, each bf16 (the tiles multiply bf16 only): each part the top 16
 * bits of what the ones before leave, so each takes the next 8 bits of x's 24-bit mantissa */
static inline void split3(float x, uint16_t *hi, uint16_t *mid, uint16_t *lo) {
    uint32_t b;
    memcpy(&b, &x, 4);
    *hi = (uint16_t)(b >> 16), b &= 0xffff0000u;
    float t;
    memcpy(&t, &b, 4);
    x -= t;
    memcpy(&b, &x, 4);
    *mid = (uint16_t)(b >> 16), b &= 0xffff0000u;
    memcpy(&t, &b, 4);
    x -= t;
    memcpy(&b, &x, 4);
    *lo = (uint16_t)(b >> 16);
}
/* x (R, 32 chunks, ld apart) fp32 -> per 32 columns, its hi, mid and lo tiles of 16 rows x 32
 * bf16: q's rows per 32 dims, the softmax's weights per 32 keys */
PXL_CLONES static void split_tiles(size_t R, size_t chunks, const float *x, size_t ld, uint16_t *out) {
    for (size_t c = 0; c < chunks; c++)
        for (size_t r = 0; r < R; r++) {
            const float *a = x + r * ld + c * 32;
            uint16_t *hi = out + c * 3 * 16 * 32 + r * 32;
            for (int d = 0; d < 32; d++) split3(a[d], hi + d, hi + 16 * 32 + d, hi + 2 * 16 * 32 + d);
        }
}
/* A thread's keys and values in the tile kernels' layouts (attn_kt, attn_vt) for one (sequence,
 * KV head, first key): the query tiles of a prefill after the first read the same rows and
 * more, so each block is laid out once rather than once per tile (128 times over a 512-token
 * prompt). kblocks / vblocks count the whole blocks held (16 keys, 32 values); a part-filled
 * last block is laid out again by whoever reads it. Decode items (no later tile to share with)
 * lay each key block out in `one`, and their values from the start of vt. pa: the weights'
 * tiles. */
typedef struct {
    size_t b, kvh, lo0, kblocks, vblocks;
    uint16_t *kt, *one, *vt, *pa;
    int keep; /* a prefill's item: its blocks are kept for the next tile */
} tile_cache;

/* The same scores through the set's tile kernel (AMX) on a bf16 cache, for every item (decode
 * too, so a token's bits do not depend on how its step ran): q split once into bf16 hi, mid and
 * lo tiles, per 32 dims 16 rows of 32 values each, then 16 keys a call. qa: 49 hd bf16 of
 * scratch (the tiles, then a zero row standing for the keys past n). */
static void scores_tiles(const pxl_kernel_set *ks, size_t R, size_t hd, const float *q, const char *const *krows,
                         size_t off, size_t n, float *s, size_t lds, uint16_t *qa, tile_cache *tc, pf_queue *pf,
                         int npf) {
    uint16_t *zero = qa + 48 * hd;
    memset(zero, 0, hd * 2);
    split_tiles(R, hd / 32, q, hd, qa);
    ks->attn_config((int)R);
    for (size_t j0 = 0; j0 < n; j0 += 16) {
        for (int i = 0; i < npf; i++) pf_take(&pf[i], 16);
        uint16_t *kt = tc->keep ? tc->kt + j0 * hd : tc->one;
        if (!tc->keep || j0 / 16 >= tc->kblocks) {
            const char *kr[16];
            for (size_t jj = 0; jj < 16; jj++) kr[jj] = j0 + jj < n ? krows[j0 + jj] + off : (const char *)zero;
            ks->attn_kt(hd, kr, kt);
            if (tc->keep && j0 + 16 <= n) tc->kblocks = j0 / 16 + 1;
        }
        ks->attn_qk(hd, qa, kt, s + j0, lds);
    }
}

/* out (R, hd) = the weighted sums of the n values at vrows[j] + off through the set's tile
 * kernel, the weights w (R, lds) zero outside each row's keys up to a whole 32-key block: every
 * row sums the same blocks in the same order, so a decode row's bits are its prefill row's
 * (the blocks past its own keys add zeros). zero: hd bf16 zeros for the values past n. */
static void sums_tiles(const pxl_kernel_set *ks, size_t R, size_t hd, const float *w, size_t lds,
                       const char *const *vrows, size_t off, size_t n, float *out, uint16_t *zero,
                       tile_cache *tc, pf_queue *pv) {
    size_t nb = (n + 31) / 32;
    memset(zero, 0, hd * 2);
    split_tiles(R, nb, w, lds, tc->pa);
    if (!tc->keep) tc->b = SIZE_MAX, tc->vblocks = 0; /* a decode: vt is this item's, and forgotten */
    for (size_t b = tc->vblocks; b < nb; b++) {
        pf_take(pv, 32);
        const char *vr[32];
        for (size_t jj = 0; jj < 32; jj++) vr[jj] = b * 32 + jj < n ? vrows[b * 32 + jj] + off : (const char *)zero;
        ks->attn_vt(hd, vr, tc->vt + b * 32 * hd);
        if (tc->keep && b * 32 + 32 <= n) tc->vblocks = b + 1;
    }
    ks->attn_config((int)R);
    ks->attn_pv(hd, tc->pa, nb, tc->vt, out);
}

/* s[r * lds + j] = q_r . k_j for R query rows q (R, hd) fp32 and the n keys at krows[j] + off
 * (cache rows in dt), 16 keys at a time. kw: 17 rows of hd floats of scratch (bf16 keys
 * widened once for all R rows; the 17th stands for the keys past n); tc: the tile kernels' rows.
 * pf: npf queues of rows to prefetch, a row of each per key. */
PXL_CLONES static void scores_tile(int dt, size_t R, size_t hd, const float *q, const char *const *krows,
                                   size_t off, size_t n, float *s, size_t lds, float *kw, tile_cache *tc, pf_queue *pf,
                                   int npf) {
    const pxl_kernel_set *ks = pxl_kernels();
    if (ks->attn_qk && dt == PXL_BF16 && hd % 32 == 0 && R <= 16) {
        scores_tiles(ks, R, hd, q, krows, off, n, s, lds, (uint16_t *)kw, tc, pf, npf);
        return;
    }
    if (hd % 16) {
        for (size_t r = 0; r < R; r++)
            for (size_t j = 0; j < n; j++) s[r * lds + j] = dot_scalar(hd, q + r * hd, dt, krows[j] + off);
        return;
    }
    float *zero = kw + 16 * hd;
    memset(zero, 0, hd * sizeof(float));
    if (R <= 3) {
        if (dt == PXL_F32) {
            if (R == 3) scores_rows(PXL_F32, 3, hd, q, krows, off, n, s, lds, zero, pf, npf);
            else if (R == 2) scores_rows(PXL_F32, 2, hd, q, krows, off, n, s, lds, zero, pf, npf);
            else scores_rows(PXL_F32, 1, hd, q, krows, off, n, s, lds, zero, pf, npf);
        } else if (dt == PXL_BF16) {
            if (R == 3) scores_rows(PXL_BF16, 3, hd, q, krows, off, n, s, lds, zero, pf, npf);
            else if (R == 2) scores_rows(PXL_BF16, 2, hd, q, krows, off, n, s, lds, zero, pf, npf);
            else scores_rows(PXL_BF16, 1, hd, q, krows, off, n, s, lds, zero, pf, npf);
        } else {
            if (R == 3) scores_rows(PXL_F16, 3, hd, q, krows, off, n, s, lds, zero, pf, npf);
            else if (R == 2) scores_rows(PXL_F16, 2, hd, q, krows, off, n, s, lds, zero, pf, npf);
            else scores_rows(PXL_F16, 1, hd, q, krows, off, n, s, lds, zero, pf, npf);
        }
        return;
    }
    for (size_t j0 = 0; j0 < n; j0 += 16) {
        size_t cnt = n - j0 < 16 ? n - j0 : 16;
        const float *kp[16];
        for (int i = 0; i < npf; i++) pf_take(&pf[i], 16);
        for (size_t jj = 0; jj < 16; jj++) {
            size_t j = j0 + jj;
            if (jj >= cnt) {
                kp[jj] = zero;
            } else if (dt == PXL_F32) {
                kp[jj] = (const float *)(krows[j] + off);
            } else {
                for (size_t d = 0; d < hd; d += 16) {
                    f32x16 v = ld16(dt, krows[j] + off + d * 2);
                    memcpy(kw + jj * hd + d, &v, sizeof v);
                }
                kp[jj] = kw + jj * hd;
            }
        }
        for (size_t r = 0; r < R; r++) {
            f32x16 acc[16];
            for (int jj = 0; jj < 16; jj++) acc[jj] = (f32x16){0};
            for (size_t d = 0; d < hd; d += 16) {
                f32x16 qv = ld16(PXL_F32, q + r * hd + d);
#pragma GCC unroll 16
                for (int jj = 0; jj < 16; jj++) acc[jj] += qv * ld16(PXL_F32, kp[jj] + d);
            }
            f32x16 out = fold16x16(acc);
            if (cnt == 16) memcpy(s + r * lds + j0, &out, sizeof out);
            else for (size_t jj = 0; jj < cnt; jj++) s[r * lds + j0 + jj] = out[jj];
        }
    }
}

/* s[j] = exp(s[j] - max) / sum for j < n, the sum in 16 running lanes in a fixed order
 * (independent of where s sits in memory: vectorised loops may peel by alignment) */
PXL_CLONES static void softmax(float *s, size_t n) {
    float m = -FLT_MAX, part[16] = {0};
    size_t j = 0;
    f32x16 mv = splat16(-FLT_MAX); /* the max is exact in any order: 16 lanes, then across */
    for (; j + 16 <= n; j += 16) {
        f32x16 x = ld16(PXL_F32, s + j);
        i32x16 gt = x > mv;
        mv = (f32x16)((gt & (i32x16)x) | (~gt & (i32x16)mv));
    }
    for (int l = 0; l < 16; l++) m = mv[l] > m ? mv[l] : m;
    for (; j < n; j++) m = s[j] > m ? s[j] : m;
    j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) {
            s[j + l] = pxl_exp(s[j + l] - m);
            part[l] += s[j + l];
        }
    if (j < n) { /* the last 1..15: one more vector pass (prefill rows end anywhere, so every row
                  * has a tail, and pxl_exp one value at a time would dominate a short row) */
        size_t rem = n - j;
        float t[16];
        for (int l = 0; l < 16; l++) t[l] = (size_t)l < rem ? s[j + l] : m;
        for (int l = 0; l < 16; l++) {
            t[l] = pxl_exp(t[l] - m);
            part[l] += (size_t)l < rem ? t[l] : 0.0f; /* + 0 leaves a lane's sum as it was */
        }
        memcpy(s + j, t, rem * sizeof(float));
    }
    float sum = 0;
    for (int l = 0; l < 16; l++) sum += part[l];
    float inv = 1.0f / sum;
    for (j = 0; j < n; j++) s[j] *= inv;
}

/* out[r * hd + c .. + 16] += sum_j w[r * ldw + j] v_j[c .. + 16] for j in [j0, j1) in increasing
 * j, rows r0 .. r0 + CNT, continuing from out: each (row, 16 dims) is one accumulator, CNT of
 * them advance together so CNT independent FMA chains hide the latency, and each value
 * chunk is widened once for all of them. DT and CNT are constants in each instance. */
PXL_INLINE void wsum_group(const int DT, const int CNT, size_t hd, size_t c, const float *w, size_t ldw,
                           const char *const *vrows, size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv) {
    f32x16 acc[8];
    for (int i = 0; i < CNT; i++) acc[i] = ld16(PXL_F32, out + i * hd + c);
    size_t off = voff + c * (DT == PXL_F32 ? 4 : 2);
    for (size_t j = j0; j < j1; j++) {
        if ((j - j0) % 8 == 0) pf_take(pv, 8);
        f32x16 v = ld16(DT, vrows[j] + off);
        for (int i = 0; i < CNT; i++) acc[i] += splat16(w[i * ldw + j]) * v;
    }
    for (int i = 0; i < CNT; i++) memcpy(out + i * hd + c, &acc[i], sizeof acc[i]);
}

#define WSUM_CASES(DT)                                                                                                \
    switch (cnt) {                                                                                                     \
    case 8: wsum_group(DT, 8, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 7: wsum_group(DT, 7, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 6: wsum_group(DT, 6, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 5: wsum_group(DT, 5, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 4: wsum_group(DT, 4, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 3: wsum_group(DT, 3, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 2: wsum_group(DT, 2, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    default: wsum_group(DT, 1, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                               \
    }

/* The same sums for CNT <= 6 rows of a 64-dim head, keys outer: all CNT x 4 accumulators stay
 * in registers, so each value row is read once, whole, where the loop above walks the rows 4
 * times (a decode item's keys and values together can fill L1, so a later walk reloads them
 * from L2). Each accumulator still adds the same terms in increasing j, so the bits do not
 * change. */
PXL_INLINE void wsum_rows64(const int DT, const int CNT, const float *w, size_t ldw, const char *const *vrows,
                            size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv) {
    const size_t es = DT == PXL_F32 ? 4 : 2;
    f32x16 acc[6][4];
    if (DT == PXL_BF16) { /* accumulators in the order widen_pairs gives: dims 0, 2 .. 30 | 1, 3 .. 31 | ... */
        for (int i = 0; i < CNT; i++)
            for (int c = 0; c < 4; c += 2) {
                f32x16 a = ld16(PXL_F32, out + i * 64 + c * 16), b = ld16(PXL_F32, out + i * 64 + c * 16 + 16);
                acc[i][c] = SHUF(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                acc[i][c + 1] = SHUF(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            }
        for (size_t j = j0; j < j1; j++) {
            if ((j - j0) % 8 == 0) pf_take(pv, 8);
            const char *vr = vrows[j] + voff;
            f32x16 v[4];
            widen_pairs(vr, v), widen_pairs(vr + 64, v + 2);
            for (int i = 0; i < CNT; i++)
                for (int c = 0; c < 4; c++) acc[i][c] += splat16(w[i * ldw + j]) * v[c];
        }
        for (int i = 0; i < CNT; i++)
            for (int c = 0; c < 4; c += 2) {
                f32x16 a = SHUF(acc[i][c], acc[i][c + 1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                f32x16 b = SHUF(acc[i][c], acc[i][c + 1], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                memcpy(out + i * 64 + c * 16, &a, sizeof a), memcpy(out + i * 64 + c * 16 + 16, &b, sizeof b);
            }
        return;
    }
    for (int i = 0; i < CNT; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = ld16(PXL_F32, out + i * 64 + c * 16);
    for (size_t j = j0; j < j1; j++) {
        if ((j - j0) % 8 == 0) pf_take(pv, 8);
        const char *vr = vrows[j] + voff;
        f32x16 v[4] = {ld16(DT, vr), ld16(DT, vr + 16 * es), ld16(DT, vr + 32 * es), ld16(DT, vr + 48 * es)};
        for (int i = 0; i < CNT; i++)
            for (int c = 0; c < 4; c++) acc[i][c] += splat16(w[i * ldw + j]) * v[c];
    }
    for (int i = 0; i < CNT; i++)
        for (int c = 0; c < 4; c++) memcpy(out + i * 64 + c * 16, &acc[i][c], sizeof acc[i][c]);
}

#define WSUM64_CASES(DT)                                                                                              \
    switch (cnt) {                                                                                                     \
    case 6: wsum_rows64(DT, 6, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 5: wsum_rows64(DT, 5, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 4: wsum_rows64(DT, 4, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 3: wsum_rows64(DT, 3, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 2: wsum_rows64(DT, 2, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    default: wsum_rows64(DT, 1, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    }

/* out (R, hd) += the weighted sums of the values at vrows[j] + voff, j in [j0, j1), for R rows of
 * weights w (R, ldw); a row of pv prefetched per key */
PXL_CLONES static void weighted_sum(int dt, size_t R, size_t hd, const float *w, size_t ldw, const char *const *vrows,
                                    size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv) {
    if (hd % 16) { /* a head dim that is not a multiple of 16: the same sums, one at a time */
        for (size_t r = 0; r < R; r++)
            for (size_t d = 0; d < hd; d++) {
                float acc = out[r * hd + d];
                for (size_t j = j0; j < j1; j++)
                    acc += w[r * ldw + j] * row_at(dt, vrows[j] + voff, d);
                out[r * hd + d] = acc;
            }
        return;
    }
    const size_t group = hd == 64 ? 6 : 8; /* rows at a time: keys outer for a 64-dim head, else 16 dims outer */
    for (size_t r0 = 0; r0 < R; r0 += group) {
        size_t cnt = R - r0 < group ? R - r0 : group;
        const float *wr = w + r0 * ldw;
        float *o = out + r0 * hd;
        if (hd == 64) {
            if (dt == PXL_F32) WSUM64_CASES(PXL_F32)
            else if (dt == PXL_BF16) WSUM64_CASES(PXL_BF16)
            else WSUM64_CASES(PXL_F16)
        } else {
            for (size_t c = 0; c < hd; c += 16)
                if (dt == PXL_F32) WSUM_CASES(PXL_F32)
                else if (dt == PXL_BF16) WSUM_CASES(PXL_BF16)
                else WSUM_CASES(PXL_F16)
        }
    }
}

/* A step's items: per sequence, Hkv x tiles of query tokens. Items per KV head rather than one
 * decode item for all heads reading each cache row whole: that one is the slower of the two,
 * and smaller items balance the threads better. */
typedef struct {
    size_t tq; /* query tokens per tile */
    size_t items;
} seq_items;
static inline seq_items items_of(size_t qlen, size_t G, size_t Hkv) {
    size_t tq = qlen == 1 ? 1 : TILE_ROWS / G > 1 ? TILE_ROWS / G : 1;
    return (seq_items){tq, Hkv * ((qlen + tq - 1) / tq)};
}

/* n values of q in dt -> scale * q in fp32, and n fp32 results -> y in dt: loops of their own,
 * so each clone vectorises them (inside the unversioned team code they would run as SSE2) */
PXL_CLONES static void load_q(int dt, size_t n, float scale, const char *q, float *out) {
    if (dt == PXL_F32) for (size_t e = 0; e < n; e++) out[e] = scale * ((const float *)q)[e];
    else for (size_t e = 0; e < n; e++) out[e] = scale * pxl_bf16_to_f32(((const uint16_t *)q)[e]);
}
PXL_CLONES static void store_out(int dt, size_t n, const float *o, char *y) {
    if (dt == PXL_F32) memcpy(y, o, n * 4);
    else for (size_t e = 0; e < n; e++) ((uint16_t *)y)[e] = pxl_f32_to_bf16(o[e]);
}
/* n values of a token's k or v in dt -> a cache row in cdt (a bf16 cache under fp32 activations
 * rounds them to nearest even, as the model's bf16 Linear would have; an f16 one likewise, with
 * three more mantissa bits and a narrower range) */
PXL_CLONES static void store_row(int dt, int cdt, size_t n, const char *x, char *row) {
    if (dt == cdt) memcpy(row, x, n * (dt == PXL_F32 ? 4 : 2));
    else if (cdt == PXL_BF16)
        for (size_t e = 0; e < n; e++) ((uint16_t *)row)[e] = pxl_f32_to_bf16(((const float *)x)[e]);
    else if (cdt == PXL_F16 && dt == PXL_F32)
        for (size_t e = 0; e < n; e++) ((uint16_t *)row)[e] = pxl_f32_to_f16(((const float *)x)[e]);
    else if (cdt == PXL_F16)
        for (size_t e = 0; e < n; e++)
            ((uint16_t *)row)[e] = pxl_f32_to_f16(pxl_bf16_to_f32(((const uint16_t *)x)[e]));
    else
        for (size_t e = 0; e < n; e++) ((float *)row)[e] = pxl_bf16_to_f32(((const uint16_t *)x)[e]);
}

/* s[j] = cap * tanh(s[j] / cap): Gemma 2's soft-capped attention logits (q is pre-scaled, so
 * s is already the scaled logit, as in HF's eager attention) */
PXL_CLONES static void capped(float *s, size_t n, float cap) {
    float inv = 1.0f / cap;
    for (size_t j = 0; j < n; j++) s[j] = cap * tanhf(s[j] * inv);
}

/* one KV head's part of an item: tn tokens from position pos0 (rows i * G + g), keys lo0 .. lo0 + n
 * at krows / vrows + off; q rows of token i at qrows + i * H * hd, output rows likewise. The
 * scores take rows from the npf queues pf, the weighted sums from pv, to prefetch. Causal: token
 * i sees keys up to its own position; not causal: all n. */
static void tile_head(int dt, int cdt, size_t tn, size_t G, size_t H, size_t hd, size_t pos0, size_t lo0, size_t n,
                      size_t window, int causal, float scale, float softcap, const char *qrows,
                      const char *const *krows, const char *const *vrows, size_t off, char *yrows, float *qf,
                      float *of, float *s, size_t lds, float *kw, tile_cache *tc, pf_queue *pf, int npf, pf_queue *pv) {
    size_t es = dt == PXL_F32 ? 4 : 2, R = tn * G;
    for (size_t i = 0; i < tn; i++) /* row r = i * G + g; q pre-scaled */
        load_q(dt, G * hd, scale, qrows + i * H * hd * es, qf + i * G * hd);
    scores_tile(cdt, R, hd, qf, krows, off, n, s, lds, kw, tc, pf, npf);
    /* token i sees keys [a_i, e_i) of the tile's n: causal (or all n), and a window's start */
    size_t a_last = 0, e_first = n;
    for (size_t i = 0; i < tn; i++) {
        size_t pos = pos0 + i, lo = window && pos + 1 > window ? pos + 1 - window : 0;
        size_t a = lo - lo0, e = causal ? pos + 1 - lo0 : n;
        for (size_t g = 0; g < G; g++) {
            if (softcap > 0) capped(s + (i * G + g) * lds + a, e - a, softcap);
            softmax(s + (i * G + g) * lds + a, e - a);
        }
        a_last = a, e_first = i == 0 ? e : e_first;
    }
    /* the weighted sums on tiles: a prefill's, and decodes' too in batch-invariant mode (a
     * decode's few rows run faster in the loops below, whose sums are in another order). No
     * window: every item's keys start at 0, so the 32-key blocks of every row line up. */
    const pxl_kernel_set *ks = pxl_kernels();
    if (ks->attn_pv && cdt == PXL_BF16 && hd % 32 == 0 && R <= 16 && !window && (tc->keep || pxl_batch_invariant())) {
        size_t end = (n + 31) / 32 * 32;
        for (size_t i = 0; i < tn; i++) {
            size_t e = causal ? pos0 + i + 1 - lo0 : n;
            for (size_t g = 0; g < G; g++) memset(s + (i * G + g) * lds + e, 0, (end - e) * sizeof(float));
        }
        sums_tiles(ks, R, hd, s, lds, vrows, off, n, of, (uint16_t *)kw + 48 * hd, tc, pv);
        for (size_t i = 0; i < tn; i++) store_out(dt, G * hd, of + i * G * hd, yrows + i * H * hd * es);
        return;
    }
    memset(of, 0, R * hd * sizeof(float));
    for (size_t i = 0; i < tn; i++) { /* each row's keys in increasing order: its own first ... */
        size_t pos = pos0 + i, lo = window && pos + 1 > window ? pos + 1 - window : 0;
        size_t end = a_last < e_first ? a_last : pos + 1 - lo0; /* (a window shorter than the tile: all) */
        weighted_sum(cdt, G, hd, s + i * G * lds, lds, vrows, off, lo - lo0, end, of + i * G * hd, pv);
    }
    if (a_last < e_first) { /* ... then the keys every token sees, all rows together, then the rest */
        weighted_sum(cdt, R, hd, s, lds, vrows, off, a_last, e_first, of, pv);
        for (size_t i = 1; i < tn && causal; i++)
            weighted_sum(cdt, G, hd, s + i * G * lds, lds, vrows, off, e_first, pos0 + i + 1 - lo0, of + i * G * hd, pv);
    }
    for (size_t i = 0; i < tn; i++) store_out(dt, G * hd, of + i * G * hd, yrows + i * H * hd * es);
}

/* where item `it` sits: its sequence, KV head, query tokens and key range; *b / *first carry a
 * thread's scan from one item to the next (its items only ever increase) */
typedef struct {
    size_t b, qs, kvh, tok0, tn, pos0, lo0, n;
    int prefill; /* the sequence has more than one query token this step */
} item_pos;
static item_pos locate(size_t it, size_t *b, size_t *first, const int64_t *query_start_loc,
                       const int64_t *seq_lens, size_t G, size_t Hkv, size_t window, int causal) {
    size_t qs, qlen;
    seq_items si;
    for (;; *first += si.items, (*b)++) {
        qs = query_start_loc[*b], qlen = query_start_loc[*b + 1] - qs, si = items_of(qlen, G, Hkv);
        if (it < *first + si.items) break;
    }
    item_pos p = {.b = *b, .qs = qs, .prefill = qlen > 1};
    size_t ntiles = si.items / Hkv, tile = (it - *first) % ntiles;
    p.kvh = (it - *first) / ntiles;
    p.tok0 = tile * si.tq, p.tn = qlen - p.tok0 < si.tq ? qlen - p.tok0 : si.tq;
    p.pos0 = seq_lens[*b] - qlen + p.tok0; /* the tile's first position; its tokens follow */
    p.lo0 = window && p.pos0 + 1 > window ? p.pos0 + 1 - window : 0, p.n = p.pos0 + p.tn - p.lo0;
    if (!causal) p.n = seq_lens[*b] - p.lo0; /* every key of the sequence, the later tokens' too */
    return p;
}

/* tn query rows of `bytes` each, `stride` apart. (Not through prefetch_row: with a third
 * caller GCC no longer specialises its 128-byte case inside the score and value loops.) */
static void prefetch_q(size_t tn, const char *q, size_t stride, size_t bytes) {
    for (size_t i = 0; i < tn; i++)
        for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(q + i * stride + o);
}

/* Key and value row addresses of keys lo0 .. lo0 + filled of sequence b: the next item of the
 * same sequence (another KV head, a later tile) reuses them and adds only its new keys */
typedef struct {
    size_t b, lo0, filled;
    const char **k, **v;
} row_set;
typedef struct { /* where the rows live */
    const int64_t *block_tables;
    size_t max_blocks, block_size, row_bytes;
    const char *k_cache, *v_cache;
} row_src;
static inline int row_set_has(const row_set *r, size_t b, size_t lo0) { return r->b == b && r->lo0 == lo0; }
static void row_set_fill(row_set *r, const row_src *c, size_t b, size_t lo0, size_t n) {
    if (!row_set_has(r, b, lo0)) r->b = b, r->lo0 = lo0, r->filled = 0;
    const int64_t *table = c->block_tables + b * c->max_blocks;
    for (size_t j = r->filled, blk = (lo0 + j) / c->block_size, in = (lo0 + j) % c->block_size; j < n; j++) {
        size_t off = ((size_t)table[blk] * c->block_size + in) * c->row_bytes; /* (no division per key) */
        r->k[j] = c->k_cache + off, r->v[j] = c->v_cache + off;
        if (++in == c->block_size) in = 0, blk++;
    }
    r->filled = n > r->filled ? n : r->filled;
}

static void attention_team(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                           const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                           const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                           const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                           size_t window, int causal, void *y) {
    size_t es = dt == PXL_F32 ? 4 : 2, ces = cdt == PXL_F32 ? 4 : 2, row_bytes = Hkv * hd * ces, G = H / Hkv;
    size_t t0, t1;
    pxl_split(T, 1, &t0, &t1);
    for (size_t t = t0; t < t1; t++) { /* write this step's keys and values; slot < 0 marks padding */
        if (slot_mapping[t] < 0) continue;
        size_t at = (size_t)slot_mapping[t] * row_bytes;
        store_row(dt, cdt, Hkv * hd, (const char *)k + t * Hkv * hd * es, (char *)k_cache + at);
        store_row(dt, cdt, Hkv * hd, (const char *)v + t * Hkv * hd * es, (char *)v_cache + at);
    }
    size_t max_len = 0, items = 0;
    for (size_t b = 0; b < B; b++) {
        max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
        items += items_of(query_start_loc[b + 1] - query_start_loc[b], G, Hkv).items;
    }
    size_t R_max = TILE_ROWS > G ? TILE_ROWS : G, lds = (max_len + 31) / 32 * 32;
    /* per thread: two row sets' key / value row addresses (n each); q, out (R, hd); scores (R,
     * lds); 17 widened key rows, or the tile kernel's split q (48 hd bf16) and a zero row; with
     * tile kernels, their keys (lds + 16 rows of hd bf16), values (lds rows) and weights (lds / 32
     * blocks of 3 x 16 x 32 bf16), each from a whole line */
    const pxl_kernel_set *ks = pxl_kernels();
    size_t kt_n = (lds + 16) * hd, vt_n = ks->attn_pv ? lds * hd : 0, pa_n = ks->attn_pv ? lds * 48 : 0;
    size_t tile_bytes = ks->attn_kt && cdt == PXL_BF16 ? (kt_n + vt_n + pa_n) * 2 + 64 : 0;
    const char **rows =
        pxl_scratch(3, 4 * max_len * sizeof(char *) + (2 * R_max * hd + R_max * lds + 25 * hd) * 4 + tile_bytes);
    float *qf = (float *)(rows + 4 * max_len), *of = qf + R_max * hd, *s = of + R_max * hd, *kw = s + R_max * lds;
    uint16_t *kt = (uint16_t *)(((uintptr_t)(kw + 25 * hd) + 63) & ~(uintptr_t)63); /* whole lines a tile row */
    tile_cache tc = {.b = SIZE_MAX, .kt = kt, .one = kt + lds * hd, .vt = kt + kt_n, .pa = kt + kt_n + vt_n};
    row_set rs[2] = {{SIZE_MAX, 0, 0, rows, rows + max_len}, {SIZE_MAX, 0, 0, rows + 2 * max_len, rows + 3 * max_len}};
    const row_src src = {block_tables, max_blocks, block_size, row_bytes, (const char *)k_cache, (const char *)v_cache};
    size_t chunk = items / (8 * PXL_NTH()) + 1;
    chunk = chunk < CHUNK ? chunk : CHUNK;
    size_t nchunks = (items + chunk - 1) / chunk, b = 0, first = 0; /* the last item's sequence, its first item */
    int cur = 0;
#pragma omp barrier /* every row of this step is in the cache before anyone reads it */
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t c = 0; c < nchunks; c++) { /* chunks of items in (sequence, KV head, tile) order */
        size_t end = (c + 1) * chunk < items ? (c + 1) * chunk : items, unfetched = SIZE_MAX;
        for (size_t it = c * chunk; it < end; it++) {
            if (it < first) b = 0, first = 0; /* (a thread's items only ever increase; kept safe anyway) */
            item_pos p = locate(it, &b, &first, query_start_loc, seq_lens, G, Hkv, window, causal);
            if (!row_set_has(&rs[cur], p.b, p.lo0) && row_set_has(&rs[cur ^ 1], p.b, p.lo0)) cur ^= 1;
            row_set_fill(&rs[cur], &src, p.b, p.lo0, p.n);
            size_t off = p.kvh * hd * ces;
            /* queues: the scores' own look-ahead over the rows the item before did not fetch
             * (all of them for a chunk's first item, whose chunk may follow another thread's;
             * a later tile's older keys, which may have left L1), then the next item's keys
             * during the scores and its values during the weighted sums */
            pf_queue pf[3], pv = {0};
            int npf = 0;
            unfetched = unfetched < p.n ? unfetched : p.n;
            if (unfetched) {
                size_t kn = unfetched < PF_KEYS ? unfetched : PF_KEYS;
                pf[0] = (pf_queue){rs[cur].k, off, hd * ces, 0, unfetched};
                pf[1] = (pf_queue){rs[cur].v, off, hd * ces, 0, unfetched};
                pf_take(&pf[0], kn), pf_take(&pf[1], kn), npf = 2;
            }
            if (it + 1 < end) {
                size_t nb = b, nf = first;
                item_pos x = locate(it + 1, &nb, &nf, query_start_loc, seq_lens, G, Hkv, window, causal);
                int nx = row_set_has(&rs[cur], x.b, x.lo0) ? cur : cur ^ 1;
                row_set_fill(&rs[nx], &src, x.b, x.lo0, x.n);
                /* a later tile of this one's head reads the rows this one has just read, and more */
                size_t from = x.b == p.b && x.kvh == p.kvh && x.lo0 == p.lo0 ? p.n : 0;
                unfetched = from;
                pf[npf++] = (pf_queue){rs[nx].k, x.kvh * hd * ces, hd * ces, from, x.n};
                pv = (pf_queue){rs[nx].v, x.kvh * hd * ces, hd * ces, from, x.n};
                /* and a prefill tile's query rows: they come from L3 (a step's q is megabytes),
                 * and the next item would otherwise start by waiting on them */
                if (x.tn > 1) prefetch_q(x.tn, (const char *)q + ((x.qs + x.tok0) * H + x.kvh * G) * hd * es,
                                         H * hd * es, G * hd * es);
            }
            tc.keep = p.prefill; /* the next tile of a prefill's head reads its rows again */
            if (tc.keep && (tc.b != p.b || tc.kvh != p.kvh || tc.lo0 != p.lo0))
                tc.b = p.b, tc.kvh = p.kvh, tc.lo0 = p.lo0, tc.kblocks = tc.vblocks = 0;
            size_t head = (p.qs + p.tok0) * H + p.kvh * G; /* the first row's (token, head) */
            tile_head(dt, cdt, p.tn, G, H, hd, p.pos0, p.lo0, p.n, window, causal, scale, softcap,
                      (const char *)q + head * hd * es, rs[cur].k, rs[cur].v, off, (char *)y + head * hd * es, qf, of,
                      s, lds, kw, &tc, pf, npf, &pv);
            for (int i = 0; i < npf; i++) pf_take(&pf[i], SIZE_MAX); /* (rows the loops did not reach) */
            pf_take(&pv, SIZE_MAX);
        }
    }
}

void pxl_paged_attention_mask(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                              const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                              const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                              const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                              size_t window, int causal, void *y) {
    size_t max_len = 0;
    for (size_t b = 0; b < B; b++) max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
    int nth = T * Hkv * max_len < 4096 ? 1 : pxl_num_threads();
    window = causal ? window : 0; /* (no window on a bidirectional mask) */
    PXL_ON_TEAM(nth, attention_team(dt, cdt, T, B, H, Hkv, hd, q, k, v, k_cache, v_cache, block_size, slot_mapping,
                                    block_tables, max_blocks, seq_lens, query_start_loc, scale, softcap, window,
                                    causal, y));
}

void pxl_paged_attention(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                         const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                         const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                         const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                         size_t window, void *y) {
    pxl_paged_attention_mask(dt, cdt, T, B, H, Hkv, hd, q, k, v, k_cache, v_cache, block_size, slot_mapping,
                             block_tables, max_blocks, seq_lens, query_start_loc, scale, softcap, window, 1, y);
}
