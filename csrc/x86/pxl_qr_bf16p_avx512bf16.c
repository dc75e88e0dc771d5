/* Repacked quantised blocks (PXL_Q8_0R / Q4_0R / Q4_1R, 16 rows a block: pxl_qrepack.c)
 * dequantised straight into one packed bf16 panel, [K/2][32][2], for a prefill on sets whose
 * bf16 GEMM outruns their int8 dot products (AMX tiles). A repacked block's 64-byte line holds 4
 * consecutive weights of each of its 16 rows, which is two K pairs of the panel's layout: the
 * even 16-bit words of the line are the first pair of every row, the odd words the second. So a
 * line becomes two 64-byte panel rows with one word permute, widenings and one multiply-add
 * per 16 weights, where the portable route (pxl_dequant_rows_qr, then the panel packing) walks
 * weight by weight. Same arithmetic: w = d q + m as a product then a sum (not fused), rounded to
 * bf16 to nearest even, so both routes give the same bits. */
#include <immintrin.h>

#include "pxl_kernels.h"

#define G PXL_QR_ROWS /* rows per repacked block */

/* the panel's rows for K pairs kp and kp + 1 from one line of 16 rows x 4 quants (bytes 4r ..
 * 4r + 3: row r's weights 2 kp .. 2 kp + 3), w = d q + m per row; features 16 g .. 16 g + 15
 * (rows past `valid` stay zero, as the portable packing leaves them) */
PXL_INLINE void two_pairs(__m512i line, __m512 dlo, __m512 dhi, __m512 mlo, __m512 mhi, int add_m, int minus128,
                          __mmask32 valid, uint16_t *panel, size_t kp, int g) {
    /* words 0-15: the even words (pair kp of rows 0-15), 16-31: the odd ones (pair kp + 1) */
    const __m512i split = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24,
                                           22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    __m512i w = _mm512_permutexvar_epi16(split, line);
    for (int h = 0; h < 2; h++) {
        __m256i pair = h ? _mm512_extracti64x4_epi64(w, 1) : _mm512_castsi512_si256(w); /* 16 rows x 2 bytes */
        __m512i q0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(pair));      /* rows 0-7, both weights */
        __m512i q1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(pair, 1)); /* rows 8-15 */
        if (minus128) q0 = _mm512_sub_epi32(q0, _mm512_set1_epi32(128)), q1 = _mm512_sub_epi32(q1, _mm512_set1_epi32(128));
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), dlo), w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), dhi);
        if (add_m) w0 = _mm512_add_ps(w0, mlo), w1 = _mm512_add_ps(w1, mhi);
        __m512i b = _mm512_maskz_mov_epi16(valid, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
        _mm512_storeu_si512(panel + ((kp + h) * PXL_PANEL + 16 * g) * 2, b);
    }
}

/* (the product and the sum stay two roundings, as in the portable dequantisation) */
__attribute__((optimize("fp-contract=off"))) void pxl_qr_bf16p_avx512bf16(int fmt, const void *W, size_t n0,
                                                                          size_t rows, size_t K, uint16_t *panel) {
    fmt = PXL_QBASE(fmt);
    const size_t nb = K / PXL_QK, bs = pxl_row_bytes(fmt, PXL_QK), gbs = G * bs;
    const size_t qa = fmt == PXL_Q4_1 ? 4 * G : 2 * G; /* the quants, after d[16] (and m[16]) */
    /* d per weight of a pair: rows 0-7 (lanes 2r, 2r + 1), rows 8-15 */
    const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
    for (int g = 0; g < 2; g++) {
        const size_t n = n0 + (size_t)G * g;
        const int nv = rows > (size_t)G * g ? (int)(rows - (size_t)G * g < G ? rows - (size_t)G * g : G) : 0;
        const __mmask32 valid = nv == G ? 0xffffffffu : (__mmask32)((1u << 2 * nv) - 1);
        if (!nv) { /* the panel's second half past the last row */
            for (size_t kp = 0; kp < K / 2; kp++)
                _mm512_storeu_si512(panel + (kp * PXL_PANEL + 16 * g) * 2, _mm512_setzero_si512());
            continue;
        }
        const uint8_t *grp = (const uint8_t *)W + (n / G) * nb * gbs;
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = grp + i * gbs;
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk)), m = _mm512_setzero_ps();
            if (fmt == PXL_Q4_1) m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 2 * G)));
            if (fmt == PXL_Q4_0) m = _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
            __m512 dlo = _mm512_permutexvar_ps(dup_lo, d), dhi = _mm512_permutexvar_ps(dup_hi, d);
            __m512 mlo = _mm512_permutexvar_ps(dup_lo, m), mhi = _mm512_permutexvar_ps(dup_hi, m);
            const uint8_t *q = blk + qa;
            const size_t kp0 = i * PXL_QK / 2;
            if (fmt == PXL_Q8_0) { /* line p: weights 4p .. 4p + 3 of each row */
                for (int p = 0; p < 8; p++)
                    two_pairs(_mm512_loadu_si512(q + 64 * p), dlo, dhi, mlo, mhi, 0, 1, valid, panel, kp0 + 2 * p, g);
                continue;
            }
            for (int p = 0; p < 4; p++) { /* line p: low nibbles weights 8p .. 8p + 3, high 8p + 4 .. */
                __m512i v = _mm512_loadu_si512(q + 64 * p), lo = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f));
                two_pairs(lo, dlo, dhi, mlo, mhi, 1, 0, valid, panel, kp0 + 4 * p, g);
                two_pairs(hi, dlo, dhi, mlo, mhi, 1, 0, valid, panel, kp0 + 4 * p + 2, g);
            }
        }
    }
}
