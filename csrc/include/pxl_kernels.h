/* Internal: the per-ISA kernel table behind perfxlm_ops.h, and shared helpers.
 *
 * A GEMM "tile" computes Y[i][j] = dot(X row i, W row j) over K for i < rm, j < rn:
 * both operands are read along K (the dot-product form: no weight packing, so decode
 * and prefill read the weights exactly as stored). Drivers in core/ split N over
 * threads and walk T and N in tiles; each ISA only provides tiles and quantised GEMV.
 */
#ifndef PXL_KERNELS_H
#define PXL_KERNELS_H

#include <string.h>

#include "perfxlm_ops.h"

/* Y (rm, rn) with row stride ldy = X (rm rows, stride ldx elements) . W (rn rows, stride ldw) */
typedef void (*pxl_tile_fn)(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw,
                            float *Y, size_t ldy);
/* One token's activations quantised for the quantised GEMVs (llama.cpp's q8 scheme): per
 * 32-block b, q (K,) int8 with x ~= d[b] * q, and the Q4 offset terms: a block computes
 *   y_b = d_w d[b] int_dot(nibbles, q) + m_w c[b] + d_w e[b]
 * Q4_0 (w = d_w (n - 8)):  c = 0, e = -8 d sum(q);
 * Q4_1 (w = d_w n + m_w):  c = d sum(q), e = 0: the block's sum(w q d), as llama.cpp's Q8_1
 *   s term gives it (the rounding of x meets w, which is near zero on average; the exact
 *   sum(x) would leave it meeting w - m_w - 8 d_w, the block's range centre, which is not).
 * Q8_0 repacked (PXL_Q8_0R, w + 128 stored unsigned): c = 0, e = -128 sum(q), so the
 *   block's dot is the exact integer int_dot(w + 128, q) + e.
 * Dot products run in uint8/int8 x int8 -> exact int32 (VNNI, maddubs). */
typedef struct {
    const int8_t *q;
    const float *d, *c, *e;
} pxl_qx;
/* quantises T rows of fp32 x (T, K) for weight format fmt: q (T, K), d, c, e (T, K/32) */
void pxl_quantize_x(int fmt, size_t T, size_t K, const float *x, int8_t *q, float *d, float *c, float *e);
/* the same at 16 bits (PXL_QX_INT16): row t as two int8 tokens 2t (high plane, scale 255 s)
 * and 2t + 1 (low plane, scale s) whose results add up: q (2T, K), d, c, e (2T, K/32) */
void pxl_quantize_x16(int fmt, size_t T, size_t K, const float *x, int8_t *q, float *d, float *c, float *e);
/* y[n] = sum_b y_b (above) for n in [n0, n1) */
typedef void (*pxl_gemv_q_fn)(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y);
/* T <= PXL_QR_T tokens x[t] on quantised weights repacked 16 rows a block (PXL_Q*R, from
 * W's first row): y[t * ldy + n] for n < rows; each token's result is independent of T */
typedef void (*pxl_gemv_qr_fn)(size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y,
                               size_t ldy);
/* 8: each block's weights, unpacked once, serve 8 tokens; their 16 accumulators (Q4_1's offsets
 * included) and the 8 weight vectors fit AVX-512's 32 registers */
#define PXL_QR_T 8
/* Y (rm <= 12, nvalid <= 32 of the panel's features) = X (rm, K) . one packed panel
 * (PXL_BF16P with X bf16, K even; PXL_F32P with X fp32). Meanwhile it prefetches npf cache
 * lines from pf, at most one per K step; npf as many lines as the panel has means the call is
 * its panel's only one, streaming it from memory: its prefetches then run ahead through this
 * panel into pf's (pxl_pf_ahead; pf NULL: none past this panel). A hint: the portable kernels
 * ignore it. */
