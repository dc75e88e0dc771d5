/* Paged attention's scores and softmax for one work item's query rows (pxl_attention.c): 16
 * keys at a time, each (row, key) a 16-lane dot product along the head dim folded by a
 * transpose-add tree; with tile kernels on a bf16 cache, on tiles with q split into three exact
 * bf16 parts. */
#include <float.h>
#include <math.h>

#include "pxl_attention.h"

/* The score order: lane l of a (row, key) accumulator sums q[d] k[d] over d = l, l + 16, ...
 * in increasing d; then the 16 lanes fold in halves (l + 8, then + 4, + 2, + 1).
 * fold16x16 does that fold for 16 accumulators at once: out[k] = fold(a[k]). Each step adds
 * the same lane pairs as folding one vector alone (only the packing differs), so the bits
 * are those of a per-key fold. */
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

/* the scalar form of the same order, for a head dim that is not a multiple of 16 */
static float dot_scalar(size_t hd, const float *q, int dt, const void *k) {
    float acc[16] = {0};
    for (size_t d = 0; d < hd; d++) acc[d % 16] += q[d] * row_at(dt, k, d);
    for (int w = 8; w; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* pxl_attn_scores's sums for RN <= 3 rows (a decode token's heads), keys widened in registers: 8
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
PXL_CLONES void pxl_attn_split_tiles(size_t R, size_t chunks, const float *x, size_t ld, uint16_t *out) {
    for (size_t c = 0; c < chunks; c++)
        for (size_t r = 0; r < R; r++) {
            const float *a = x + r * ld + c * 32;
            uint16_t *hi = out + c * 3 * 16 * 32 + r * 32;
            for (int d = 0; d < 32; d++) split3(a[d], hi + d, hi + 16 * 32 + d, hi + 2 * 16 * 32 + d);
        }
}

/* The same scores through the set's tile kernel (AMX) on a bf16 cache, for every item (decode
 * too, so a token's bits do not depend on how its step ran): q split once into bf16 hi, mid and
 * lo tiles, per 32 dims 16 rows of 32 values each, then 16 keys a call. qa: 49 hd bf16 of
 * scratch (the tiles, then a zero row standing for the keys past n). */
static void scores_tiles(const pxl_kernel_set *ks, size_t R, size_t hd, const float *q, const char *const *krows,
                         size_t off, size_t n, float *s, size_t lds, uint16_t *qa, tile_cache *tc, pf_queue *pf,
                         int npf) {
    uint16_t *zero = qa + 48 * hd;
    memset(zero, 0, hd * 2);
    pxl_attn_split_tiles(R, hd / 32, q, hd, qa);
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

/* s[r * lds + j] = q_r . k_j for R query rows q (R, hd) fp32 and the n keys at krows[j] + off
 * (cache rows in dt), 16 keys at a time. kw: 17 rows of hd floats of scratch (bf16 keys
 * widened once for all R rows; the 17th stands for the keys past n); tc: the tile kernels' rows.
 * pf: npf queues of rows to prefetch, a row of each per key. */
PXL_CLONES void pxl_attn_scores(int dt, size_t R, size_t hd, const float *q, const char *const *krows,
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
PXL_CLONES void pxl_attn_softmax(float *s, size_t n) {
    float m = -FLT_MAX, part[16] = {0};
    size_t j = 0;
    f32x16 mv = pxl_splat16(-FLT_MAX); /* the max is exact in any order: 16 lanes, then across */
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
