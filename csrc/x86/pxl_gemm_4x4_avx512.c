/* fp32 dot-product GEMM tiles, AVX-512F: up to 4 tokens x 4 features in 16 zmm
 * accumulators (1 x 8 for GEMV), 16 floats of K per step, masked loads for the K tail.
 * The bf16 variant (for CPUs without AVX512-BF16) widens bf16 to fp32 by a shift (exact). */
#include <immintrin.h>

#include "pxl_kernels.h"

#define PXL_INLINE static inline __attribute__((always_inline))

PXL_INLINE __m512 ld_full(const int BF16, const void *p, size_t k) { /* unmasked: masked loads cost more */
    if (BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + k))), 16));
    return _mm512_loadu_ps((const float *)p + k);
}
PXL_INLINE __m512 ld(const int BF16, const void *p, size_t k, __mmask16 m) {
    if (BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + k)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)p + k);
}

PXL_INLINE void tile(const int BF16, const int RM, const int RN, size_t K, const void *X, size_t ldx, const void *W,
                     size_t ldw, float *Y, size_t ldy) {
    const size_t es = BF16 ? 2 : 4;
    __m512 acc[4][8];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm512_setzero_ps();
    size_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 w[8];
        for (int j = 0; j < RN; j++) w[j] = ld_full(BF16, (const char *)W + j * ldw * es, k);
        for (int i = 0; i < RM; i++) {
            __m512 x = ld_full(BF16, (const char *)X + i * ldx * es, k);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 w[8];
        for (int j = 0; j < RN; j++) w[j] = ld(BF16, (const char *)W + j * ldw * es, k, m);
        for (int i = 0; i < RM; i++) {
            __m512 x = ld(BF16, (const char *)X + i * ldx * es, k, m);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm512_fmadd_ps(x, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) Y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

/* GEMV (one token): RN rows, two accumulators each so loads of the next 16 floats
 * overlap the FMAs, and a prefetch 1 KiB ahead on every weight stream */
PXL_INLINE void gemv_tile(const int BF16, const int RN, size_t K, const void *X, const void *W, size_t ldw,
                          float *Y) {
    const size_t es = BF16 ? 2 : 4;
    __m512 a0[8], a1[8];
    for (int j = 0; j < RN; j++) a0[j] = a1[j] = _mm512_setzero_ps();
    size_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 x0 = ld_full(BF16, X, k), x1 = ld_full(BF16, X, k + 16);
        for (int j = 0; j < RN; j++) {
            const char *row = (const char *)W + j * ldw * es;
            _mm_prefetch(row + (k + 1024) * es, _MM_HINT_T0);
            a0[j] = _mm512_fmadd_ps(x0, ld_full(BF16, row, k), a0[j]);
            a1[j] = _mm512_fmadd_ps(x1, ld_full(BF16, row, k + 16), a1[j]);
        }
    }
    for (; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 x0 = ld(BF16, X, k, m);
        for (int j = 0; j < RN; j++) a0[j] = _mm512_fmadd_ps(x0, ld(BF16, (const char *)W + j * ldw * es, k, m), a0[j]);
    }
    for (int j = 0; j < RN; j++) Y[j] = _mm512_reduce_add_ps(_mm512_add_ps(a0[j], a1[j]));
}

#define TILES(B)                                                                                         \
    switch (rm * 16 + rn) {                                                                              \
        T(B, 1, 1) T(B, 1, 2) T(B, 1, 3) T(B, 1, 4) T(B, 1, 5) T(B, 1, 6) T(B, 1, 7) T(B, 1, 8) T(B, 2, 1) \
        T(B, 2, 2) T(B, 2, 3) T(B, 2, 4) T(B, 3, 1) T(B, 3, 2) T(B, 3, 3) T(B, 3, 4) T(B, 4, 1) T(B, 4, 2) \
        T(B, 4, 3) T(B, 4, 4)                                                                            \
    }
#define T(B, a, b) case a * 16 + b: if (a == 1) gemv_tile(B, b, K, X, W, ldw, Y); else tile(B, a, b, K, X, ldx, W, ldw, Y, ldy); return;

void pxl_tile_f32_avx512(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                         size_t ldy) {
    TILES(0)
}
void pxl_tile_bf16_avx512(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                          size_t ldy) {
    TILES(1)
}
