/* fp32 and bf16 dot-product GEMM tiles, AVX2 + FMA: up to 4 tokens x 2 features (1 x 4
 * for GEMV) in ymm accumulators, 8 floats of K per step; bf16 is widened by a 16-bit
 * shift (exact), masked loads for the K tail. */
#include <immintrin.h>

#include "pxl_kernels.h"

static inline __m256i tail_mask(size_t r) { /* lanes < r set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline __m256 ld_f32(const void *p, size_t k, size_t r) {
    return r >= 8 ? _mm256_loadu_ps((const float *)p + k) : _mm256_maskload_ps((const float *)p + k, tail_mask(r));
}
static inline __m256 ld_bf16(const void *p, size_t k, size_t r) {
    __m128i h;
    if (r >= 8) {
        h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + k));
    } else {
        uint16_t tmp[8] = {0};
        memcpy(tmp, (const uint16_t *)p + k, r * 2);
        h = _mm_loadu_si128((const __m128i *)tmp);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

PXL_INLINE void tile(const int BF16, const int RM, const int RN, size_t K, const void *X, size_t ldx, const void *W,
                     size_t ldw, float *Y, size_t ldy) {
    const size_t es = BF16 ? 2 : 4;
    __m256 acc[4][4];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm256_setzero_ps();
    for (size_t k = 0; k < K; k += 8) {
        size_t r = K - k;
        __m256 w[4];
        for (int j = 0; j < RN; j++) {
            const char *row = (const char *)W + j * ldw * es;
            w[j] = BF16 ? ld_bf16(row, k, r) : ld_f32(row, k, r);
        }
        for (int i = 0; i < RM; i++) {
            const char *row = (const char *)X + i * ldx * es;
            __m256 x = BF16 ? ld_bf16(row, k, r) : ld_f32(row, k, r);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm256_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) Y[i * ldy + j] = hsum(acc[i][j]);
}

#define TILES(B)                                                                                                     \
    switch (rm * 16 + rn) {                                                                                          \
        T(B, 1, 1) T(B, 1, 2) T(B, 1, 3) T(B, 1, 4) T(B, 2, 1) T(B, 2, 2) T(B, 3, 1) T(B, 3, 2) T(B, 4, 1) T(B, 4, 2) \
    }
#define T(B, a, b) case a * 16 + b: tile(B, a, b, K, X, ldx, W, ldw, Y, ldy); return;

void pxl_tile_f32_avx2(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                       size_t ldy) {
    TILES(0)
}
void pxl_tile_bf16_avx2(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                        size_t ldy) {
    TILES(1)
}