typedef void (*pxl_gemm_p_fn)(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                              int nvalid, const void *pf, size_t npf);
/* Y (rm <= bf16p_rm rows x 32 fp32, ldy apart) = (accumulate ? Y : 0) + X (rm, K bf16) . a
 * packed panel's K rows (K a multiple of 32): one block of a long K, the sums passing through
 * Y from block to block exactly (the same bits as one pass). Prefetches npf lines from pf, as
 * pxl_gemm_p_fn does */
typedef void (*pxl_gemm_p_acc_fn)(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                                  int accumulate, const void *pf, size_t npf);
/* the same product rounded to bf16 (as pxl_f32_to_bf16) and stored to y (ldy) by the kernel
 * itself: no fp32 tile goes through memory between the sums and the output */
typedef void (*pxl_gemm_p_bf16_fn)(int rm, size_t K, const void *X, size_t ldx, const void *Wp, uint16_t *y,
                                   size_t ldy, int nvalid, const void *pf, size_t npf);

/* y[j] = bf16(silu(bf16(g[j])) * bf16(u[j])) for j < n, g and u fp32 (two Linears' outputs
 * before rounding): SiLU-mul in bf16, fused (pxl_linear_silu) and not (pxl_silu_mul) alike */
typedef void (*pxl_silu_bf16_fn)(size_t n, const float *g, const float *u, uint16_t *y);

/* rows [n0, n0 + rows) of repacked blocks (n0 a multiple of PXL_QR_ROWS, rows <= PXL_PANEL)
 * dequantised into one bf16 panel [K/2][PXL_PANEL][2], rows past `rows` zero: the bits of
 * pxl_dequant_rows_qr rounded to bf16 */
typedef void (*pxl_qr_bf16p_fn)(int fmt, const void *W, size_t n0, size_t rows, size_t K, uint16_t *panel);
/* T <= PXL_QR_BF16_T tokens of bf16 x (T, ldx) on repacked blocks from W's first row, weights exact:
 * sx (T, K/32) the blocks' sums of those bf16 values; y[t * ldy + n] for n < rows */
typedef void (*pxl_gemv_qr_bf16_fn)(int fmt, size_t T, size_t rows, size_t K, const void *W, const uint16_t *x,
                                    size_t ldx, const float *sx, float *y, size_t ldy);
#define PXL_QR_BF16_T 4 /* (5 accumulators a token) */

