/* Repacked quantised blocks (PXL_Q8_0R / Q4_0R / Q4_1R, 16 rows a block: pxl_qrepack.c) times
 * up to PXL_QR_BF16_T tokens of bf16 x, for decode under PXL_QX_BF16. The weights are not rounded:
 * a block's quants are small integers, which bf16 holds exactly, so vdpbf16ps sums q * x exactly
 * per pair into fp32, and the block's scale and offset apply afterwards in fp32:
 *   y_row += d * sum_j q_j x_j + m * sum_j x_j      (sum_j x_j: the block's sum, given)
 * A quant becomes a bf16 by its bits alone: 0x4300 | n is 128 + n for n < 128 (ulp 1 in
 * [128, 256)), so a nibble costs one AND-OR. The 128 (and Q4_0's 8, Q8_0's stored +128) come
 * back out through the block sum: Q4: sum (128 + q) x - 128 sum x. Q8_0 stores u = q + 128 as
 * two nibbles u = 16 h + l: 0x4500 | h is 16 (128 + h), so one accumulator takes
 * sum (128 + l) x + sum 16 (128 + h) x = sum u x + 2176 sum x. The larger intermediate sums
 * cost fp32 rounding of ~2^-24 x 2304 |x| per block, far below bf16's rounding of x itself.
 *
 * One 64-byte line holds 4 consecutive quants of each of 16 rows (rows 0-7 in its first half).
 * Widened to words, lane k of the product holds row k/2's quants 2 (k % 2) and 2 (k % 2) + 1,
 * so x enters as one 64-bit broadcast of its 4 bf16 values; each row ends with two lanes,
 * added once per call. */
#include <immintrin.h>

#include "pxl_kernels.h"

#define G PXL_QR_ROWS /* rows per repacked block */

/* x's 4 bf16 values at p, broadcast as the pattern each 64-bit lane pair multiplies */
PXL_INLINE __m512i x4(const uint16_t *p) { return _mm512_set1_epi64(*(const long long *)p); }

PXL_INLINE void group(int fmt, const int T, size_t nb, const uint8_t *grp, size_t gbs, const uint16_t *x,
                      size_t ldx, const float *sx, size_t ldsx, float *y, size_t ldy, __mmask16 valid) {
    const size_t qa = fmt == PXL_Q4_1 ? 4 * G : 2 * G; /* the quants, after d[16] (and m[16]) */
    const __m512i low = _mm512_set1_epi16(0x000f), b128 = _mm512_set1_epi16(0x4300),
                  b2048 = _mm512_set1_epi16(0x4500);
    /* d per lane of a product: rows 0-7 (lanes 2r, 2r + 1), rows 8-15 */
    const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
    __m512 y0[PXL_QR_BF16_T], y1[PXL_QR_BF16_T], ym[PXL_QR_BF16_T];
    for (int t = 0; t < T; t++) y0[t] = y1[t] = ym[t] = _mm512_setzero_ps();
    for (size_t i = 0; i < nb; i++) {
        const uint8_t *blk = grp + i * gbs, *q = blk + qa;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk)), off;
        if (fmt == PXL_Q4_1) /* (m - 128 d: exact unless m and d lie 2^13 apart) */
            off = _mm512_fnmadd_ps(d, _mm512_set1_ps(128.0f), _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 2 * G))));
        else /* Q4_0: -(8 + 128) d; Q8_0: -(128 + 2176) d (exact: d has 11 bits) */
            off = _mm512_mul_ps(d, _mm512_set1_ps(fmt == PXL_Q4_0 ? -136.0f : -2304.0f));
        __m512 acc0[PXL_QR_BF16_T], acc1[PXL_QR_BF16_T];
        for (int t = 0; t < T; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
        const uint16_t *xb = x + i * PXL_QK;
        for (int p = 0; p < (fmt == PXL_Q8_0 ? 8 : 4); p++) {
            for (int h = 0; h < 2; h++) { /* (widened from memory: no extract on the shuffle port) */
                __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + 64 * p + 32 * h)));
                /* lo: the low nibbles, 128 + n; hi: the high ones, as 128 + n (Q4) or 16 (128 + n) (Q8_0) */
                __m512i lo = _mm512_ternarylogic_epi32(w, low, b128, 0xEA); /* (w & low) | b128 */
                __m512i hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), fmt == PXL_Q8_0 ? b2048 : b128);
                for (int t = 0; t < T; t++) {
                    const uint16_t *xt = xb + t * ldx;
                    /* Q8_0 line p: quants 4p .. 4p + 3 in both nibbles; Q4: low 8p .., high 8p + 4 .. */
                    __m512i xl = x4(xt + (fmt == PXL_Q8_0 ? 4 * p : 8 * p)), xh = fmt == PXL_Q8_0 ? xl : x4(xt + 8 * p + 4);
                    __m512 *acc = h ? &acc1[t] : &acc0[t];
                    *acc = _mm512_dpbf16_ps(*acc, (__m512bh)lo, (__m512bh)xl);
                    *acc = _mm512_dpbf16_ps(*acc, (__m512bh)hi, (__m512bh)xh);
                }
            }
        }
        __m512 dlo = _mm512_permutexvar_ps(dup_lo, d), dhi = _mm512_permutexvar_ps(dup_hi, d);
        for (int t = 0; t < T; t++) {
            y0[t] = _mm512_fmadd_ps(acc0[t], dlo, y0[t]);
            y1[t] = _mm512_fmadd_ps(acc1[t], dhi, y1[t]);
            ym[t] = _mm512_fmadd_ps(off, _mm512_set1_ps(sx[t * ldsx + i]), ym[t]);
        }
    }
    /* row r: its two lanes (2r, 2r + 1 of y0 for r < 8, of y1 for the rest) plus its offset sum */
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (int t = 0; t < T; t++) {
        __m512 s = _mm512_add_ps(_mm512_permutex2var_ps(y0[t], even, y1[t]), _mm512_permutex2var_ps(y0[t], odd, y1[t]));
        _mm512_mask_storeu_ps(y + t * ldy, valid, _mm512_add_ps(s, ym[t]));
    }
}

