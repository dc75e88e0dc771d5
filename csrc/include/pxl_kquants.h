/* GGUF K-quants (PXL_Q4_K / PXL_Q5_K / PXL_Q6_K): llama.cpp's super-block layouts (ggml-common.h),
 * kept as stored, and the int8 products that run on them.
 *
 * A super-block holds 256 weights of one row:
 *   Q4_K (144 B): { fp16 d, dmin; uint8 scales[12]; uint8 qs[128]; }
 *     8 sub-blocks of 32, each a 6-bit scale sc and min m (packed in scales[12], see
 *     pxl_k4_scale_min); w = d sc q - dmin m, q a nibble: 64-value chunk j takes its first 32
 *     values from the low nibbles of qs[32j ..], the next 32 from the high ones.
 *   Q5_K (176 B): { fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]; }
 *     as Q4_K with a fifth bit: value l of chunk j adds 16 if bit 2j (low half) or 2j + 1 (high
 *     half) of qh[l] is set.
 *   Q6_K (210 B): { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d; }
 *     16 sub-blocks of 16, w = d scales[s] (q - 32), q 6 bits: in each 128-value half, group g
 *     (32 values) takes ql[l + 32 (g & 1)]'s low (g < 2) or high nibble and bits 2g, 2g + 1 of qh[l].
 * x is quantised per 256 as llama.cpp's Q8_K: q int8 with x ~= d q, and bsums, the sums of q
 * over each 16, which turn the mins (Q4_K / Q5_K) and Q6_K's -32 into one product per sub-block:
 *   y = sum_superblocks d_w d_x (sum_s sc_s dot_s(q_w, q_x)) - dmin d_x sum_s m_s bsum_s
 * every dot_s exact in int32. */
#ifndef PXL_KQUANTS_H
#define PXL_KQUANTS_H

#include "pxl_kernels.h"

typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[PXL_QK_K / 2]; } pxl_block_q4_K;
typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[PXL_QK_K / 8]; uint8_t qs[PXL_QK_K / 2]; } pxl_block_q5_K;
typedef struct { uint8_t ql[PXL_QK_K / 2]; uint8_t qh[PXL_QK_K / 4]; int8_t scales[PXL_QK_K / 16]; uint16_t d; } pxl_block_q6_K;
_Static_assert(sizeof(pxl_block_q4_K) == 144 && sizeof(pxl_block_q5_K) == 176 && sizeof(pxl_block_q6_K) == 210,
               "GGUF's K-quant block sizes");

/* Q4_K repacked 16 rows at a time (PXL_Q4_KR): super-block i of rows 16b .. 16b + 15 is block
 * [b][i] (zero rows pad N). Per row r: d, dmin as stored; sub-block j's 6-bit scale at sc[16j + r];
 * the mins of sub-blocks 2k and 2k + 1 at m[32k + 2r] and m[32k + 2r + 1]; quant vector p (values
 * 8p .. 8p + 7) holds in byte 4r + s value 8p + s in its low nibble and 8p + 4 + s in its high one
 * (the layout of the repacked 32-blocks, pxl_q_gemv_r16_avx512.c), so one int8 dot-product
 * instruction serves 16 rows with 4 of x broadcast. 148 bytes a row and super-block (Q4_K: 144). */
typedef struct {
    uint16_t d[16], dmin[16];
    uint8_t sc[8 * 16];
    uint8_t m[8 * 16];
    uint8_t qs[PXL_QK_K / 8 * 64];
} pxl_block_q4_Kx16;
_Static_assert(sizeof(pxl_block_q4_Kx16) == 16 * 148, "16 rows of 148 bytes");
/* Q5_K repacked likewise (PXL_Q5_KR): Q4_KR's block of the low 4 bits, then the fifth bits: qh
 * vector j (sub-block j) holds in byte 4r + s, bit 2p, the fifth bit of the value whose low bits
 * are the low nibble of byte 4r + s of quant vector 4j + p, and in bit 2p + 1 that of its high
 * nibble. 180 bytes a row and super-block (Q5_K: 176). */