typedef struct {
    const char *isa;
    int vnni;            /* the CPU has AVX512-VNNI: the int8 kernels use vpdpbusd */
    int rm, rn;          /* largest tile: rm tokens x rn features */
    int gemv_rn;         /* features per tile when T == 1 */
    pxl_tile_fn tile_f32;
    pxl_tile_fn tile_bf16; /* X and W in bf16 (NULL: bf16 weights are widened to fp32 panels) */
    pxl_gemv_q_fn gemv_q[PXL_NFMT];
    /* the repacked formats' kernels, indexed by the GGUF format (NULL: the set does not repack it) */
    pxl_gemv_qr_fn gemv_qr[PXL_NFMT];
    /* the same for a prefill's calls, whose rows (4 panels) stay in cache for all its token
     * groups: more rows per x load, which streaming them from memory in decode would slow
     * (NULL: gemv_qr) */
    pxl_gemv_qr_fn gemm_qr[PXL_NFMT];
    pxl_gemm_p_fn gemm_bf16p; /* NULL: the set does not pack bf16 */
    pxl_gemm_p_bf16_fn gemm_bf16p_bf16; /* NULL: bf16 outputs go through an fp32 tile */
    /* the gated product (pxl_pack_gated panels: nvalid <= 16 outputs of silu(gate) * up, as
     * silu_bf16 computes them); NULL: through the tile and silu_bf16 */
    pxl_gemm_p_bf16_fn gemm_bf16p_silu;
    /* bf16 values stored widened to fp32 around the caches (the logits): Y 64-byte aligned,
     * nvalid 32; NULL: through the tile */
    pxl_gemm_p_fn gemm_bf16p_wide_nt;
    /* gemm_bf16p in blocks of K for fp32 out (pxl_linear.h: PXL_KC); NULL: one pass over K */
    pxl_gemm_p_acc_fn gemm_bf16p_acc;
    pxl_gemm_p_fn gemm_f32p;  /* NULL: the set does not pack fp32 */
    pxl_silu_bf16_fn silu_bf16; /* NULL: the portable pxl_silu_mul1 loop */
    int bf16p_rm; /* tokens per gemm_bf16p* call (0: PXL_PANEL_RM) */
    /* repacked blocks into a bf16 panel for gemm_bf16p: bf16 x on quantised weights
     * (pxl_set_quant_x); NULL: int8 dot products only */
    pxl_qr_bf16p_fn qr_bf16p;
    /* 1: a prefill (PXL_QR_PANEL_MIN_T tokens) takes those panels by default, the set's bf16
     * GEMM outrunning its int8 dot products (AMX) */
    int qr_bf16p_prefill;
    /* bf16 x on repacked blocks without a panel, for decode-sized T under PXL_QX_BF16 (and
     * every T when batch invariant); NULL: the panels at every T */
    pxl_gemv_qr_bf16_fn gemv_qr_bf16;
    /* attention on tiles over a bf16 cache (pxl_attn_amx.c), up to 16 query rows, for every item
     * alike (pxl_attention.c), after attn_config(rows) on the calling thread; NULL: the float32
     * loops. attn_kt lays 16 keys out as the tiles take them (16 hd bf16) and attn_qk scores them
     * against q split into bf16 hi, mid and lo tiles; attn_vt lays 32 values out (32 hd bf16) and
     * attn_pv sums nb such blocks weighted by the softmax's weights, split likewise. */
    void (*attn_config)(int rows);
    void (*attn_kt)(size_t hd, const char *const *kr, uint16_t *kt);
    void (*attn_qk)(size_t hd, const uint16_t *qa, const uint16_t *kt, float *s, size_t lds);
    void (*attn_vt)(size_t hd, const char *const *vr, uint16_t *vt);
    void (*attn_pv)(size_t hd, const uint16_t *pa, size_t nb, const uint16_t *vt, float *out);
} pxl_kernel_set;
#define PXL_PANEL_RM 12 /* tokens per gemm_bf16p / gemm_f32p call (PXL_PANEL: pxl_abi.h) */
#define PXL_AMX_RM 32   /* tokens per call of the AMX set's gemm_bf16p*: two 16-row tiles */

/* Linear's paths by token count (pxl_linear.c; the kernel tests pick their reference by them) */
#define PXL_Q_DOT_MAX_T 4      /* quantised weights in GGUF layout: int8 dot products up to this many tokens */
/* from this many tokens, bf16 x on quantised weights runs dequantised panels packed for the bf16
 * micro-kernel (for fewer tokens, packing the panels costs more than it saves) */
#define PXL_PACKED_Q_MIN_T 64
/* from this many tokens (one full AMX call), repacked blocks run as bf16 panels on sets with
 * qr_bf16p_prefill: dequantising a panel then costs less than the int8 dot products it replaces */
#define PXL_QR_PANEL_MIN_T 32

extern const pxl_kernel_set pxl_kernels_generic;
#if defined(__x86_64__)
extern const pxl_kernel_set pxl_kernels_avx2, pxl_kernels_avx512, pxl_kernels_avx512bf16, pxl_kernels_amx;
/* the x86 files' kernels, which pxl_dispatch.c assembles into those sets */
void pxl_tile_f32_avx2(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                       size_t ldy);
void pxl_tile_bf16_avx2(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                        size_t ldy);
void pxl_tile_f32_avx512(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                         size_t ldy);
void pxl_tile_bf16_avx512(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                          size_t ldy);
void pxl_tile_bf16_avx512bf16(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw,
                              float *Y, size_t ldy);
