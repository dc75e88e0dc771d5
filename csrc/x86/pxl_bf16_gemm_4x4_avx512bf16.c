/* bf16 dot-product GEMM tiles, AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs into 16
 * fp32 sums per instruction; up to 4 tokens x 4 features (4 x 8 for GEMV). */
#include <immintrin.h>

#include "pxl_kernels.h"

PXL_INLINE void tile(const int RM, const int RN, size_t K, const uint16_t *X, size_t ldx, const uint16_t *W,
                     size_t ldw, float *Y, size_t ldy) {
    __m512 acc[4][8];
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) acc[i][j] = _mm512_setzero_ps();
    size_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh w[8];
        for (int j = 0; j < RN; j++) w[j] = (__m512bh)_mm512_loadu_si512(W + j * ldw + k);
        for (int i = 0; i < RM; i++) {
            __m512bh x = (__m512bh)_mm512_loadu_si512(X + i * ldx + k);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, w[j]);
        }
    }
    if (k < K) {
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh w[8];
        for (int j = 0; j < RN; j++) w[j] = (__m512bh)_mm512_maskz_loadu_epi16(m, W + j * ldw + k);
        for (int i = 0; i < RM; i++) {
            __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, X + i * ldx + k);
            for (int j = 0; j < RN; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, w[j]);
        }
    }
    for (int i = 0; i < RM; i++)
        for (int j = 0; j < RN; j++) Y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

void pxl_tile_bf16_avx512bf16(int rm, int rn, size_t K, const void *X_, size_t ldx, const void *W_, size_t ldw,
                              float *Y, size_t ldy) {
    const uint16_t *X = X_, *W = W_;
#define T(a, b) case a * 16 + b: tile(a, b, K, X, ldx, W, ldw, Y, ldy); return;
    switch (rm * 16 + rn) {
        T(1, 1) T(1, 2) T(1, 3) T(1, 4) T(1, 5) T(1, 6) T(1, 7) T(1, 8)
        T(2, 1) T(2, 2) T(2, 3) T(2, 4) T(3, 1) T(3, 2) T(3, 3) T(3, 4)
        T(4, 1) T(4, 2) T(4, 3) T(4, 4)
    }
#undef T
}