typedef struct {
    pxl_block_q4_Kx16 k4;
    uint8_t qh[PXL_QK_K / 32 * 64];
} pxl_block_q5_Kx16;
_Static_assert(sizeof(pxl_block_q5_Kx16) == 16 * 180, "16 rows of 180 bytes");
/* Q6_K repacked likewise (PXL_Q6_KR): d as stored; sub-block s's scale of row r at sc[16s + r];
 * the low 4 bits of values 8p .. 8p + 7 in ql vector p as Q4_KR's nibbles; qh vector s holds,
 * in byte 4r + t, the high 2 bits of values 16s + t, 16s + 4 + t, 16s + 8 + t, 16s + 12 + t in
 * bits 0-1, 2-3, 4-5, 6-7. The same 210 bytes a row and super-block as Q6_K. */
typedef struct {
    uint16_t d[16];
    int8_t sc[16 * 16];
    uint8_t ql[PXL_QK_K / 8 * 64];
    uint8_t qh[PXL_QK_K / 16 * 64];
} pxl_block_q6_Kx16;
_Static_assert(sizeof(pxl_block_q6_Kx16) == 16 * 210, "16 rows of 210 bytes");
#define PXL_QK_K_MAX_BLOCKS 256 /* K up to 65536: the repacked kernel's per-token scratch */
/* N rows of Q4_K / Q5_K / Q6_K (N, K) -> PXL_Q4_KR / PXL_Q5_KR / PXL_Q6_KR blocks */
void pxl_repack_qk(int fmt, size_t N, size_t K, const void *W, void *out);
#if defined(__AVX512BW__)
#include <immintrin.h>
/* q | the bit `bit` of every byte of h, moved to bit 4 (PXL_Q5_KR's fifth bits over quants q of
 * bits 0-3): one 16-bit-lane shift (at most 4 left, 3 right: no neighbouring byte's bit reaches
 * bit 4) and one ternary-logic q | (h' & 0x10) */
static inline __m512i pxl_or_bit4(__m512i q, __m512i h, const int bit) {
    const __m512i s =
        bit <= 4 ? _mm512_slli_epi16(h, (unsigned)(4 - bit)) : _mm512_srli_epi16(h, (unsigned)(bit - 4));
    return _mm512_ternarylogic_epi32(q, s, _mm512_set1_epi8(0x10), 0xf8); /* a | (b & c) */
}
#endif
/* the repacked format of a K-quant as stored */
static inline int pxl_kr_of(int fmt) { return fmt == PXL_Q4_K ? PXL_Q4_KR : fmt == PXL_Q5_K ? PXL_Q5_KR : PXL_Q6_KR; }

/* one token's x as Q8_K: q (K,), d (K/256,), bsums (K/16,) */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *bsums;
} pxl_q8k;
/* bytes of one token's Q8_K buffer (q | d | bsums), 4-byte aligned pieces */
static inline size_t pxl_q8k_bytes(size_t K) { return K + K / PXL_QK_K * 4 + K / 16 * 2; }
/* the pieces of such a buffer (K % 256 == 0: d 4-byte aligned when buf is) */
static inline pxl_q8k pxl_q8k_at(const void *buf, size_t K) {
    const float *d = (const float *)((const int8_t *)buf + K);
    return (pxl_q8k){buf, d, (const int16_t *)(d + K / PXL_QK_K)};
}
/* quantises fp32 x (K,), K % 256 == 0, into buf laid out as pxl_q8k_bytes says; *out points into it */
void pxl_quantize_q8k(size_t K, const float *x, void *buf, pxl_q8k *out);
/* PXL_QX_INT16: x at 16 bits as two Q8_K planes hi and lo (each laid out as above) whose dot
 * products add up to x's */
void pxl_quantize_q8k16(size_t K, const float *x, void *hi, void *lo);

