/* Q4_K and Q6_K (a Q4_K_M file's two types) on AVX-512 BW: up to PXL_QK_T tokens share every
 * unpacked weight vector, two rows share every load of x.
 *
 * A 512-bit vector holds 64 consecutive quants of a super-block in x's own order, so x is read
 * as quantised (Q8_K): Q4_K's 32-byte chunk j is broadcast to both halves and the upper half
 * shifted by 4 (low nibbles: values 64j..64j+31, high: the next 32); Q6_K's 64 ql bytes of a
 * half give [g0 | g1] from their low nibbles and [g2 | g3] from their high ones, with qh's
 * two bits per group shifted into bits 4-5. vpmaddubsw (unsigned quant x signed x, pairs into
 * int16, at most 2 * 63 * 127) and vpmaddwd with the sub-block scales (vpermw from the
 * super-block's 8 or 16 scales) give exact int32 sums; the mins (Q4_K) and Q6_K's -32 come
 * from x's bsums. Same integers as the scalar kernel, so only the float sums' order differs. */
#include <immintrin.h>

#include "pxl_kquants.h"

#define ROWS 2
#ifndef QPF
#define QPF 4096 /* bytes ahead on each row stream (see pxl_q_gemv_avx2.c) */
#endif

PXL_INLINE float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

/* Q4_K / Q5_K's 12 packed scale bytes -> 8 scales (bytes 0-7) and 8 mins (bytes 8-15):
 * llama.cpp's utmp shuffle, pxl_k4_scale_min for all 8 at once */
PXL_INLINE void k4_unpack(const uint8_t *s12, uint64_t *sc, uint64_t *mn) {
    uint32_t u[4];
    memcpy(u, s12, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t m_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[0] &= k1;
    *sc = (uint64_t)u[0] | (uint64_t)u[1] << 32;
    *mn = (uint64_t)m_lo | (uint64_t)u[3] << 32;
}

/* R rows from row n times T tokens: y[t * ldy + n + r] */
PXL_INLINE void q4k_rows(const int R, const int T, size_t n, size_t nb, const uint8_t *W, const pxl_q8k *x,
                         float *y, size_t ldy) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);             /* upper half: high nibbles */
    __m512i idx[4]; /* chunk j: sub-block 2j's scale in int16 lanes 0-15, 2j + 1's in 16-31 */
    for (int j = 0; j < 4; j++)
        idx[j] = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16((short)(2 * j)),
                                         _mm512_set1_epi16((short)(2 * j + 1)));
    __m512 acc[ROWS][PXL_QK_T];
    __m128 accm[ROWS][PXL_QK_T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps(), accm[r][t] = _mm_setzero_ps();
    for (size_t i = 0; i < nb; i++) {
        __m128i bs8[PXL_QK_T]; /* per token: the 8 sub-blocks' sums of x (pairs of bsums) */
        for (int t = 0; t < T; t++) {
            __m256i b16 = _mm256_loadu_si256((const __m256i *)(x[t].bsums + i * 16));
            bs8[t] = _mm_hadd_epi16(_mm256_castsi256_si128(b16), _mm256_extracti128_si256(b16, 1));
        }
        for (int r = 0; r < R; r++) {
            const pxl_block_q4_K *b = (const pxl_block_q4_K *)W + (n + r) * nb + i;
            _mm_prefetch((const char *)b + QPF, _MM_HINT_T0);
            _mm_prefetch((const char *)b + QPF + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)b + QPF + 128, _MM_HINT_T0);
            uint64_t sc, mn;
            k4_unpack(b->scales, &sc, &mn);
            const __m512i sc16 = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_cvtsi64_si128((long long)sc)));
            const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mn));
            __m512i w[4], s[4];
            for (int j = 0; j < 4; j++) {
                __m512i c = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qs + 32 * j)));
                w[j] = _mm512_and_si512(_mm512_srlv_epi64(c, shift), m4);
                s[j] = _mm512_permutexvar_epi16(idx[j], sc16);
            }
            const float d = _cvtsh_ss(b->d), dmin = _cvtsh_ss(b->dmin);
            for (int t = 0; t < T; t++) {
                const int8_t *q = x[t].q + i * PXL_QK_K;
                __m512i sumi = _mm512_setzero_si512();
                for (int j = 0; j < 4; j++) {
                    __m512i p = _mm512_maddubs_epi16(w[j], _mm512_loadu_si512((const void *)(q + 64 * j)));
                    sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, s[j]));
                }
                const float dx = x[t].d[i];
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d * dx), acc[r][t]);
                accm[r][t] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mn16, bs8[t])), _mm_set1_ps(dmin * dx),
                                          accm[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            __m128 m = accm[r][t];
            m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            m = _mm_add_ss(m, _mm_movehdup_ps(m));
            y[t * ldy + n + r] = hsum512(acc[r][t]) - _mm_cvtss_f32(m);
        }
}

