/* Quantised GEMV on GGUF blocks, AVX-512F: each 32-weight block is widened in registers
 * (nibbles or int8 -> int32 -> fp32), multiplied with x and scaled once by d; four rows
 * share every load of x. Q4_0 is Q4_1 with m = -8d: y = sum_b d*dot(q, x_b) + m*sum(x_b). */
#include <immintrin.h>

#include "pxl_kernels.h"

#define ROWS 4

static inline void q4_widen(const uint8_t *qs, __m512 *lo, __m512 *hi) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0f);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
}

static void gemv_q4(int q41, size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum,
                    float *y) {
    size_t nb = K / PXL_QK, bs = q41 ? sizeof(pxl_block_q4_1) : sizeof(pxl_block_q4_0);
    const char *base = W;
    size_t n = n0;
    for (; n < n1; n += ROWS) {
        int rows = n1 - n < ROWS ? (int)(n1 - n) : ROWS;
        __m512 acc[ROWS];
        float off[ROWS] = {0};
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (size_t i = 0; i < nb; i++) {
            __m512 xl = _mm512_loadu_ps(x + i * PXL_QK), xh = _mm512_loadu_ps(x + i * PXL_QK + 16);
            for (int r = 0; r < rows; r++) {
                const char *blk = base + ((n + r) * nb + i) * bs;
                uint16_t dh = *(const uint16_t *)blk;
                float d = _cvtsh_ss(dh);
                float m = q41 ? _cvtsh_ss(*(const uint16_t *)(blk + 2)) : -8 * d;
                __m512 lo, hi;
                q4_widen((const uint8_t *)blk + (q41 ? 4 : 2), &lo, &hi);
                __m512 dot = _mm512_fmadd_ps(hi, xh, _mm512_mul_ps(lo, xl));
                acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(d), acc[r]);
                off[r] += m * xsum[i];
            }
        }
        for (int r = 0; r < rows; r++) y[n + r] = _mm512_reduce_add_ps(acc[r]) + off[r];
    }
}

static void gemv_q4_0(size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum, float *y) {
    gemv_q4(0, n0, n1, K, W, x, xsum, y);
}
static void gemv_q4_1(size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum, float *y) {
    gemv_q4(1, n0, n1, K, W, x, xsum, y);
}

static void gemv_q8_0(size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum, float *y) {
    (void)xsum;
    size_t nb = K / PXL_QK;
    const pxl_block_q8_0 *B = W;
    for (size_t n = n0; n < n1; n += ROWS) {
        int rows = n1 - n < ROWS ? (int)(n1 - n) : ROWS;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (size_t i = 0; i < nb; i++) {
            __m512 xl = _mm512_loadu_ps(x + i * PXL_QK), xh = _mm512_loadu_ps(x + i * PXL_QK + 16);
            for (int r = 0; r < rows; r++) {
                const pxl_block_q8_0 *b = B + (n + r) * nb + i;
                __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)b->qs)));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->qs + 16))));
                __m512 dot = _mm512_fmadd_ps(hi, xh, _mm512_mul_ps(lo, xl));
                acc[r] = _mm512_fmadd_ps(dot, _mm512_set1_ps(_cvtsh_ss(b->d)), acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) y[n + r] = _mm512_reduce_add_ps(acc[r]);
    }
}

const pxl_gemv_q_fn pxl_gemv_q_avx512[PXL_NFMT] = {
    [PXL_Q8_0] = gemv_q8_0, [PXL_Q4_0] = gemv_q4_0, [PXL_Q4_1] = gemv_q4_1};
