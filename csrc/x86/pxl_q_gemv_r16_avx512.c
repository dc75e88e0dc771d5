/* Quantised GEMV on blocks repacked 16 rows at a time (PXL_Q*R, core/pxl_qrepack.c), AVX-512.
 * A 64-byte vector holds 4 weights of each of 16 rows, so one vpdpbusd (or vpmaddubsw +
 * vpmaddwd without VNNI) advances all 16 rows' integer dot products by 4 weights against x's
 * 4 int8 broadcast to every lane; a block's 16 scales are one vector (vcvtph2ps), and the
 * scale and offset terms are three FMAs for 16 rows. No horizontal sums, no scalar work
 * per row. Up to PXL_QR_T tokens share every weight load (batched decode); each token's
 * lanes see the same instructions whatever T is, so results are batch-invariant.
 *
 * With VNNI, a prefill's calls (pxl_gemm_qr, on rows that stay in cache) take pairs of blocks
 * (32 rows) PAIR_T tokens at a time instead: each x broadcast then feeds two vpdpbusd, not
 * one. A broadcast operand costs nearly an issue slot of its own: with one per vpdpbusd the
 * loop runs at about 55 % of the instruction's peak, with one per two near 75 %. (In decode,
 * whose rows stream from memory, the pairs' two streams are the slower.) A token's row sees
 * the same integers and the same float instructions in the same order in both loops, so the
 * bits do not depend on which ran.
 * pxl_q_gemv_r16_avx512vnni.c builds this file with VNNI. */
#include <immintrin.h>

#include "pxl_kernels.h"

#ifdef PXL_VNNI
#define NAME(f) f##_avx512vnni
/* acc + 4-weight dot products of 16 rows (u8 w) against x's 4 int8 (every lane) */
static inline __m512i dot4(int fmt, __m512i acc, __m512i w, __m512i x) {
    (void)fmt;
    return _mm512_dpbusd_epi32(acc, w, x);
}
#else
#define NAME(f) f##_avx512
/* vpmaddubsw's u8 x s8 pair sums in int16 cannot saturate for nibbles (2 * 15 * 127); Q8_0's
 * stored w + 128 (0 .. 255) would (2 * 255 * 127), so it goes as two nibbles, 16 hi + lo */
static inline __m512i dot4(int fmt, __m512i acc, __m512i w, __m512i x) {
    if (fmt != PXL_Q8_0)
        return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512i hi = _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 4), low4), x);
    __m512i lo = _mm512_maddubs_epi16(_mm512_and_si512(w, low4), x);
    acc = _mm512_add_epi32(acc, _mm512_madd_epi16(hi, _mm512_set1_epi16(16)));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(lo, _mm512_set1_epi16(1)));
}
#endif

#define G PXL_QR_ROWS /* rows per repacked block: one zmm of fp32 lanes, one mask bit each */
_Static_assert(PXL_QR_ROWS == 16, "a repacked block's rows fill one zmm");
#define QPF (16 << 10) /* bytes ahead in the weight stream, into L2 (pxl_qkr_avx512vnni.c says why) */

PXL_INLINE void rows_qr(const int fmt, const int T, size_t rows, size_t K, const uint8_t *W, const pxl_qx *x,
                        float *y, size_t ldy) {
    const size_t nb = K / PXL_QK, nv = fmt == PXL_Q8_0 ? 8 : 4; /* 64-byte quant vectors a block */
    const size_t qa = fmt == PXL_Q4_1 ? 4 * G : 2 * G, gbs = qa + nv * 64;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (size_t r0 = 0; r0 < rows; r0 += G) {
        const uint8_t *g = W + (r0 / G) * nb * gbs;
        __m512 acc[PXL_QR_T], accm[PXL_QR_T];
        for (int t = 0; t < T; t++) acc[t] = accm[t] = _mm512_setzero_ps();
        for (size_t i = 0; i < nb; i++, g += gbs) {
            for (size_t l = 0; l < gbs; l += 64) _mm_prefetch((const char *)g + QPF + l, _MM_HINT_T1);
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)g));
            __m512 mw = fmt == PXL_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g + 2 * G)))
                                        : _mm512_setzero_ps();
            __m512i w[8]; /* w[j]: weights 4j .. 4j + 3 of the 16 rows, matching x's int32 j */
            for (size_t p = 0; p < nv; p++) {
                __m512i v = _mm512_loadu_si512(g + qa + 64 * p);
                if (fmt == PXL_Q8_0) w[p] = v;
                else w[2 * p] = _mm512_and_si512(v, low4), w[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
            for (int t = 0; t < T; t++) {
                const int32_t *xq = (const int32_t *)(x[t].q + i * PXL_QK);
                __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512(); /* two chains */
                for (int j = 0; j < 8; j += 2) {
                    d0 = dot4(fmt, d0, w[j], _mm512_set1_epi32(xq[j]));
                    d1 = dot4(fmt, d1, w[j + 1], _mm512_set1_epi32(xq[j + 1]));
                }
                __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1));
                if (fmt == PXL_Q8_0) { /* (dot + e) is the exact signed integer dot */
                    __m512 s = _mm512_add_ps(dot, _mm512_set1_ps(x[t].e[i]));
                    acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(x[t].d[i])), s, acc[t]);
                } else {
                    __m512 s = _mm512_fmadd_ps(dot, _mm512_set1_ps(x[t].d[i]), _mm512_set1_ps(x[t].e[i]));
                    acc[t] = _mm512_fmadd_ps(dw, s, acc[t]);
                    if (fmt == PXL_Q4_1) accm[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[t].c[i]), accm[t]);
                }
            }
        }
        __mmask16 keep = rows - r0 >= G ? 0xffff : (__mmask16)((1u << (rows - r0)) - 1);
        for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + t * ldy + r0, keep, _mm512_add_ps(acc[t], accm[t]));
    }
}

