/* fp32 GEMM micro-kernel on packed weights, AVX-512F (the BLIS outer-product form): a panel
 * holds 32 output features for each k, [K][32] fp32, so per k one broadcast of x[t, k] and
 * two FMAs update 32 features of a token's row. RM <= 12 tokens x 32 features in 24 zmm
 * accumulators: per k 2 loads of W, RM broadcasts, 2 RM FMAs, no horizontal sums (the
 * dot-product tiles needed a transpose-add per 8 outputs and two loads per FMA). Each Y
 * element accumulates k in order in one lane whatever RM is, so a token's result never
 * depends on the others in the call (decode runs the same kernel with RM = 1). */
#include <immintrin.h>

#include "pxl_kernels.h"

PXL_INLINE void ukernel(const int RM, size_t K, const float *X, size_t ldx, const float *Wp, float *Y, size_t ldy,
                        __mmask16 m0, __mmask16 m1, const char *pf, size_t npf) {
    __m512 acc[12][2];
    for (int i = 0; i < RM; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int streaming = npf >= 2 * K; /* the panel's only call (pxl_gemm_p_fn) */
    for (size_t k = 0; k < K; k++) {
        /* lines ahead, into L2: they stream from DRAM, where L2 keeps enough misses in flight,
         * and a panel (K x 128 bytes) outgrows L1 before the calls after this one reach it */
        if (streaming) {
            pxl_pf_stream((const char *)Wp, K * 128, pf, k * 128, 2, 2); /* the step's 128 bytes */
        } else if (k < npf) {
            _mm_prefetch(pf + k * 64, _MM_HINT_T1);
        }
        __m512 b0 = _mm512_loadu_ps(Wp + k * 32), b1 = _mm512_loadu_ps(Wp + k * 32 + 16);
        for (int i = 0; i < RM; i++) {
            __m512 a = _mm512_set1_ps(X[i * ldx + k]);
            acc[i][0] = _mm512_fmadd_ps(a, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(a, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < RM; i++) {
        _mm512_mask_storeu_ps(Y + i * ldy, m0, acc[i][0]);
        _mm512_mask_storeu_ps(Y + i * ldy + 16, m1, acc[i][1]);
    }
}

void pxl_gemm_f32p_avx512(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                          int nvalid, const void *pf, size_t npf) {
    __mmask16 m0 = nvalid >= 16 ? 0xffff : (__mmask16)((1u << nvalid) - 1);
    __mmask16 m1 = nvalid >= 32 ? 0xffff : nvalid <= 16 ? 0 : (__mmask16)((1u << (nvalid - 16)) - 1);
    switch (rm) {
#define R(n) case n: ukernel(n, K, X, ldx, Wp, Y, ldy, m0, m1, pf, npf); return;
        R(1) R(2) R(3) R(4) R(5) R(6) R(7) R(8) R(9) R(10) R(11) R(12)
#undef R
    }
}
