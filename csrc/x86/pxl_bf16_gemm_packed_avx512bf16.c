/* bf16 GEMM micro-kernel on packed weights, AVX512-BF16 (the outer-product form of BLIS and
 * oneDNN): a panel holds 32 output features with K in pairs, [K/2][32][2] bf16, so one
 * vdpbf16ps multiplies a broadcast pair of x (x[t, 2p], x[t, 2p + 1]) with 16 features'
 * pairs and accumulates a row of Y in place. RM <= 12 tokens x 32 features in 24 zmm
 * accumulators: per K pair 2 loads of W, RM broadcasts, 2 RM dot-products, and no
 * horizontal sums. Each Y element accumulates its K pairs in order in one lane, whatever
 * RM is, so a token's result never depends on the others in the call. */
#include <immintrin.h>

#include "pxl_kernels.h"

/* exp(x) for x in [-87, 88] (clamped), pxl_exp's reduction and polynomial with its multiply-adds
 * fused; returns 1 + exp(x), the SiLU denominator, with that add fused too */
PXL_INLINE __m512 one_plus_exp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 l2e = _mm512_set1_ps(1.44269504f), shifter = _mm512_set1_ps(12582912.0f);
    __m512 sh = _mm512_fmadd_ps(x, l2e, shifter), n = _mm512_sub_ps(sh, shifter), f = _mm512_fmsub_ps(x, l2e, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.5403530e-4f), f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(sh), _mm512_set1_epi32(127 - 0x4B400000)), 23);
    return _mm512_fmadd_ps(p, _mm512_castsi512_ps(e), _mm512_set1_ps(1.0f));
}

/* silu(bf16(g)) * bf16(u), 16 lanes, g and u fp32: pxl_silu_mul_bf16_avx512bf16's arithmetic
 * lane for lane (the same roundings, exp and division), so the fused product has its bits */
PXL_INLINE __m512 silu_mul16(__m512 g, __m512 u) {
    __m512 gv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(g)), 16));
    __m512 uv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(u)), 16));
    return _mm512_mul_ps(_mm512_div_ps(gv, one_plus_exp(_mm512_sub_ps(_mm512_setzero_ps(), gv))), uv);
}

/* OUT selects where the accumulators go: OUT_F32 stores them to Y (fp32, nvalid columns);
 * OUT_BF16 rounds them to bf16 in registers and stores them to y (ldy); OUT_SILU takes columns
 * 0-15 as gate and 16-31 as up (pxl_pack_gated) and stores nvalid <= 16 bf16 of silu(gate) * up;
 * OUT_WIDE_NT stores 32 bf16 values widened to fp32, each row's two lines around the caches
 * (non-temporal: y 64-byte aligned, nvalid 32) */
enum { OUT_F32, OUT_BF16, OUT_SILU, OUT_WIDE_NT };

/* 32 accumulators (lo: columns 0-15, hi: 16-31) rounded to bf16 exactly as pxl_f32_to_bf16:
 * vcvtne2ps2bf16 rounds to nearest even and quiets NaNs alike, and the one input where the two
 * differ, an fp32 denormal (flushed here), never reaches it: vdpbf16ps flushes denormal results
 * to zero, and every accumulator has had at least one */