void pxl_gemm_f32p_avx512(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                          int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_avx512bf16(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                               int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_bf16_avx512bf16(int rm, size_t K, const void *X, size_t ldx, const void *Wp, uint16_t *Y,
                                    size_t ldy, int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_silu_avx512bf16(int rm, size_t K, const void *X, size_t ldx, const void *Wp, uint16_t *Y,
                                    size_t ldy, int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_wide_avx512bf16(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y,
                                    size_t ldy, int nvalid, const void *pf, size_t npf);
void pxl_silu_mul_bf16_avx512bf16(size_t n, const float *g, const float *u, uint16_t *y);
/* rm rows of 32 fp32 sums (acc, 32 apart) stored as the kernel `out` stores its own (0: gemm_bf16p,
 * 1: _bf16, 2: _silu, 3: _wide): the AMX kernels' sums leave through the AVX512-BF16 stores */
void pxl_bf16p_store_avx512bf16(int out, int rm, const float *acc, void *Y, size_t ldy, int nvalid);
/* repacked blocks into a bf16 panel (pxl_qr_bf16p_avx512bf16.c: pxl_qr_bf16p_fn) */
void pxl_qr_bf16p_avx512bf16(int fmt, const void *W, size_t n0, size_t rows, size_t K, uint16_t *panel);
/* bf16 x on repacked blocks (pxl_qr_gemv_bf16_avx512bf16.c: pxl_gemv_qr_bf16_fn) */
void pxl_gemv_qr_bf16_avx512bf16(int fmt, size_t T, size_t rows, size_t K, const void *W, const uint16_t *x,
                                 size_t ldx, const float *sx, float *y, size_t ldy);
/* the packed bf16 kernels on AMX tiles (pxl_bf16_gemm_packed_amx.c): the AVX512-BF16 set's contracts */
void pxl_gemm_bf16p_amx(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy, int nvalid,
                        const void *pf, size_t npf);
void pxl_gemm_bf16p_bf16_amx(int rm, size_t K, const void *X, size_t ldx, const void *Wp, uint16_t *Y, size_t ldy,
                             int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_silu_amx(int rm, size_t K, const void *X, size_t ldx, const void *Wp, uint16_t *Y, size_t ldy,
                             int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_wide_amx(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                             int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_acc_amx(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                            int accumulate, const void *pf, size_t npf);
void pxl_attn_config_amx(int rows);
void pxl_attn_kt_amx(size_t hd, const char *const *kr, uint16_t *kt);
void pxl_attn_qk_amx(size_t hd, const uint16_t *qa, const uint16_t *kt, float *s, size_t lds);
void pxl_attn_vt_amx(size_t hd, const char *const *vr, uint16_t *vt);
void pxl_attn_pv_amx(size_t hd, const uint16_t *pa, size_t nb, const uint16_t *vt, float *out);
double pxl_amx_peak_bf16(size_t iters); /* the roofline's probe: ops done by this thread */
/* quantised GEMVs by weight format: GGUF blocks with vpmaddubsw (AVX2, AVX-512F) or vpdpbusd
 * (VNNI); repacked blocks (AVX-512F, VNNI), and their prefill kernels (gemm_qr, VNNI) */
extern const pxl_gemv_q_fn pxl_gemv_q_avx2[PXL_NFMT], pxl_gemv_q_avx512vnni[PXL_NFMT];
extern const pxl_gemv_qr_fn pxl_gemv_qr_avx512[PXL_NFMT], pxl_gemv_qr_avx512vnni[PXL_NFMT];
extern const pxl_gemv_qr_fn pxl_gemm_qr_avx512vnni[PXL_NFMT];
#endif
#if defined(__riscv_v_intrinsic) && __riscv_v_intrinsic >= 11000
#define PXL_HAVE_RVV 1
extern const pxl_kernel_set pxl_kernels_rvv;
#endif
const pxl_kernel_set *pxl_kernels(void);

/* for the kernels' building blocks: inlined into every instance, so each is compiled with the
 * constant arguments (rows, format, dtype) of its caller */
#define PXL_INLINE static inline __attribute__((always_inline))

static inline float pxl_bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline uint16_t pxl_f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16, quiet = (b >> 16) | 0x40;
    return (uint16_t)((b & 0x7fffffff) > 0x7f800000 ? quiet : rounded); /* a select: vectorises */
}
static inline float pxl_round_bf16(float f) { return pxl_bf16_to_f32(pxl_f32_to_bf16(f)); } /* f's bf16 value */

/* How far a streaming call's prefetches run ahead: one panel, or this many bytes where panels
 * are longer. A core keeps only so many misses in flight, so lines prefetched a 512 KB panel
 * ahead (K 8192) leave L2 or wait behind the nearer ones before the loads reach them. */
#define PXL_PF_AHEAD (128 * 1024)
/* the line a streaming call prefetches while it reads byte b of its panel w (bytes long): in
 * the panel itself, or in the next one, pf; NULL past the panel where there is no next */
PXL_INLINE const char *pxl_pf_ahead(const char *w, size_t bytes, const char *pf, size_t b) {
    size_t s = b + (bytes < PXL_PF_AHEAD ? bytes : PXL_PF_AHEAD);
    return s < bytes ? w + s : pf ? pf + (s - bytes) : NULL;
}
/* a streaming call's prefetches into L2 for the n lines it reads from byte b of its panel: every
 * line's pxl_pf_ahead (a line beside a prefetched one does not come with it); locality 2 or 1,
 * __builtin_prefetch's (x86: prefetcht1 or prefetcht2) */
PXL_INLINE void pxl_pf_stream(const char *w, size_t bytes, const char *pf, size_t b, int n, const int locality) {
    for (int l = 0; l < n; l++) {
        const char *a = pxl_pf_ahead(w, bytes, pf, b + (size_t)l * 64);
        if (!a) continue;
        if (locality == 1) __builtin_prefetch(a, 0, 1);
        else __builtin_prefetch(a, 0, 2);
    }
}

float pxl_fp16_to_fp32(uint16_t h);

/* GCC/Clang vector types of one 64-byte register, for the portable kernels' vector code
 * (attention, sampling): each ISA clone compiles them to its own instructions */
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t pxl_u16x16 __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PXL_X86_F16C 1
#include <immintrin.h>
/* The hardware's exact f16 -> fp32 conversion (vcvtph2ps). The portable loops are compiled once
 * per x86 level by target_clones, and no macro tells a clone which one it is, so these carry
 * their own target: inlined into the clones that have it (AVX-512F into x86-64-v4, F16C into v3
 * and v4), a call in the others, and picked at run time from cpuid (a check the compiler hoists
 * out of the loops). Results through a pointer: a vector returned across that call would differ
 * in ABI between caller and callee. */
static inline __attribute__((target("avx512f"))) void pxl_f16x16_cvt512(const void *p, f32x16 *out) {
    __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(out, &v, sizeof v);
}
static inline __attribute__((target("avx,f16c"))) void pxl_f16x16_cvt256(const void *p, f32x16 *out) {
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
           hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p + 1));
    memcpy(out, &lo, sizeof lo), memcpy((char *)out + sizeof lo, &hi, sizeof hi);
}
#endif

/* 16 IEEE binary16 values at p -> fp32, exactly, without F16C: exponent and mantissa moved into
 * fp32's places, then scaled by 2^112 (the two biases' difference), which makes subnormals exact
 * too; inf and NaN keep an all-ones exponent. Integer and float lanes only, so every ISA's vector
 * code takes it (there is no portable vector half type: clang's RISC-V backend rejects one, and
 * GCC 12 converts one a lane at a time). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi" /* a vector value: always inlined, in every clone */
static inline __attribute__((always_inline)) f32x16 pxl_f16x16_widen(const void *p) {
    pxl_u16x16 h;
    memcpy(&h, p, sizeof h);
    i32x16 x = __builtin_convertvector(h, i32x16), e = x & 0x7fff, m = e << 13;
    i32x16 big = e >= 0x7c00, v = (i32x16)((f32x16)m * 0x1p112f);
    return (f32x16)(((v & ~big) | ((m | 0x7f800000) & big)) | ((x & 0x8000) << 16));
}
/* the same by the best conversion this CPU has */
static inline __attribute__((always_inline)) f32x16 pxl_f16x16_to_f32(const void *p) {
#ifdef PXL_X86_F16C
    f32x16 out;
    if (__builtin_cpu_supports("avx512f")) return pxl_f16x16_cvt512(p, &out), out;
    if (__builtin_cpu_supports("f16c")) return pxl_f16x16_cvt256(p, &out), out;
#endif
    return pxl_f16x16_widen(p);
}
#pragma GCC diagnostic pop

/* Portable C loops compiled once per x86 level (AVX-512 F/BW/VL/DQ, AVX2+FMA, baseline) and
 * picked at load time: AVX-512 without BW would leave every bf16 loop scalar. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PXL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PXL_CLONES
#endif

/* the largest |x[j]|, j < n: the bit patterns of |x| order as their values do, so this is an
 * integer max, which compilers vectorise (a float max is a reduction they may not reorder) */
static inline float pxl_amax(const float *x, int n) {
    uint32_t m = 0;
    for (int j = 0; j < n; j++) {
        uint32_t b;
        memcpy(&b, x + j, 4);
        b &= 0x7fffffffu;
        m = b > m ? b : m;
    }
    float a;
    memcpy(&a, &m, 4);
    return a;
}

/* round half to even by the 1.5 * 2^23 shifter (|v| < 2^22): the integer is then the float's
 * low mantissa bits, read without a float-to-int conversion (qemu 7.2's RVV translator aborts
 * on the vfncvt.rtz clang emits for one) */
static inline int32_t pxl_round_even(float v) {
    float f = v + 12582912.0f;
    int32_t bits;
    memcpy(&bits, &f, 4);
    return bits - 0x4B400000;
}

/* fp32 -> IEEE binary16 rounded to nearest even, as torch's .to(float16) and llama.cpp's f16 KV
 * cache store it: past the largest f16 (65504) it is inf, NaN stays NaN, below 2^-14 subnormal */
static inline uint16_t pxl_f32_to_f16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t s = (b >> 16) & 0x8000, a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(s | 0x7e00);
    if (a >= 0x477ff000u) return (uint16_t)(s | 0x7c00); /* 65520 and up round past 65504 */
    if (a < 0x38800000u) {                                /* |f| < 2^-14: |f| 2^24 rounded, 1024 the least normal */
        float m;
        memcpy(&m, &a, 4);
        return (uint16_t)(s | (uint32_t)pxl_round_even(m * 16777216.0f));
    }
    uint32_t r = a - 0x38000000u; /* the exponent rebiased (127 -> 15), then 13 mantissa bits rounded off */
    return (uint16_t)(s | ((r + 0xfffu + ((r >> 13) & 1)) >> 13));
}

/* PXL_QX_INT16: X (|X| <= 32512 = 255 * 127 + 127) as 255 h + l with h, l in [-127, 127], two int8
 * planes the int8 kernels take as two tokens (scales 255 s and s); h = round(X / 255), and 255
 * is odd, so there are no halves to break */
#define PXL_X16_MAX 32512.0f
static inline void pxl_split_x16(int32_t X, int32_t *h, int32_t *l) {
    *h = (X + (X < 0 ? -127 : 127)) / 255;
    *l = X - 255 * *h;
}

/* exp(x), x clamped to [-87, 88]: 2^(x log2 e) split into 2^n by the exponent bits and 2^f,
 * f in [-0.5, 0.5], by a degree-6 polynomial (relative error < 2e-7); plain arithmetic, so
 * loops over it vectorise (softmax, SiLU) where libm's expf would not */
static inline float pxl_exp(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    /* round to nearest by the 1.5 * 2^23 shifter: plain arithmetic, so it vectorises anywhere;
     * the integer n is the shifted float's low mantissa bits (no float-to-int conversion: qemu
     * 7.2's RVV translator aborts on the vfncvt.rtz clang emits for one, where a block starts) */
    float t = x * 1.44269504f, sh = t + 12582912.0f, n = sh - 12582912.0f, f = t - n;
    int32_t ni;
    memcpy(&ni, &sh, 4);
    ni -= 0x4B400000;
    float p = 1.5403530e-4f;
    p = p * f + 1.3333558e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits = (ni + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* one element of SiLU-mul, silu(g) * u: the expression pxl_silu_mul and the gated Linear's
 * epilogue share, so the fused path gives the same bits */
static inline float pxl_silu_mul1(float g, float u) { return g / (1.0f + pxl_exp(-g)) * u; }

/* pxl_exp, pxl_silu_mul1 and pxl_f32_to_bf16 on 16 lanes: the same operations lane for lane,
 * so the same bits as the scalar forms vectorised in the same clone, in one 512-bit register
 * where the clone has them (GCC's vectoriser picks 256-bit ones on x86-64-v4) */
typedef uint32_t pxl_u32x16 __attribute__((vector_size(64)));
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi" /* vector values: always inlined, in every clone */
PXL_INLINE f32x16 pxl_splat16(float x) { /* the form GCC turns into one vbroadcastss (from memory) in a clone */
    f32x16 v = {x};
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}
PXL_INLINE f32x16 pxl_select16(i32x16 m, f32x16 a, f32x16 b) { return (f32x16)((m & (i32x16)a) | (~m & (i32x16)b)); }
PXL_INLINE f32x16 pxl_exp16(f32x16 x) {
    x = pxl_select16(x < pxl_splat16(-87.0f), pxl_splat16(-87.0f), x);
    x = pxl_select16(x > pxl_splat16(88.0f), pxl_splat16(88.0f), x);
    f32x16 t = x * pxl_splat16(1.44269504f), sh = t + pxl_splat16(12582912.0f), n = sh - pxl_splat16(12582912.0f);
    f32x16 f = t - n;
    i32x16 ni = (i32x16)sh - 0x4B400000;
    f32x16 p = pxl_splat16(1.5403530e-4f);
    p = p * f + pxl_splat16(1.3333558e-3f);
    p = p * f + pxl_splat16(9.6181291e-3f);
    p = p * f + pxl_splat16(5.5504109e-2f);
    p = p * f + pxl_splat16(2.4022651e-1f);
    p = p * f + pxl_splat16(6.9314718e-1f);
    p = p * f + pxl_splat16(1.0f);
    return p * (f32x16)((ni + 127) << 23);
}
PXL_INLINE f32x16 pxl_silu_mul16(f32x16 g, f32x16 u) { return g / (pxl_splat16(1.0f) + pxl_exp16(-g)) * u; }
PXL_INLINE pxl_u16x16 pxl_f32x16_to_bf16(f32x16 f) {
    pxl_u32x16 b = (pxl_u32x16)f, rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16, quiet = (b >> 16) | 0x40;
    pxl_u32x16 nan = (pxl_u32x16)((b & 0x7fffffff) > 0x7f800000);
    return __builtin_convertvector((nan & quiet) | (~nan & rounded), pxl_u16x16);
}
#pragma GCC diagnostic pop

/* a per-thread buffer that only grows (reused across calls: no allocation per step);
 * slots are independent buffers: 0-2 inputs/outputs of an op, 3 a worker's own panel,
 * 4 the MoE op's rows (which calls Linear, so it cannot share 0-3) */
#define PXL_SCRATCH_SLOTS 5
void *pxl_scratch(int slot, size_t bytes);
/* the calling thread onto the first bound CPU for a step, and back (pxl_threads.c); pin
 * returns 1 if it pinned (then unpin restores *saved) */
typedef struct { uint64_t bits[16]; } pxl_cpu_mask;
int pxl_pin_caller(pxl_cpu_mask *saved);
void pxl_unpin_caller(const pxl_cpu_mask *saved);

/* Threads. Every op body is "team code": it runs on all threads of the current OpenMP
 * team and shares work with orphaned `omp for` / `omp single`, so the same body serves a
 * standalone call (which starts a team of `nth` threads just for itself) and a compiled
 * step (pxl_plan_run: one persistent team for the whole step, a barrier between nodes,
 * instead of a fork and join per op). Bodies end without a barrier; the caller adds it. */
#ifdef _OPENMP
#include <omp.h>
#define PXL_ITH() ((size_t)omp_get_thread_num())
#define PXL_NTH() ((size_t)omp_get_num_threads())
#define PXL_IN_TEAM() (omp_get_level() > 0)
#else
#define PXL_ITH() ((size_t)0)
#define PXL_NTH() ((size_t)1)
#define PXL_IN_TEAM() 1
#endif
/* Entries into the library's team code from outside it, counted. Code outside the library
 * (oneDNN under torch) may change or release a thread's tile configuration (AMX) between two
 * entries, never during one, so the tile kernels trust the configuration they loaded within
 * an entry (pxl_amx.h) rather than read it back each call. */
extern uint64_t pxl_entries;
static inline void pxl_enter(void) { __atomic_add_fetch(&pxl_entries, 1, __ATOMIC_RELAXED); }
#define PXL_ON_TEAM(nth, ...)                                                      \
    do {                                                                           \
        if (PXL_IN_TEAM()) {                                                       \
            __VA_ARGS__;                                                           \
        } else {                                                                   \
            pxl_enter();                                                           \
            _Pragma("omp parallel num_threads(nth)") { __VA_ARGS__; }              \
        }                                                                          \
    } while (0)

/* this thread's share [*n0, *n1) of [0, n), in multiples of `align` */
static inline void pxl_split(size_t n, size_t align, size_t *n0, size_t *n1) {
    size_t nth = PXL_NTH(), per = (n + nth - 1) / nth;
    per = (per + align - 1) / align * align;
    *n0 = PXL_ITH() * per < n ? PXL_ITH() * per : n;
    *n1 = *n0 + per < n ? *n0 + per : n;
}

/* dequantise rows [n0, n0 + rows) of a weight matrix in `fmt` into fp32 (rows, K); for a
 * repacked format W starts at a 16-row block and n0 is a multiple of 16 */
void pxl_dequant_rows(int fmt, const void *W, size_t n0, size_t rows, size_t K, float *out);
/* repacked 16-row blocks (PXL_Q*R) of quantised rows (N, K) in GGUF format fmt */
void pxl_repack_q(int fmt, size_t N, size_t K, const void *W, void *out);
void pxl_dequant_rows_qr(int fmt, const void *W, size_t n0, size_t rows, size_t K, float *out);
/* portable kernels for the packed layouts, used by sets without their own */
void pxl_gemm_f32p_generic(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                           int nvalid, const void *pf, size_t npf);
void pxl_gemm_bf16p_generic(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                            int nvalid, const void *pf, size_t npf);
/* the scalar kernel for every repacked format: any set runs PXL_Q*R weights */
void pxl_gemv_qr_generic(int fmt, size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y,
                         size_t ldy);
size_t pxl_row_bytes(int fmt, size_t K);

#endif
