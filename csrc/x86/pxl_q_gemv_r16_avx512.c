/* Quantised GEMV on blocks repacked 16 rows at a time (PXL_Q*R, core/pxl_qrepack.c), AVX-512.
 * A 64-byte vector holds 4 weights of each of 16 rows, so one vpdpbusd (or vpmaddubsw +
 * vpmaddwd without VNNI) advances all 16 rows' integer dot products by 4 weights against x's
 * 4 int8 broadcast to every lane; a block's 16 scales are one vector (vcvtph2ps), and the
 * scale and offset terms are three FMAs for 16 rows. No horizontal sums, no scalar work
 * per row. Up to PXL_QR_T tokens share every weight load (batched decode); each token's
 * lanes see the same instructions whatever T is, so results are batch-invariant.
 * pxl_q_gemv_r16_avx512vnni.c builds this file with VNNI. */
#include <immintrin.h>

#include "pxl_kernels.h"

#ifdef PXL_VNNI
#define NAME(f) f##_avx512vnni
/* acc + 4-weight dot products of 16 rows (u8 w) against x's 4 int8 (every lane) */
static inline __m512i dot4(int fmt, __m512i acc, __m512i w, __m512i x) {
    (void)fmt;
    return _mm512_dpbusd_epi32(acc, w, x);
}
#else
#define NAME(f) f##_avx512
/* vpmaddubsw's u8 x s8 pair sums in int16 cannot saturate for nibbles (2 * 15 * 127); Q8_0's
 * stored w + 128 (0 .. 255) would (2 * 255 * 127), so it goes as two nibbles, 16 hi + lo */
static inline __m512i dot4(int fmt, __m512i acc, __m512i w, __m512i x) {
    if (fmt != PXL_Q8_0)
        return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512i hi = _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 4), low4), x);
    __m512i lo = _mm512_maddubs_epi16(_mm512_and_si512(w, low4), x);
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(hi, _mm512_set1_epi16(16)));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(lo, _mm512_set1_epi16(1)));
}
#endif

#define G PXL_QR_ROWS /* rows per repacked block: one zmm of fp32 lanes, one mask bit each */
_Static_assert(PXL_QR_ROWS == 16, "a repacked block's rows fill one zmm");
#define QPF (16 << 10) /* bytes ahead in the weight stream, into L2 (pxl_qkr_avx512vnni.c says why) */

PXL_INLINE void rows_qr(const int fmt, const int T, size_t rows, size_t K, const uint8_t *W, const pxl_qx *x,
                        float *y, size_t ldy) {
    const size_t nb = K / PXL_QK, nv = fmt == PXL_Q8_0 ? 8 : 4; /* 64-byte quant vectors a block */
    const size_t qa = fmt == PXL_Q4_1 ? 4 * G : 2 * G, gbs = qa + nv * 64;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (size_t r0 = 0; r0 < rows; r0 += G) {
        const uint8_t *g = W + (r0 / G) * nb * gbs;
        __m512 acc[PXL_QR_T], accm[PXL_QR_T];
        for (int t = 0; t < T; t++) acc[t] = accm[t] = _mm512_setzero_ps();
        for (size_t i = 0; i < nb; i++, g += gbs) {
            for (size_t l = 0; l < gbs; l += 64) _mm_prefetch((const char *)g + QPF + l, _MM_HINT_T1);
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)g));
            __m512 mw = fmt == PXL_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g + 2 * G)))
                                        : _mm512_setzero_ps();
            __m512i w[8]; /* w[j]: weights 4j .. 4j + 3 of the 16 rows, matching x's int32 j */
            for (size_t p = 0; p < nv; p++) {
                __m512i v = _mm512_loadu_si512(g + qa + 64 * p);
                if (fmt == PXL_Q8_0) w[p] = v;
                else w[2 * p] = _mm512_and_si512(v, low4), w[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
            for (int t = 0; t < T; t++) {
                const int32_t *xq = (const int32_t *)(x[t].q + i * PXL_QK);
                __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512(); /* two chains */
                for (int j = 0; j < 8; j += 2) {
                    d0 = dot4(fmt, d0, w[j], _mm512_set1_epi32(xq[j]));
                    d1 = dot4(fmt, d1, w[j + 1], _mm512_set1_epi32(xq[j + 1]));
                }
                __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1));
                if (fmt == PXL_Q8_0) { /* (dot + e) is the exact signed integer dot */
                    __m512 s = _mm512_add_ps(dot, _mm512_set1_ps(x[t].e[i]));
                    acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(x[t].d[i])), s, acc[t]);
                } else {
                    __m512 s = _mm512_fmadd_ps(dot, _mm512_set1_ps(x[t].d[i]), _mm512_set1_ps(x[t].e[i]));
                    acc[t] = _mm512_fmadd_ps(dw, s, acc[t]);
                    if (fmt == PXL_Q4_1) accm[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[t].c[i]), accm[t]);
                }
            }
        }
        __mmask16 keep = rows - r0 >= G ? 0xffff : (__mmask16)((1u << (rows - r0)) - 1);
        for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + t * ldy + r0, keep, _mm512_add_ps(acc[t], accm[t]));
    }
}

#define TOKENS(fmt)                                                                                         \
    switch (T) {                                                                                            \
    case 1: rows_qr(fmt, 1, rows, K, W, x, y, ldy); break;                                                  \
    case 2: rows_qr(fmt, 2, rows, K, W, x, y, ldy); break;                                                  \
    case 3: rows_qr(fmt, 3, rows, K, W, x, y, ldy); break;                                                  \
    case 4: rows_qr(fmt, 4, rows, K, W, x, y, ldy); break;                                                  \
    case 5: rows_qr(fmt, 5, rows, K, W, x, y, ldy); break;                                                  \
    case 6: rows_qr(fmt, 6, rows, K, W, x, y, ldy); break;                                                  \
    case 7: rows_qr(fmt, 7, rows, K, W, x, y, ldy); break;                                                  \
    default: rows_qr(fmt, 8, rows, K, W, x, y, ldy); break;                                                 \
    }
static void qr_q8_0(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    TOKENS(PXL_Q8_0)
}
static void qr_q4_0(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    TOKENS(PXL_Q4_0)
}
static void qr_q4_1(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    TOKENS(PXL_Q4_1)
}

const pxl_gemv_qr_fn NAME(pxl_gemv_qr)[PXL_NFMT] = {
    [PXL_Q8_0] = qr_q8_0, [PXL_Q4_0] = qr_q4_0, [PXL_Q4_1] = qr_q4_1};
