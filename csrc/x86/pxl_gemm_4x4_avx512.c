/* fp32 dot-product GEMM tiles, AVX-512F: up to 4 tokens x 4 features in 16 zmm
 * accumulators (1 x 8 for GEMV), 16 floats of K per step, masked loads for the K tail.
 * The bf16 variant (for CPUs without AVX512-BF16) widens bf16 to fp32 by a shift (exact). */
#include <immintrin.h>

#include "pxl_kernels.h"

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

#ifndef PF
#define PF 1024 /* bytes ahead on each weight row */
#endif
/* the 8 horizontal sums of a[0..7], as one vector (a transpose-and-add tree: 12 shuffles
 * and adds instead of 8 full reductions) */
PXL_INLINE __m256 hsum8(const __m512 *a) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    __m512 s45 = _mm512_add_ps(_mm512_unpacklo_ps(a[4], a[5]), _mm512_unpackhi_ps(a[4], a[5]));
    __m512 s67 = _mm512_add_ps(_mm512_unpacklo_ps(a[6], a[7]), _mm512_unpackhi_ps(a[6], a[7]));
    /* per 128-bit lane: [a0 a1 a2 a3] and [a4 a5 a6 a7] partial sums */
    __m512 s03 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                               _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
    __m512 s47 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s45), _mm512_castps_pd(s67))),
                               _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s45), _mm512_castps_pd(s67))));
    __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(s03, s47, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(s03, s47, _MM_SHUFFLE(3, 1, 3, 1)));
    v = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* one horizontal sum in exactly hsum8's order (per 128-bit lane (x0+x2)+(x1+x3), then
 * (L0+L1)+(L2+L3)), so a dot product rounds the same in every tile shape: a token's
 * result does not depend on how many others share the call (batch invariance) */
PXL_INLINE float hsum1(__m512 a) {
    __m512 t = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_cvtss_f32(t) + _mm_cvtss_f32(_mm512_extractf32x4_ps(t, 2));
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
        for (int j = 0; j < RN; j++) Y[i * ldy + j] = hsum1(acc[i][j]);
}

/* GEMV (one token): RN <= 8 rows, one accumulator each (8 independent FMA chains),
 * every load of x shared by all rows; the hardware prefetcher follows the RN streams. */
PXL_INLINE void gemv_tile(const int BF16, const int RN, size_t K, const void *X, const void *W, size_t ldw,
                          float *Y) {
    const size_t es = BF16 ? 2 : 4;
    __m512 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();
    size_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 x = ld_full(BF16, X, k);
        for (int j = 0; j < RN; j++) {
            _mm_prefetch((const char *)W + (j * ldw + k) * es + PF, _MM_HINT_T0);
            a[j] = _mm512_fmadd_ps(x, ld_full(BF16, (const char *)W + j * ldw * es, k), a[j]);
        }
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        __m512 x = ld(BF16, X, k, m);
        for (int j = 0; j < RN; j++) a[j] = _mm512_fmadd_ps(x, ld(BF16, (const char *)W + j * ldw * es, k, m), a[j]);
    }
    if (RN == 8) {
        _mm256_storeu_ps(Y, hsum8(a));
        return;
    }
    for (int j = 0; j < RN; j++) Y[j] = hsum1(a[j]);
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