/* y[n] for rows n in [n0, n1) of K-quant weights W (rows of K/256 super-blocks), fmt PXL_Q4_K..Q6_K */
typedef void (*pxl_gemv_qk_fn)(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y);
void pxl_gemv_qk_generic(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y);
#if defined(__x86_64__)
void pxl_gemv_qk_avx2(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y);
void pxl_gemv_qk_avx512vnni(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y);
#endif
#ifdef PXL_HAVE_RVV
void pxl_gemv_qk_rvv(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y);
#endif
/* up to PXL_QK_T tokens x[t] at once, each weight unpacked once for all of them:
 * y[t * ldy + n] for rows n in [n0, n1); fmt PXL_Q4_K or PXL_Q6_K (a Q4_K_M file's types).
 * Each token's result is the one it gets alone. */
#define PXL_QK_T 4
typedef void (*pxl_gemm_qk_fn)(int fmt, size_t T, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x,
                               float *y, size_t ldy);
#if defined(__x86_64__)
void pxl_gemm_qk_avx512(int fmt, size_t T, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y,
                        size_t ldy);
#endif
/* T <= PXL_QKR_T tokens on PXL_Q4_KR / Q5_KR / Q6_KR blocks (from the first row block):
 * y[t * ldy + n], n < rows */
typedef void (*pxl_gemm_kr_fn)(int fmt, size_t T, size_t rows, size_t K, const void *W, const pxl_q8k *x, float *y,
                               size_t ldy);
/* 8: each 16-row vector, unpacked once, serves 8 tokens; their fp32 accumulators and integer
 * sums (24 registers for Q4_K) fit beside the block's vectors in AVX-512's 32 */
#define PXL_QKR_T 8
#if defined(__x86_64__)
void pxl_gemm_kr_avx512vnni(int fmt, size_t T, size_t rows, size_t K, const void *W, const pxl_q8k *x, float *y,
                            size_t ldy);
#endif
/* the kernel set's kernel for the repacked K-quants, or NULL (then they are not repacked) */
pxl_gemm_kr_fn pxl_gemm_kr_for(const pxl_kernel_set *ks);
/* the multi-token kernel of a kernel set for fmt, or NULL (then token by token on pxl_gemv_qk_for's) */
pxl_gemm_qk_fn pxl_gemm_qk_for(const pxl_kernel_set *ks, int fmt);
/* Linear on K-quant weights takes the int8 products on Q8_K x for T tokens (else dequantised
 * panels): decode-sized T, batch-invariant mode, and with a multi-token kernel every T below
 * PXL_QK_DOT_MAX_T, or every T where bf16 x has no packed panels to go to */
#define PXL_QK_DOT_MAX_T 256
int pxl_qk_dot(const pxl_kernel_set *ks, int dt, int fmt, size_t T);
/* the kernel for a kernel set: vpdpbusd on sets that imply VNNI, vpmaddubsw on the other x86
 * ones, RVV on rvv, the portable loops else */
pxl_gemv_qk_fn pxl_gemv_qk_for(const pxl_kernel_set *ks);
/* rows [0, rows) of K-quant W -> fp32 (rows, K) */
void pxl_dequant_rows_k(int fmt, const void *W, size_t rows, size_t K, float *out);
/* rows [n0, n0 + rows) of PXL_Q4_KR / Q5_KR / Q6_KR blocks -> fp32 (rows, K): the values
 * pxl_dequant_rows_k gives for the rows as stored */
void pxl_dequant_rows_kr(int fmt, const void *W, size_t n0, size_t rows, size_t K, float *out);

/* sub-block j's 6-bit scale and min from Q4_K / Q5_K's packed scales[12] (llama.cpp's get_scale_min_k4) */
static inline void pxl_k4_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63, *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
/* all 8 of them */
static inline void pxl_k4_scales(const uint8_t *q, uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 8; j++) pxl_k4_scale_min(j, q, sc + j, m + j);
}

#endif
