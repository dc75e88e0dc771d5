/* Q4_K, Q5_K and Q6_K repacked 16 rows at a time (PXL_Q4_KR, Q5_KR, Q6_KR, pxl_kquants.h) on AVX-512 VNNI: one vpdpbusd
 * multiplies 4 weights of all 16 rows with 4 of x broadcast, so a row's unpacking (6-bit
 * scales, mins, nibbles) is done once at load instead of every step, and the weights stream
 * from one sequential block per 16 rows. Up to PXL_QKR_T tokens share every weight vector.
 *
 * Per sub-block of 32 values: 4 vectors of nibbles give 8 vpdpbusd into one int32 lane per
 * row, multiplied by the rows' scales; the mins meet x's sub-block sums in 4 vpdpwssd per
 * super-block. The integers are the scalar kernel's, only the float sums' order differs. */
#include <immintrin.h>

#include "pxl_kquants.h"

/* Weights are prefetched this far ahead in the block stream, into L2: the decode kernels do
 * enough arithmetic per line that too few demand misses are in flight to keep DRAM busy, and
 * 2 KiB ahead into L1 covered too little of its latency. A block's lines (37 of Q4_K, 45 of
 * Q5_K, 53 of Q6_K, from the block's size) are prefetched a few per step of its loop: all at the block's
 * start, they queue for the core's few line-fill buffers and hold up the loads behind them */
#define QPF (16 << 10)

/* step j's share of the lines of block b (`per` lines a step) */
PXL_INLINE void prefetch_share(const void *b, int lines, int per, int j) {
    for (int l = per * j; l < per * (j + 1) && l < lines; l++)
        _mm_prefetch((const char *)b + QPF + 64 * l, _MM_HINT_T1);
}

/* 4 bytes at p in every lane, loaded by the broadcast itself: a broadcast from a general
 * register costs a vector ALU slot, these kernels' bottleneck */
PXL_INLINE __m512i bcast4(const void *p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }

/* one Q4_K (q5: Q5_K) 16-row block, T tokens: y[t * ldy + r] for r < rows */
PXL_INLINE void block16(const int T, const int q5, size_t nb, const void *W, const pxl_q8k *x,
                        const int16_t *const *bsp, float *y, size_t ldy, size_t rows) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512 acc[PXL_QKR_T];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const size_t bs = q5 ? sizeof(pxl_block_q5_Kx16) : sizeof(pxl_block_q4_Kx16);
    const int lines = (int)((bs + 63) / 64), per = (lines + 7) / 8; /* a block's lines, per step of 8 */
    for (size_t i = 0; i < nb; i++) {
        const pxl_block_q4_Kx16 *b = (const pxl_block_q4_Kx16 *)((const char *)W + i * bs);
        __m512i sumi[PXL_QKR_T];
        for (int t = 0; t < T; t++) sumi[t] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            prefetch_share(b, lines, per, j);
            const __m512i h = q5 ? _mm512_loadu_si512(((const pxl_block_q5_Kx16 *)b)->qh + 64 * j) : m4;
            __m512i dot[PXL_QKR_T];
            for (int t = 0; t < T; t++) dot[t] = _mm512_setzero_si512();
            for (int p = 0; p < 4; p++) {
                __m512i v = _mm512_loadu_si512((const void *)(b->qs + 64 * (4 * j + p)));
                __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                if (q5) lo = pxl_or_bit4(lo, h, 2 * p), hi = pxl_or_bit4(hi, h, 2 * p + 1); /* fifth bits */
                for (int t = 0; t < T; t++) {
                    const int8_t *q = x[t].q + i * PXL_QK_K + 32 * j + 8 * p;
                    dot[t] = _mm512_dpbusd_epi32(dot[t], lo, bcast4(q));
                    dot[t] = _mm512_dpbusd_epi32(dot[t], hi, bcast4(q + 4));
                }
            }
            const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b->sc + 16 * j)));
            for (int t = 0; t < T; t++) sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(dot[t], sc));
        }
        __m512i mn[4]; /* mins of sub-blocks 2k, 2k + 1 (int16 pairs), to meet x's sums over them */
        for (int k = 0; k < 4; k++) mn[k] = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b->m + 32 * k)));
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b->d));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b->dmin));
        for (int t = 0; t < T; t++) { /* (the mins' sum token by token: only acc and sumi span tokens) */
            __m512i summ = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) summ = _mm512_dpwssd_epi32(summ, mn[k], bcast4(bsp[t] + i * 8 + 2 * k));
            const __m512 dx = _mm512_set1_ps(x[t].d[i]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(d, dx), acc[t]);
            acc[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dmin, dx), acc[t]);
        }
    }
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + t * ldy, valid, acc[t]);
}

/* one Q6_K 16-row block: per 16-value sub-block, 2 nibble vectors with their 2 high bits from
 * the shared high-bit vector, 4 vpdpbusd, x's -32 * sum taken off, then times the rows' scales */
