/* Repacked quantised blocks (PXL_Q8_0R / Q4_0R / Q4_1R, 16 rows a block: pxl_qrepack.c; the
 * K-quants' PXL_Q4_KR / Q5_KR / Q6_KR, pxl_kquants.h) dequantised straight into one packed bf16 panel,
 * [K/2][32][2], for a prefill on sets whose bf16 GEMM outruns their int8 dot products (AMX
 * tiles). A repacked block's 64-byte line holds 4
 * consecutive weights of each of its 16 rows, which is two K pairs of the panel's layout: the
 * even 16-bit words of the line are the first pair of every row, the odd words the second. So a
 * line becomes two 64-byte panel rows with one word permute, widenings and one multiply-add
 * per 16 weights, where the portable route (pxl_dequant_rows_qr, then the panel packing) walks
 * weight by weight. Same arithmetic: w = d q + m as a product then a sum (not fused), rounded to
 * bf16 to nearest even, so both routes give the same bits. The K-quants' vectors hold their
 * (low) 4 bits as the 4-bit blocks' lines do; their scales and mins change per sub-block. */
#include <immintrin.h>

#include "pxl_kquants.h"

#define G PXL_QR_ROWS /* rows per repacked block */
/* 32 words reordered even ones first, odd ones after */
#define SPLIT                                                                                                        \
    _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 30, 28, 26, 24, 22, 20, 18, 16, 14, \
                     12, 10, 8, 6, 4, 2, 0)

/* the panel's rows for K pairs kp and kp + 1 from one line of 16 rows x 4 quants (bytes 4r ..
 * 4r + 3: row r's weights 2 kp .. 2 kp + 3), w = d q + m per row; features 16 g .. 16 g + 15
 * (rows past `valid` stay zero, as the portable packing leaves them) */
PXL_INLINE void two_pairs(__m512i line, __m512 dlo, __m512 dhi, __m512 mlo, __m512 mhi, int add_m, int offset,
                          __mmask32 valid, uint16_t *panel, size_t kp, int g) {
    /* words 0-15: the even words (pair kp of rows 0-15), 16-31: the odd ones (pair kp + 1) */
    __m512i w = _mm512_permutexvar_epi16(SPLIT, line);
    for (int h = 0; h < 2; h++) {
        __m256i pair = h ? _mm512_extracti64x4_epi64(w, 1) : _mm512_castsi512_si256(w); /* 16 rows x 2 bytes */
        __m512i q0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(pair));      /* rows 0-7, both weights */
        __m512i q1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(pair, 1)); /* rows 8-15 */
        const __m512i off = _mm512_set1_epi32(offset);
        if (offset) q0 = _mm512_sub_epi32(q0, off), q1 = _mm512_sub_epi32(q1, off);
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(q0), dlo), w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(q1), dhi);
        if (add_m) w0 = _mm512_add_ps(w0, mlo), w1 = _mm512_add_ps(w1, mhi);
        __m512i b = _mm512_maskz_mov_epi16(valid, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
        _mm512_storeu_si512(panel + ((kp + h) * PXL_PANEL + 16 * g) * 2, b);
    }
}

/* a per-row value for each weight of a pair: rows 0-7 (lanes 2r, 2r + 1), rows 8-15 */
#define DUP_LO _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0)
#define DUP_HI _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8)

/* one 16-row super-block of PXL_Q4_KR / Q5_KR (w = d sc q - dmin m per 32-value sub-block) or
 * PXL_Q6_KR (w = d sc (q - 32) per 16) into the panel's pairs kp0 .. kp0 + 127 */
