/* Quantised GEMV on GGUF blocks, AVX2 + FMA + F16C: as the AVX-512 file with 8-wide
 * vectors, two rows sharing each load of x. */
#include <immintrin.h>

#include "pxl_kernels.h"

#define ROWS 2

static inline __m256 u8x8(const uint8_t *p) { /* 8 bytes -> 8 floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 s8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static void gemv_q4(int q41, size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum,
                    float *y) {
    size_t nb = K / PXL_QK, bs = q41 ? sizeof(pxl_block_q4_1) : sizeof(pxl_block_q4_0);
    const char *base = W;
    for (size_t n = n0; n < n1; n += ROWS) {
        int rows = n1 - n < ROWS ? (int)(n1 - n) : ROWS;
        __m256 acc[ROWS] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        float off[ROWS] = {0};
        for (size_t i = 0; i < nb; i++) {
            const float *xb = x + i * PXL_QK;
            for (int r = 0; r < rows; r++) {
                const char *blk = base + ((n + r) * nb + i) * bs;
                float d = _cvtsh_ss(*(const uint16_t *)blk);
                float m = q41 ? _cvtsh_ss(*(const uint16_t *)(blk + 2)) : -8 * d;
                __m128i b = _mm_loadu_si128((const __m128i *)(blk + (q41 ? 4 : 2))), mask = _mm_set1_epi8(0x0f);
                uint8_t q[32];
                _mm_storeu_si128((__m128i *)q, _mm_and_si128(b, mask));
                _mm_storeu_si128((__m128i *)(q + 16), _mm_and_si128(_mm_srli_epi16(b, 4), mask));
                __m256 dot = _mm256_mul_ps(u8x8(q), _mm256_loadu_ps(xb));
                dot = _mm256_fmadd_ps(u8x8(q + 8), _mm256_loadu_ps(xb + 8), dot);
                dot = _mm256_fmadd_ps(u8x8(q + 16), _mm256_loadu_ps(xb + 16), dot);
                dot = _mm256_fmadd_ps(u8x8(q + 24), _mm256_loadu_ps(xb + 24), dot);
                acc[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d), acc[r]);
                off[r] += m * xsum[i];
            }
        }
        for (int r = 0; r < rows; r++) y[n + r] = hsum(acc[r]) + off[r];
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
    for (size_t n = n0; n < n1; n++) {
        __m256 acc = _mm256_setzero_ps();
        for (size_t i = 0; i < nb; i++) {
            const pxl_block_q8_0 *b = B + n * nb + i;
            const float *xb = x + i * PXL_QK;
            __m256 dot = _mm256_mul_ps(s8x8(b->qs), _mm256_loadu_ps(xb));
            for (int j = 8; j < 32; j += 8) dot = _mm256_fmadd_ps(s8x8(b->qs + j), _mm256_loadu_ps(xb + j), dot);
            acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(_cvtsh_ss(b->d)), acc);
        }
        y[n] = hsum(acc);
    }
}

const pxl_gemv_q_fn pxl_gemv_q_avx2[PXL_NFMT] = {[PXL_Q8_0] = gemv_q8_0, [PXL_Q4_0] = gemv_q4_0, [PXL_Q4_1] = gemv_q4_1};