PXL_INLINE __m512i round_bf16x32(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

/* one row of 32 accumulators (lo: columns 0-15) to y, that row's start, where OUT says */
PXL_INLINE void store_row(const int OUT, __m512 lo, __m512 hi, void *y, int nvalid) {
    if (OUT == OUT_SILU) {
        __mmask16 m = nvalid >= 16 ? 0xffff : (__mmask16)((1u << nvalid) - 1);
        _mm256_mask_storeu_epi16((uint16_t *)y, m, (__m256i)_mm512_cvtneps_pbh(silu_mul16(lo, hi)));
    } else if (OUT == OUT_WIDE_NT) {
        __m512i r = round_bf16x32(lo, hi);
        for (int h = 0; h < 2; h++) { /* bf16 h * 16 .. + 16, each into the high half of a lane */
            __m256i half = h ? _mm512_extracti64x4_epi64(r, 1) : _mm512_castsi512_si256(r);
            __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
            _mm512_stream_ps((float *)y + 16 * h, _mm512_castsi512_ps(wide));
        }
    } else if (OUT == OUT_BF16) { /* no fp32 tile: the row leaves as 32 bf16, one store */
        __mmask32 m = nvalid >= 32 ? 0xffffffffu : (__mmask32)((1u << nvalid) - 1);
        _mm512_mask_storeu_epi16((uint16_t *)y, m, round_bf16x32(lo, hi));
    } else {
        __mmask16 m0 = nvalid >= 16 ? 0xffff : (__mmask16)((1u << nvalid) - 1);
        __mmask16 m1 = nvalid >= 32 ? 0xffff : nvalid <= 16 ? 0 : (__mmask16)((1u << (nvalid - 16)) - 1);
        _mm512_mask_storeu_ps((float *)y, m0, lo);
        _mm512_mask_storeu_ps((float *)y + 16, m1, hi);
    }
}

/* row i of Y (ldy elements apart, bf16 for OUT_BF16 / OUT_SILU, else fp32) */
PXL_INLINE void *row_of(const int OUT, void *Y, size_t ldy, int i) {
    return (char *)Y + (size_t)i * ldy * (OUT == OUT_BF16 || OUT == OUT_SILU ? 2 : 4);
}

PXL_INLINE void ukernel(const int RM, const int OUT, size_t K2, const uint16_t *X, size_t ldx, const uint16_t *Wp,
                        void *Y, size_t ldy, int nvalid, const char *pf, size_t npf) {
    __m512 acc[12][2];
    for (int i = 0; i < RM; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int streaming = npf >= 2 * K2; /* the panel's only call (pxl_gemm_p_fn) */
    for (size_t p = 0; p < K2; p++) {
        /* lines ahead, into L2: they stream from DRAM, where L2 keeps enough misses in flight,
         * and a panel (K x 64 bytes) outgrows L1 before the calls after this one reach it */
        if (streaming) {
            pxl_pf_stream((const char *)Wp, K2 * 128, pf, p * 128, 2, 2); /* the step's 128 bytes */
        } else if (p < npf) {
            _mm_prefetch(pf + p * 64, _MM_HINT_T1);
        }
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(Wp + p * 64), b1 = (__m512bh)_mm512_loadu_si512(Wp + p * 64 + 32);
        for (int i = 0; i < RM; i++) {
            uint32_t pair;
            memcpy(&pair, X + i * ldx + 2 * p, 4);
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a, b1);
        }
    }
    for (int i = 0; i < RM; i++) store_row(OUT, acc[i][0], acc[i][1], row_of(OUT, Y, ldy, i), nvalid);
}

/* rm rows of 32 fp32 sums (acc, 32 apart), computed elsewhere (the AMX kernels), stored as the
 * kernel `out` (0: pxl_gemm_p_fn, 1: bf16, 2: gated SiLU-mul, 3: widened bf16 around the caches)
 * stores its own: the same roundings, so both sets give the same bits from the same sums */
void pxl_bf16p_store_avx512bf16(int out, int rm, const float *acc, void *Y, size_t ldy, int nvalid) {
#define STORE_CASE(o)                                                                                               \
    case o:                                                                                                        \
        for (int i = 0; i < rm; i++)                                                                               \
            store_row(o, _mm512_loadu_ps(acc + 32 * i), _mm512_loadu_ps(acc + 32 * i + 16), row_of(o, Y, ldy, i),  \
                      nvalid);                                                                                     \
        return;
    switch (out) { STORE_CASE(OUT_F32) STORE_CASE(OUT_BF16) STORE_CASE(OUT_SILU) STORE_CASE(OUT_WIDE_NT) }
#undef STORE_CASE
}

/* the exported kernels: one instance of ukernel per (rows, where the sums go) */
#define RM_CASE(n, OUT, Y) case n: ukernel(n, OUT, K / 2, X, ldx, Wp, Y, ldy, nvalid, pf, npf); return;
#define RM_SWITCH(OUT, Y)                                                                                          \
    switch (rm) {                                                                                                  \
        RM_CASE(1, OUT, Y) RM_CASE(2, OUT, Y) RM_CASE(3, OUT, Y) RM_CASE(4, OUT, Y) RM_CASE(5, OUT, Y)             \
        RM_CASE(6, OUT, Y) RM_CASE(7, OUT, Y) RM_CASE(8, OUT, Y) RM_CASE(9, OUT, Y) RM_CASE(10, OUT, Y)            \
        RM_CASE(11, OUT, Y) RM_CASE(12, OUT, Y)                                                                    \
    }

#define ENTRY(name, OUT, YT)                                                                                       \
    void name(int rm, size_t K, const void *X, size_t ldx, const void *Wp, YT *Y, size_t ldy, int nvalid,           \
              const void *pf, size_t npf) {                                                                         \
        RM_SWITCH(OUT, Y)                                                                                          \
    }
ENTRY(pxl_gemm_bf16p_avx512bf16, OUT_F32, float)           /* pxl_gemm_p_fn */
ENTRY(pxl_gemm_bf16p_bf16_avx512bf16, OUT_BF16, uint16_t)  /* pxl_gemm_p_bf16_fn */
ENTRY(pxl_gemm_bf16p_silu_avx512bf16, OUT_SILU, uint16_t)  /* pxl_gemm_p_bf16_fn, gated panels */
ENTRY(pxl_gemm_bf16p_wide_avx512bf16, OUT_WIDE_NT, float)  /* pxl_gemm_p_fn, the logits */

/* y[j] = bf16(silu(bf16(g[j])) * bf16(u[j])) for j < n: SiLU-mul on two Linears' bf16 outputs
 * given in fp32 (the unfused op, and the fused one's tile path), 16 lanes at a time through the
 * gated kernel's own silu_mul16, so both give the same bits */
void pxl_silu_mul_bf16_avx512bf16(size_t n, const float *g, const float *u, uint16_t *y) {
    for (size_t j = 0; j < n; j += 16) {
        size_t m = n - j < 16 ? n - j : 16;
        __mmask16 k = m == 16 ? 0xffff : (__mmask16)((1u << m) - 1);
        __m512 gv, uv;
        if (m == 16) /* plain loads: a masked load cannot take its data from a store just made */
            gv = _mm512_loadu_ps(g + j), uv = _mm512_loadu_ps(u + j);
        else
            gv = _mm512_maskz_loadu_ps(k, g + j), uv = _mm512_maskz_loadu_ps(k, u + j);
        _mm256_mask_storeu_epi16(y + j, k, (__m256i)_mm512_cvtneps_pbh(silu_mul16(gv, uv)));
    }
}