PXL_INLINE void kr_block(int fmt, const void *blk, __mmask32 valid, uint16_t *panel, size_t kp0, int g) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), hi2 = _mm512_set1_epi8(0x30);
    const __m512 none = _mm512_setzero_ps();
    if (fmt == PXL_Q6_KR) {
        const pxl_block_q6_Kx16 *b = blk;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b->d));
        for (int s = 0; s < 16; s++) { /* values 16s .. 16s + 15: ql vectors 2s, 2s + 1, qh vector s */
            __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b->sc + 16 * s)));
            __m512 a = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
            __m512 alo = _mm512_permutexvar_ps(DUP_LO, a), ahi = _mm512_permutexvar_ps(DUP_HI, a);
            __m512i h = _mm512_loadu_si512(b->qh + 64 * s);
            for (int e = 0; e < 2; e++) { /* the 2 high bits: fields 2e (low nibbles) and 2e + 1 (high ones) */
                __m512i v = _mm512_loadu_si512(b->ql + 64 * (2 * s + e));
                __m512i hl = e ? h : _mm512_slli_epi16(h, 4);
                __m512i hh = e ? _mm512_srli_epi16(h, 2) : _mm512_slli_epi16(h, 2);
                __m512i lo = _mm512_or_si512(_mm512_and_si512(v, m4), _mm512_and_si512(hl, hi2));
                __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_and_si512(hh, hi2));
                two_pairs(lo, alo, ahi, none, none, 0, 32, valid, panel, kp0 + 8 * s + 4 * e, g);
                two_pairs(hi, alo, ahi, none, none, 0, 32, valid, panel, kp0 + 8 * s + 4 * e + 2, g);
            }
        }
        return;
    }
    const pxl_block_q4_Kx16 *b = blk; /* (Q5_KR: its leading Q4_KR block, then the fifth bits) */
    const uint8_t *qh = fmt == PXL_Q5_KR ? ((const pxl_block_q5_Kx16 *)blk)->qh : NULL;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b->d));
    const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b->dmin));
    /* the mins of sub-blocks 2k, 2k + 1 alternate row by row: words 0-15 of SPLIT the first's */
    for (int j = 0; j < 8; j++) {
        __m512i mw = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b->m + 32 * (j / 2))));
        mw = _mm512_permutexvar_epi16(SPLIT, mw);
        __m512i mj = _mm512_cvtepi16_epi32(j % 2 ? _mm512_extracti64x4_epi64(mw, 1) : _mm512_castsi512_si256(mw));
        __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b->sc + 16 * j)));
        __m512 a = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
        /* -c exactly (a sign flip), so d sc q + (-c) is the portable d sc q - c */
        __m512 c = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mj));
        c = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(c), _mm512_set1_epi32((int)0x80000000u)));
        __m512 alo = _mm512_permutexvar_ps(DUP_LO, a), ahi = _mm512_permutexvar_ps(DUP_HI, a);
        __m512 clo = _mm512_permutexvar_ps(DUP_LO, c), chi = _mm512_permutexvar_ps(DUP_HI, c);
        const __m512i h = qh ? _mm512_loadu_si512(qh + 64 * j) : m4;
        for (int p = 4 * j; p < 4 * j + 4; p++) { /* vector p: values 8p .. 8p + 7 */
            __m512i v = _mm512_loadu_si512(b->qs + 64 * p);
            __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            if (qh) /* the fifth bits: bit 2(p - 4j) of h for the low nibbles, the next for the high */
                lo = pxl_or_bit4(lo, h, 2 * (p - 4 * j)), hi = pxl_or_bit4(hi, h, 2 * (p - 4 * j) + 1);
            two_pairs(lo, alo, ahi, clo, chi, 1, 0, valid, panel, kp0 + 4 * p, g);
            two_pairs(hi, alo, ahi, clo, chi, 1, 0, valid, panel, kp0 + 4 * p + 2, g);
        }
    }
}

/* (the product and the sum stay two roundings, as in the portable dequantisation) */
__attribute__((optimize("fp-contract=off"))) void pxl_qr_bf16p_avx512bf16(int fmt, const void *W, size_t n0,
                                                                          size_t rows, size_t K, uint16_t *panel) {
    const int kr = PXL_IS_KR(fmt);
    fmt = PXL_QBASE(fmt);
    const size_t bk = kr ? PXL_QK_K : PXL_QK, nb = K / bk, gbs = G * pxl_row_bytes(fmt, bk); /* (block of 16 rows) */
    const size_t qa = fmt == PXL_Q4_1 ? 4 * G : 2 * G; /* the quants, after d[16] (and m[16]) */
    const __m512i dup_lo = DUP_LO, dup_hi = DUP_HI;
    for (int g = 0; g < 2; g++) {
        const size_t n = n0 + (size_t)G * g;
        const int nv = rows > (size_t)G * g ? (int)(rows - (size_t)G * g < G ? rows - (size_t)G * g : G) : 0;
        const __mmask32 valid = nv == G ? 0xffffffffu : (__mmask32)((1u << 2 * nv) - 1);
        if (!nv) { /* the panel's second half past the last row */
            for (size_t kp = 0; kp < K / 2; kp++)
                _mm512_storeu_si512(panel + (kp * PXL_PANEL + 16 * g) * 2, _mm512_setzero_si512());
            continue;
        }
        const uint8_t *grp = (const uint8_t *)W + (n / G) * nb * gbs;
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = grp + i * gbs;
            if (kr) {
                kr_block(fmt, blk, valid, panel, i * PXL_QK_K / 2, g);
                continue;
            }
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk)), m = _mm512_setzero_ps();
            if (fmt == PXL_Q4_1) m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 2 * G)));
            if (fmt == PXL_Q4_0) m = _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
            __m512 dlo = _mm512_permutexvar_ps(dup_lo, d), dhi = _mm512_permutexvar_ps(dup_hi, d);
            __m512 mlo = _mm512_permutexvar_ps(dup_lo, m), mhi = _mm512_permutexvar_ps(dup_hi, m);
            const uint8_t *q = blk + qa;
            const size_t kp0 = i * PXL_QK / 2;
            if (fmt == PXL_Q8_0) { /* line p: weights 4p .. 4p + 3 of each row */
                for (int p = 0; p < 8; p++)
                    two_pairs(_mm512_loadu_si512(q + 64 * p), dlo, dhi, mlo, mhi, 0, 128, valid, panel, kp0 + 2 * p, g);
                continue;
            }
            for (int p = 0; p < 4; p++) { /* line p: low nibbles weights 8p .. 8p + 3, high 8p + 4 .. */
                __m512i v = _mm512_loadu_si512(q + 64 * p), lo = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f));
                two_pairs(lo, dlo, dhi, mlo, mhi, 1, 0, valid, panel, kp0 + 4 * p, g);
                two_pairs(hi, dlo, dhi, mlo, mhi, 1, 0, valid, panel, kp0 + 4 * p + 2, g);
            }
        }
    }
}