PXL_INLINE void rows_for(int fmt, const int T, size_t rows, size_t K, const void *W, const uint16_t *x, size_t ldx,
                         const float *sx, float *y, size_t ldy) {
    const size_t nb = K / PXL_QK, gbs = G * pxl_row_bytes(fmt, PXL_QK);
    for (size_t n = 0; n < rows; n += G) {
        __mmask16 valid = rows - n >= G ? 0xffff : (__mmask16)((1u << (rows - n)) - 1);
        group(fmt, T, nb, (const uint8_t *)W + (n / G) * nb * gbs, gbs, x, ldx, sx, nb, y + n, ldy, valid);
    }
}

/* T <= PXL_QR_BF16_T tokens: x (T, ldx) bf16, sx (T, K/32) each block's sum of those bf16 values,
 * y[t * ldy + n] for n < rows; each token's sums are the same whatever T */
void pxl_gemv_qr_bf16_avx512bf16(int fmt, size_t T, size_t rows, size_t K, const void *W, const uint16_t *x,
                                 size_t ldx, const float *sx, float *y, size_t ldy) {
    fmt = PXL_QBASE(fmt);
#define PXL_QR_BF16_CASE(f, t) rows_for(f, t, rows, K, W, x, ldx, sx, y, ldy)
#define PXL_QR_BF16_FMT(f)          \
    switch (T) {                    \
    case 1: PXL_QR_BF16_CASE(f, 1); break; \
    case 2: PXL_QR_BF16_CASE(f, 2); break; \
    case 3: PXL_QR_BF16_CASE(f, 3); break; \
    default: PXL_QR_BF16_CASE(f, 4); break; \
    }
    if (fmt == PXL_Q8_0) PXL_QR_BF16_FMT(PXL_Q8_0)
    else if (fmt == PXL_Q4_0) PXL_QR_BF16_FMT(PXL_Q4_0)
    else PXL_QR_BF16_FMT(PXL_Q4_1)
#undef PXL_QR_BF16_FMT
#undef PXL_QR_BF16_CASE
}
