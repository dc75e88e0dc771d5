/* K-quant GEMV (pxl_kquants.h), AVX2: each 32 quants of a super-block are one 256-bit vector of
 * uint8 (nibbles, plus Q5_K's fifth bit, Q6_K's 6 bits unsigned), multiplied with the token's
 * Q8_K bytes by vpmaddubsw into int16 pairs (at most 2 * 63 * 127) and by vpmaddwd with the
 * sub-block scales into exact int32 sums. pxl_qk_gemv_avx512vnni.c builds this file with
 * vpdpbusd and a multiply by the scales instead. The mins (Q4_K, Q5_K) and Q6_K's -32 come
 * from x's bsums: one int16 product per sub-block. Two rows share every load of x. */
#include <immintrin.h>

#include "pxl_kquants.h"

#ifdef PXL_VNNI
#define NAME(f) f##_avx512vnni
/* w . x over 4-byte groups, times the int32 scales of those groups */
static inline __m256i dot_sc(__m256i w, __m256i x, __m256i sc16, __m256i sc32) {
    return _mm256_mullo_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x), sc32);
}
#else
#define NAME(f) f##_avx2
static inline __m256i dot_sc(__m256i w, __m256i x, __m256i sc16, __m256i sc32) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), sc16);
}
#endif

#define ROWS 2
#define QPF 4096 /* bytes ahead on each row stream (see pxl_q_gemv_avx2.c) */

PXL_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* one scale for a whole vector; and two, one per 16 bytes (Q6_K's sub-blocks of 16): int16
 * lanes 0-7 / 8-15 meet bytes 0-15 / 16-31 after vpmaddubsw, int32 lanes 0-3 / 4-7 after vpdpbusd */
PXL_INLINE void scale1(int s, __m256i *s16, __m256i *s32) { *s16 = _mm256_set1_epi16((short)s), *s32 = _mm256_set1_epi32(s); }
PXL_INLINE void scale2(int a, int b, __m256i *s16, __m256i *s32) {
    *s16 = _mm256_setr_m128i(_mm_set1_epi16((short)a), _mm_set1_epi16((short)b));
    *s32 = _mm256_setr_m128i(_mm_set1_epi32(a), _mm_set1_epi32(b));
}

/* R rows from row n; fmt Q4_K, Q5_K or Q6_K */
PXL_INLINE void rows_k(const int fmt, const int R, size_t n, size_t nb, const uint8_t *W, const pxl_q8k *x, float *y) {
    const size_t bs = fmt == PXL_Q4_K ? sizeof(pxl_block_q4_K) : fmt == PXL_Q5_K ? sizeof(pxl_block_q5_K)
                                                                                 : sizeof(pxl_block_q6_K);
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1), three = _mm256_set1_epi8(3);
    __m256 acc[ROWS];
    float off[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), off[r] = 0;
    for (size_t i = 0; i < nb; i++) {
        const int8_t *q = x->q + i * PXL_QK_K;
        const int16_t *bsum = x->bsums + i * (PXL_QK_K / 16);
        const float dx = x->d[i];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = W + ((n + r) * nb + i) * bs;
            _mm_prefetch((const char *)blk + QPF, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + QPF + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + QPF + 128, _MM_HINT_T0);
            __m256i sumi = _mm256_setzero_si256(), s16, s32;
            if (fmt == PXL_Q6_K) {
                const pxl_block_q6_K *b = (const pxl_block_q6_K *)blk;
                int32_t corr = 0; /* sum_s sc_s 32 bsum_s: the -32 of every quant */
                for (int s = 0; s < 16; s++) corr += b->scales[s] * bsum[s];
                for (int h = 0; h < 2; h++) {
                    __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
                    __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
                    __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
                    for (int g = 0; g < 4; g++) {
                        __m256i nib = g == 0 ? _mm256_and_si256(ql0, m4)
                                      : g == 1 ? _mm256_and_si256(ql1, m4)
                                      : g == 2 ? _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4)
                                               : _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4);
                        __m256i hb = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), three);
                        __m256i w = _mm256_or_si256(nib, _mm256_slli_epi16(hb, 4)); /* (hb < 4: no carry across bytes) */
                        const int s = 8 * h + 2 * g;
                        scale2(b->scales[s], b->scales[s + 1], &s16, &s32);
                        __m256i xq = _mm256_loadu_si256((const __m256i *)(q + 128 * h + 32 * g));
                        sumi = _mm256_add_epi32(sumi, dot_sc(w, xq, s16, s32));
                    }
                }
                sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * corr, 0, 0, 0, 0, 0, 0, 0)); /* exact */
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(_cvtsh_ss(b->d) * dx), acc[r]);
                continue;
            }
            const uint8_t *scales = fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->scales
                                                    : ((const pxl_block_q5_K *)blk)->scales;
            const uint8_t *qs = fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->qs : ((const pxl_block_q5_K *)blk)->qs;
            uint8_t sc[8], m[8];
            pxl_k4_scales(scales, sc, m);
            int32_t summ = 0;
            for (int j = 0; j < 8; j++) summ += m[j] * (bsum[2 * j] + bsum[2 * j + 1]);
            __m256i qh = fmt == PXL_Q5_K ? _mm256_loadu_si256((const __m256i *)((const pxl_block_q5_K *)blk)->qh)
                                         : _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (fmt == PXL_Q5_K) {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
                }
                scale1(sc[2 * j], &s16, &s32);
                sumi = _mm256_add_epi32(sumi, dot_sc(lo, _mm256_loadu_si256((const __m256i *)(q + 64 * j)), s16, s32));
                scale1(sc[2 * j + 1], &s16, &s32);
                sumi = _mm256_add_epi32(sumi, dot_sc(hi, _mm256_loadu_si256((const __m256i *)(q + 64 * j + 32)), s16, s32));
            }
            const uint16_t *dd = (const uint16_t *)blk; /* d, dmin lead both layouts */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(_cvtsh_ss(dd[0]) * dx), acc[r]);
            off[r] -= _cvtsh_ss(dd[1]) * dx * (float)summ;
        }
    }
    for (int r = 0; r < R; r++) y[n + r] = hsum(acc[r]) + off[r];
}

PXL_INLINE void gemv(const int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y) {
    size_t n = n0, nb = K / PXL_QK_K;
    for (; n + ROWS <= n1; n += ROWS) rows_k(fmt, ROWS, n, nb, W, x, y);
    for (; n < n1; n++) rows_k(fmt, 1, n, nb, W, x, y);
}

void NAME(pxl_gemv_qk)(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y) {
    if (fmt == PXL_Q4_K) gemv(PXL_Q4_K, n0, n1, K, W, x, y);
    else if (fmt == PXL_Q5_K) gemv(PXL_Q5_K, n0, n1, K, W, x, y);
    else gemv(PXL_Q6_K, n0, n1, K, W, x, y);
}