PXL_INLINE void q6k_rows(const int R, const int T, size_t n, size_t nb, const uint8_t *W, const pxl_q8k *x,
                         float *y, size_t ldy) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    /* qh's bits for [g0 | g1] move up to bits 4-5 (by 4 and by 2), for [g2 | g3] stay (by 0) or move down by 2 */
    const __m512i up_lo = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2), dn_hi = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
    __m512i idx[4]; /* vector k = 2h + (high nibbles): 8 int16 lanes per 16-value sub-block 4k .. 4k + 3 */
    for (int k = 0; k < 4; k++) {
        short v[32];
        for (int l = 0; l < 32; l++) v[l] = (short)(4 * k + l / 8);
        idx[k] = _mm512_loadu_si512((const void *)v);
    }
    __m512 acc[ROWS][PXL_QK_T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (size_t i = 0; i < nb; i++) {
        for (int r = 0; r < R; r++) {
            const pxl_block_q6_K *b = (const pxl_block_q6_K *)(W + ((n + r) * nb + i) * sizeof(pxl_block_q6_K));
            _mm_prefetch((const char *)b + QPF, _MM_HINT_T0);
            _mm_prefetch((const char *)b + QPF + 64, _MM_HINT_T0);
            _mm_prefetch((const char *)b + QPF + 128, _MM_HINT_T0);
            _mm_prefetch((const char *)b + QPF + 192, _MM_HINT_T0);
            const __m256i sc16y = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
            const __m512i sc16 = _mm512_castsi256_si512(sc16y);
            __m512i w[4], s[4];
            for (int h = 0; h < 2; h++) {
                __m512i v = _mm512_loadu_si512((const void *)(b->ql + 64 * h));
                __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
                w[2 * h] = _mm512_or_si512(_mm512_and_si512(v, m4),
                                           _mm512_and_si512(_mm512_sllv_epi64(qh, up_lo), m30));
                w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                                               _mm512_and_si512(_mm512_srlv_epi64(qh, dn_hi), m30));
                s[2 * h] = _mm512_permutexvar_epi16(idx[2 * h], sc16);
                s[2 * h + 1] = _mm512_permutexvar_epi16(idx[2 * h + 1], sc16);
            }
            const float d = _cvtsh_ss(b->d);
            for (int t = 0; t < T; t++) {
                const int8_t *q = x[t].q + i * PXL_QK_K;
                /* the -32 of every quant: 32 * sum_s sc_s bsum_s, in the first 8 lanes */
                __m256i corr = _mm256_madd_epi16(sc16y, _mm256_loadu_si256((const __m256i *)(x[t].bsums + i * 16)));
                __m512i sumi = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(),
                                                                       _mm256_slli_epi32(corr, 5)));
                for (int k = 0; k < 4; k++) {
                    __m512i p = _mm512_maddubs_epi16(w[k], _mm512_loadu_si512((const void *)(q + 64 * k)));
                    sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, s[k]));
                }
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d * x[t].d[i]), acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + n + r] = hsum512(acc[r][t]);
}

#define FOR_T(F, R, ...)                                                                                              \
    switch (T) {                                                                                                      \
    case 1: F(R, 1, __VA_ARGS__); break;                                                                              \
    case 2: F(R, 2, __VA_ARGS__); break;                                                                              \
    case 3: F(R, 3, __VA_ARGS__); break;                                                                              \
    default: F(R, 4, __VA_ARGS__); break;                                                                             \
    }

void pxl_gemm_qk_avx512(int fmt, size_t T, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y,
                        size_t ldy) {
    size_t nb = K / PXL_QK_K, n = n0;
    if (fmt == PXL_Q4_K) {
        for (; n + ROWS <= n1; n += ROWS) FOR_T(q4k_rows, ROWS, n, nb, W, x, y, ldy)
        for (; n < n1; n++) FOR_T(q4k_rows, 1, n, nb, W, x, y, ldy)
    } else {
        for (; n + ROWS <= n1; n += ROWS) FOR_T(q6k_rows, ROWS, n, nb, W, x, y, ldy)
        for (; n < n1; n++) FOR_T(q6k_rows, 1, n, nb, W, x, y, ldy)
    }
}
