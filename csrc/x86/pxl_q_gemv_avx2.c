/* Quantised GEMV on GGUF blocks with int8 activations (pxl_qx), AVX2: one 32-weight block
 * is one 256-bit vector of uint8 nibbles (or int8), multiplied with the token's int8 block
 * by vpmaddubsw + vpmaddwd into 8 exact int32 sums (pxl_q_gemv_avx512vnni.c builds this
 * file with one vpdpbusd instead), converted once and scaled by d_w * d_x. Four rows
 * share every load of x. Q8_0 is signed x signed: |w| times x with w's sign (vpsignb). */
#include <immintrin.h>

#include "pxl_kernels.h"

#ifdef PXL_VNNI
#define NAME(f) f##_avx512vnni
static inline __m256i dot_u8s8(__m256i w, __m256i x) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x); }
#else
#define NAME(f) f##_avx2
/* pairs of u8*s8 products fit int16: at most 2 * 128 * 127 */
static inline __m256i dot_u8s8(__m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}
#endif

#define ROWS 4
#ifndef QPF
#define QPF 16384 /* bytes ahead on each row: software prefetch far enough ahead to cover DRAM latency
                   * on every row stream (the hardware prefetchers alone leave a core well short of
                   * its bandwidth share) */
#endif

PXL_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
PXL_INLINE __m256i q4_unpack(const uint8_t *qs) { /* byte j: weight j low nibble, j + 16 high */
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0f));
}

/* R rows starting at row n; fmt Q8_0, Q4_0 or Q4_1 */
PXL_INLINE void rows_q(const int fmt, const int R, size_t n, size_t nb, const uint8_t *W, const pxl_qx *x, float *y) {
    const size_t bs = fmt == PXL_Q8_0 ? sizeof(pxl_block_q8_0) : fmt == PXL_Q4_0 ? sizeof(pxl_block_q4_0)
                                                                                 : sizeof(pxl_block_q4_1);
    __m256 acc[ROWS];
    float off[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), off[r] = 0;
    for (size_t i = 0; i < nb; i++) {
        __m256i xq = _mm256_loadu_si256((const __m256i *)(x->q + i * PXL_QK));
        float dx = x->d[i], c = x->c[i], e = x->e[i];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = W + ((n + r) * nb + i) * bs;
            _mm_prefetch((const char *)blk + QPF, _MM_HINT_T0);
            float dw = _cvtsh_ss(*(const uint16_t *)blk);
            __m256i dot;
            if (fmt == PXL_Q8_0) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2));
                dot = dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(xq, w));
            } else {
                dot = dot_u8s8(q4_unpack(blk + (fmt == PXL_Q4_1 ? 4 : 2)), xq);
                off[r] += (fmt == PXL_Q4_1 ? _cvtsh_ss(*(const uint16_t *)(blk + 2)) * c : 0.0f) + dw * e;
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * dx), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[n + r] = hsum(acc[r]) + off[r];
}

PXL_INLINE void gemv(const int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    size_t n = n0, nb = K / PXL_QK;
    for (; n + ROWS <= n1; n += ROWS) rows_q(fmt, ROWS, n, nb, W, x, y);
    for (; n < n1; n++) rows_q(fmt, 1, n, nb, W, x, y);
}
static void gemv_q8_0(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv(PXL_Q8_0, n0, n1, K, W, x, y);
}
static void gemv_q4_0(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv(PXL_Q4_0, n0, n1, K, W, x, y);
}
static void gemv_q4_1(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv(PXL_Q4_1, n0, n1, K, W, x, y);
}

const pxl_gemv_q_fn NAME(pxl_gemv_q)[PXL_NFMT] = {
    [PXL_Q8_0] = gemv_q8_0, [PXL_Q4_0] = gemv_q4_0, [PXL_Q4_1] = gemv_q4_1};
