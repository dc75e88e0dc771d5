/* bf16 GEMM micro-kernel on packed weights, AVX512-BF16 (the outer-product form of BLIS and
 * oneDNN): a panel holds 32 output features with K in pairs, [K/2][32][2] bf16, so one
 * vdpbf16ps multiplies a broadcast pair of x (x[t, 2p], x[t, 2p + 1]) with 16 features'
 * pairs and accumulates a row of Y in place. RM <= 12 tokens x 32 features in 24 zmm
 * accumulators: per K pair 2 loads of W, RM broadcasts, 2 RM dot-products, and no
 * horizontal sums. Each Y element accumulates its K pairs in order in one lane, whatever
 * RM is, so a token's result never depends on the others in the call. */
#include <immintrin.h>

#include "pxl_kernels.h"

#define PXL_INLINE static inline __attribute__((always_inline))

PXL_INLINE void ukernel(const int RM, size_t K2, const uint16_t *X, size_t ldx, const uint16_t *Wp, float *Y,
                        size_t ldy, __mmask16 m0, __mmask16 m1, const char *pf, size_t npf) {
    __m512 acc[12][2];
    for (int i = 0; i < RM; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (size_t p = 0; p < K2; p++) {
        if (p < npf) _mm_prefetch(pf + p * 64, _MM_HINT_T0);
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(Wp + p * 64), b1 = (__m512bh)_mm512_loadu_si512(Wp + p * 64 + 32);
        for (int i = 0; i < RM; i++) {
            uint32_t pair;
            memcpy(&pair, X + i * ldx + 2 * p, 4);
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
        }
    }
    for (int i = 0; i < RM; i++) {
        _mm512_mask_storeu_ps(Y + i * ldy, m0, acc[i][0]);
        _mm512_mask_storeu_ps(Y + i * ldy + 16, m1, acc[i][1]);
    }
}

void pxl_gemm_bf16p_avx512bf16(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                               int nvalid, const void *pf, size_t npf) {
    __mmask16 m0 = nvalid >= 16 ? 0xffff : (__mmask16)((1u << nvalid) - 1);
    __mmask16 m1 = nvalid >= 32 ? 0xffff : nvalid <= 16 ? 0 : (__mmask16)((1u << (nvalid - 16)) - 1);
    switch (rm) {
#define R(n) case n: ukernel(n, K / 2, X, ldx, Wp, Y, ldy, m0, m1, pf, npf); return;
        R(1) R(2) R(3) R(4) R(5) R(6) R(7) R(8) R(9) R(10) R(11) R(12)
#undef R
    }
}