#ifdef PXL_VNNI /* (without it, vpmaddubsw's three instructions a step need the registers the
                 * pairs take: they measured 0.70-0.89x) */
#define PAIR_T 4 /* tokens a pass of pairs_qr: its 2 x 4 integer and float sums fit 32 registers */

/* blocks g[0 .. R) (R <= 2 groups of 16 rows, nb blocks each), PAIR_T tokens x: y[t * ldy +
 * 16 r + n] for rows keep[r] */
PXL_INLINE void pairs_qr(const int fmt, const int R, size_t nb, const uint8_t *const *g, const pxl_qx *x, float *y,
                         size_t ldy, const __mmask16 *keep) {
    const size_t nv = fmt == PXL_Q8_0 ? 8 : 4, qa = fmt == PXL_Q4_1 ? 4 * G : 2 * G, gbs = qa + nv * 64;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512 acc[2][PAIR_T], accm[2][PAIR_T];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < PAIR_T; t++) acc[r][t] = accm[r][t] = _mm512_setzero_ps();
    for (size_t i = 0; i < nb; i++) {
        __m512i dot[2][PAIR_T];
        for (int r = 0; r < R; r++) {
            for (size_t l = 0; l < gbs; l += 64) _mm_prefetch((const char *)g[r] + i * gbs + QPF + l, _MM_HINT_T1);
            for (int t = 0; t < PAIR_T; t++) dot[r][t] = _mm512_setzero_si512();
        }
#pragma GCC unroll 8
        for (size_t p = 0; p < nv; p++) {
            __m512i w[2][2]; /* w[r][h]: block r's 4 weights a row that meet x's int32 j below */
            for (int r = 0; r < R; r++) {
                __m512i v = _mm512_loadu_si512(g[r] + i * gbs + qa + 64 * p);
                if (fmt == PXL_Q8_0) w[r][0] = v;
                else w[r][0] = _mm512_and_si512(v, low4), w[r][1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
            for (int h = 0; h < (fmt == PXL_Q8_0 ? 1 : 2); h++) {
                const size_t j = fmt == PXL_Q8_0 ? p : 2 * p + h; /* x's int32 j */
                for (int t = 0; t < PAIR_T; t++) {
                    __m512i b = _mm512_set1_epi32(((const int32_t *)(x[t].q + i * PXL_QK))[j]);
                    for (int r = 0; r < R; r++) dot[r][t] = dot4(fmt, dot[r][t], w[r][h], b);
                }
            }
        }
        for (int r = 0; r < R; r++) { /* rows_qr's float steps, in its order */
            const uint8_t *gi = g[r] + i * gbs;
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)gi));
            for (int t = 0; t < PAIR_T; t++) {
                __m512 dt = _mm512_cvtepi32_ps(dot[r][t]);
                if (fmt == PXL_Q8_0) {
                    __m512 s = _mm512_add_ps(dt, _mm512_set1_ps(x[t].e[i]));
                    acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(x[t].d[i])), s, acc[r][t]);
                } else {
                    __m512 s = _mm512_fmadd_ps(dt, _mm512_set1_ps(x[t].d[i]), _mm512_set1_ps(x[t].e[i]));
                    acc[r][t] = _mm512_fmadd_ps(dw, s, acc[r][t]);
                }
            }
        }
    }
    /* Q4_1's offsets: a loop of their own, whose sums are rows_qr's (they never meet acc until
     * the end), so the one above keeps its registers for the products */
    for (size_t i = 0; fmt == PXL_Q4_1 && i < nb; i++)
        for (int r = 0; r < R; r++) {
            __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g[r] + i * gbs + 2 * G)));
            for (int t = 0; t < PAIR_T; t++) accm[r][t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x[t].c[i]), accm[r][t]);
        }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < PAIR_T; t++)
            _mm512_mask_storeu_ps(y + t * ldy + 16 * r, keep[r], _mm512_add_ps(acc[r][t], accm[r][t]));
}