PXL_INLINE void block16_q6(const int T, size_t nb, const pxl_block_q6_Kx16 *W, const pxl_q8k *x,
                           const int32_t *const *off, float *y, size_t ldy, size_t rows) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    __m512 acc[PXL_QKR_T];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const int lines = (int)((sizeof *W + 63) / 64), per = (lines + 15) / 16; /* a block's lines, per step of 16 */
    for (size_t i = 0; i < nb; i++) {
        const pxl_block_q6_Kx16 *b = W + i;
        __m512i sumi[PXL_QKR_T];
        for (int t = 0; t < T; t++) sumi[t] = _mm512_setzero_si512();
        for (int s = 0; s < 16; s++) {
            prefetch_share(b, lines, per, s);
            const __m512i h = _mm512_loadu_si512((const void *)(b->qh + 64 * s));
            __m512i w[4];
            for (int pp = 0; pp < 2; pp++) {
                __m512i v = _mm512_loadu_si512((const void *)(b->ql + 64 * (2 * s + pp)));
                __m512i hlo = pp ? h : _mm512_slli_epi16(h, 4), hhi = pp ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2);
                w[2 * pp] = _mm512_or_si512(_mm512_and_si512(v, m4), _mm512_and_si512(hlo, m30));
                w[2 * pp + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_and_si512(hhi, m30));
            }
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->sc + 16 * s)));
            for (int t = 0; t < T; t++) {
                const int8_t *q = x[t].q + i * PXL_QK_K + 16 * s;
                __m512i dot = bcast4(off[t] + i * 16 + s);
                for (int k = 0; k < 4; k++) dot = _mm512_dpbusd_epi32(dot, w[k], bcast4(q + 4 * k));
                sumi[t] = _mm512_add_epi32(sumi[t], _mm512_mullo_epi32(dot, sc));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b->d));
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[t]), _mm512_mul_ps(d, _mm512_set1_ps(x[t].d[i])), acc[t]);
    }
    const __mmask16 valid = (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(y + t * ldy, valid, acc[t]);
}

#define FOR_T(call)                                                                                                   \
    switch (T) {                                                                                                      \
    case 1: call(1); break;                                                                                           \
    case 2: call(2); break;                                                                                           \
    case 3: call(3); break;                                                                                           \
    case 4: call(4); break;                                                                                           \
    case 5: call(5); break;                                                                                           \
    case 6: call(6); break;                                                                                           \
    case 7: call(7); break;                                                                                           \
    default: call(8); break;                                                                                          \
    }

void pxl_gemm_kr_avx512vnni(int fmt, size_t T, size_t rows, size_t K, const void *W, const pxl_q8k *x, float *y,
                            size_t ldy) {
    const size_t nb = K / PXL_QK_K;
    if (fmt == PXL_Q6_KR) {
        /* each token's -32 * (sums of x over the 16-value sub-blocks): Q6_K's offset, where the
         * kernel broadcasts it from memory */
        int32_t offs[T][nb * 16];
        const int32_t *off[PXL_QKR_T];
        for (size_t t = 0; t < T; t++) {
            for (size_t s = 0; s < nb * 16; s++) offs[t][s] = -32 * x[t].bsums[s];
            off[t] = offs[t];
        }
        for (size_t n = 0; n < rows; n += PXL_QR_ROWS) {
            size_t r = rows - n < PXL_QR_ROWS ? rows - n : PXL_QR_ROWS;
            const pxl_block_q6_Kx16 *Wn = (const pxl_block_q6_Kx16 *)W + n / PXL_QR_ROWS * nb;
#define Q6(TT) block16_q6(TT, nb, Wn, x, off, y + n, ldy, r)
            FOR_T(Q6)
#undef Q6
        }
        return;
    }
    /* Q4_K / Q5_K: each token's sums of x over the 8 sub-blocks of every super-block (pairs of bsums) */
    int16_t pairs[PXL_QKR_T][PXL_QK_K_MAX_BLOCKS * 8];
    const int16_t *bsp[PXL_QKR_T];
    for (size_t t = 0; t < T; t++) {
        for (size_t s = 0; s < nb * 8; s++) pairs[t][s] = (int16_t)(x[t].bsums[2 * s] + x[t].bsums[2 * s + 1]);
        bsp[t] = pairs[t];
    }
    const size_t bs = fmt == PXL_Q5_KR ? sizeof(pxl_block_q5_Kx16) : sizeof(pxl_block_q4_Kx16);
    for (size_t n = 0; n < rows; n += PXL_QR_ROWS) {
        size_t r = rows - n < PXL_QR_ROWS ? rows - n : PXL_QR_ROWS;
        const char *Wn = (const char *)W + n / PXL_QR_ROWS * nb * bs;
#define Q4(TT) block16(TT, 0, nb, Wn, x, bsp, y + n, ldy, r)
#define Q5(TT) block16(TT, 1, nb, Wn, x, bsp, y + n, ldy, r)
        if (fmt == PXL_Q5_KR) {
            FOR_T(Q5)
        } else {
            FOR_T(Q4)
        }
#undef Q4
#undef Q5
    }
}