/* T tokens on `rows` rows: pairs of blocks PAIR_T tokens a pass, the last T % PAIR_T tokens
 * (all of a smaller T) by rows_qr */
PXL_INLINE void tokens_qr(const int fmt, size_t T, size_t rows, size_t K, const uint8_t *W, const pxl_qx *x,
                          float *y, size_t ldy) {
    const size_t nb = K / PXL_QK, gbs = G * pxl_row_bytes(fmt, PXL_QK); /* (block of 16 rows) */
    const size_t paired = T / PAIR_T * PAIR_T;
    for (size_t r0 = 0; paired && r0 < rows; r0 += 2 * G) {
        const int R = rows - r0 > G ? 2 : 1;
        const uint8_t *g[2] = {W + (r0 / G) * nb * gbs, W + (r0 / G + R - 1) * nb * gbs};
        __mmask16 keep[2];
        for (int r = 0; r < 2; r++) {
            size_t left = rows > r0 + r * G ? rows - r0 - r * G : 0;
            keep[r] = left >= G ? 0xffff : (__mmask16)((1u << left) - 1);
        }
        for (size_t t0 = 0; t0 < paired; t0 += PAIR_T)
            if (R == 2) pairs_qr(fmt, 2, nb, g, x + t0, y + t0 * ldy + r0, ldy, keep);
            else pairs_qr(fmt, 1, nb, g, x + t0, y + t0 * ldy + r0, ldy, keep);
    }
    x += paired, y += paired * ldy;
    switch (T - paired) {
    case 0: break;
    case 1: rows_qr(fmt, 1, rows, K, W, x, y, ldy); break;
    case 2: rows_qr(fmt, 2, rows, K, W, x, y, ldy); break;
    case 3: rows_qr(fmt, 3, rows, K, W, x, y, ldy); break;
    }
}
_Static_assert(PAIR_T == 4, "tokens_qr's switch covers the T % PAIR_T left");
#endif

#define TOKENS(fmt)                                                                                         \
    switch (T) {                                                                                            \
    case 1: rows_qr(fmt, 1, rows, K, W, x, y, ldy); break;                                                  \
    case 2: rows_qr(fmt, 2, rows, K, W, x, y, ldy); break;                                                  \
    case 3: rows_qr(fmt, 3, rows, K, W, x, y, ldy); break;                                                  \
    case 4: rows_qr(fmt, 4, rows, K, W, x, y, ldy); break;                                                  \
    case 5: rows_qr(fmt, 5, rows, K, W, x, y, ldy); break;                                                  \
    case 6: rows_qr(fmt, 6, rows, K, W, x, y, ldy); break;                                                  \
    case 7: rows_qr(fmt, 7, rows, K, W, x, y, ldy); break;                                                  \
    default: rows_qr(fmt, 8, rows, K, W, x, y, ldy); break;                                                 \
    }
static void qr_q8_0(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    TOKENS(PXL_Q8_0)
}
static void qr_q4_0(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    TOKENS(PXL_Q4_0)
}
static void qr_q4_1(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    TOKENS(PXL_Q4_1)
}
const pxl_gemv_qr_fn NAME(pxl_gemv_qr)[PXL_NFMT] = {
    [PXL_Q8_0] = qr_q8_0, [PXL_Q4_0] = qr_q4_0, [PXL_Q4_1] = qr_q4_1};
#ifdef PXL_VNNI
static void gqr_q8_0(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    tokens_qr(PXL_Q8_0, T, rows, K, W, x, y, ldy);
}
static void gqr_q4_0(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    tokens_qr(PXL_Q4_0, T, rows, K, W, x, y, ldy);
}
static void gqr_q4_1(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y, size_t ldy) {
    tokens_qr(PXL_Q4_1, T, rows, K, W, x, y, ldy);
}

const pxl_gemv_qr_fn NAME(pxl_gemm_qr)[PXL_NFMT] = {
    [PXL_Q8_0] = gqr_q8_0, [PXL_Q4_0] = gqr_q4_0, [PXL_Q4_1] = gqr_q4_1};
#endif
