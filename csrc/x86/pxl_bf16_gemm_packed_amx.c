/* bf16 GEMM micro-kernel on packed weights with AMX (Sapphire Rapids and later Xeons): the
 * same contract as pxl_gemm_bf16p_avx512bf16, on tile registers. A packed panel, [K/2][32][2]
 * bf16, is already AMX's "VNNI" layout for B: rows of K pairs, 128 bytes apart, whose first and
 * second 64 bytes are features 0-15 and 16-31. So per 32 values of K the kernel loads one or two
 * A tiles (up to 32 rows of x, 64 bytes each) and two B tiles straight from the panel, and runs
 * two or four tdpbf16ps into C tiles of up to 16 x 16 fp32; no repacking. Plain fp32 sums of a
 * whole panel leave by tile stores; others through the AVX512-BF16 kernel's own stores
 * (pxl_bf16p_store_avx512bf16), so the roundings, the gated SiLU-mul and the streamed logits
 * are that kernel's. A row's sums depend on its own x only, whatever rm is. K not a multiple
 * of 32 runs the AVX512-BF16 kernel, and so do the smallest decode calls (AVX_MAX_RM). */
#include "pxl_amx.h"
#include "pxl_kernels.h"

__thread pxl_tile_config pxl_tile_loaded; /* (pxl_amx.h) */
__thread uint64_t pxl_tile_loaded_in;

/* tile registers (numbers: the intrinsics paste them into the instruction): rows 0-15 of the
 * call in C0 (features 0-15) and C1 (16-31) from A0, rows 16-31 in C2 and C3 from A1 */
#define C0 0
#define C1 1
#define C2 2
#define C3 3
#define A0 4
#define A1 5
#define B0 6
#define B1 7

/* The tiles' configuration for rm rows (rows past 16 in the second A and C tiles; unused tiles
 * have no rows), built once per rm: one assembled from byte stores just before a call compares
 * it whole would wait on store forwarding every call */
static pxl_tile_config configs[PXL_AMX_RM + 1];
__attribute__((constructor)) static void build_configs(void) {
    for (int rm = 1; rm <= PXL_AMX_RM; rm++) {
        const uint8_t r0 = rm < 16 ? (uint8_t)rm : 16, r1 = (uint8_t)(rm - r0);
        pxl_tile_config *c = &configs[rm];
        c->palette = 1;
        c->rows[C0] = c->rows[C1] = c->rows[A0] = r0;
        c->rows[C2] = c->rows[C3] = c->rows[A1] = r1;
        c->rows[B0] = c->rows[B1] = 16;
        for (int t = C0; t <= B1; t++) c->colsb[t] = c->rows[t] ? 64 : 0;
    }
}
static inline void configure(int rm) { pxl_tile_configure(&configs[rm]); }

/* acc (rm x 32, lda apart) = (load ? acc : 0) + X (rm <= 32 rows, K) . the panel; each B tile
 * serves both A tiles */
static inline void product(int rm, size_t K, const uint16_t *X, size_t ldx, const uint16_t *Wp, float *acc,
                           size_t lda, int load, const char *pf, size_t npf) {
    configure(rm);
    const int two = rm > 16;
    if (load) {
        _tile_loadd(C0, acc, lda * 4);
        _tile_loadd(C1, acc + 16, lda * 4);
        if (two) {
            _tile_loadd(C2, acc + 16 * lda, lda * 4);
            _tile_loadd(C3, acc + 16 * lda + 16, lda * 4);
        }
    } else {
        _tile_zero(C0);
        _tile_zero(C1);
        if (two) {
            _tile_zero(C2);
            _tile_zero(C3);
        }
    }
    /* a call given as many lines as its panel has is the panel's only one: a decode step's,
     * whose weights stream from memory (a prefill's later calls find the panel in L2) */
    const int streaming = npf >= K;
    for (size_t k = 0; k < K; k += 32) {
        /* A batched decode streams its weights from memory: each k-step prefetches the 32 lines
         * pxl_pf_ahead gives, every line, into L2 only (that stream ran slower when its
         * prefetches also filled L1). A prefill call's share of the next panel is spread over
         * all its k-steps, since issued at once its prefetches fill the line-fill buffers and
         * hold up the tile loads behind them. Streaming, it also prefetches this panel's lines
         * two k-steps ahead into L1, so the 16 loads of a B tile find their lines there rather
         * than waiting on L2 one by one. */
        if (streaming) {
            pxl_pf_stream((const char *)Wp, K * 64, pf, k * 64, 32, 1); /* the k-step's 2 KB */
        } else {
            for (size_t l = npf * k / K; l < npf * (k + 32) / K; l++) _mm_prefetch(pf + l * 64, _MM_HINT_T2);
        }
        if (streaming && k + 64 < K)
            for (int l = 0; l < 32; l++) _mm_prefetch((const char *)(Wp + (k + 64) * 32) + l * 64, _MM_HINT_T0);
        _tile_loadd(B0, Wp + k * 32, 128);
        _tile_loadd(B1, Wp + k * 32 + 32, 128);
        _tile_loadd(A0, X + k, ldx * 2);
        _tile_dpbf16ps(C0, A0, B0);
        _tile_dpbf16ps(C1, A0, B1);
        if (two) {
            _tile_loadd(A1, X + 16 * ldx + k, ldx * 2);
            _tile_dpbf16ps(C2, A1, B0);
            _tile_dpbf16ps(C3, A1, B1);
        }
    }
    _tile_stored(C0, acc, lda * 4);
    _tile_stored(C1, acc + 16, lda * 4);
    if (two) {
        _tile_stored(C2, acc + 16 * lda, lda * 4);
        _tile_stored(C3, acc + 16 * lda + 16, lda * 4);
    }
}

/* Calls of up to this many rows (decode steps of 1-3 sequences) run the AVX512-BF16 kernel:
 * streaming the weights from DRAM, it kept more decode tokens/s than the tiles at 1 and 2
 * rows, as many at 3, and fewer from 4 (1B-class bf16). With PXL_BATCH_INVARIANT every call
 * takes the tiles, so a token's sums never depend on its batch. */
#define AVX_MAX_RM 3

/* The AVX512-BF16 kernels take up to PXL_PANEL_RM rows a call. */
#define ENTRY(name, out, YT, fallback)                                                                            \
    void name(int rm, size_t K, const void *X, size_t ldx, const void *Wp, YT *Y, size_t ldy, int nvalid,           \
              const void *pf, size_t npf) {                                                                         \
        if (K % 32 || (rm <= AVX_MAX_RM && !pxl_batch_invariant())) {                                              \
            for (int i = 0; i < rm; i += PXL_PANEL_RM)                                                             \
                fallback(rm - i < PXL_PANEL_RM ? rm - i : PXL_PANEL_RM, K, (const uint16_t *)X + i * ldx, ldx, Wp,  \
                         Y + i * ldy, ldy, nvalid, i ? NULL : pf, i ? 0 : npf);                                    \
            return;                                                                                                \
        }                                                                                                          \
        if (out == 0 && nvalid == PXL_PANEL) { /* fp32 sums of whole panels: the tiles store them */               \
            product(rm, K, X, ldx, Wp, (float *)Y, ldy, 0, pf, npf);                                               \
            return;                                                                                                \
        }                                                                                                          \
        float acc[PXL_AMX_RM * PXL_PANEL] __attribute__((aligned(64)));                                            \
        product(rm, K, X, ldx, Wp, acc, PXL_PANEL, 0, pf, npf);                                                    \
        pxl_bf16p_store_avx512bf16(out, rm, acc, Y, ldy, nvalid);                                                  \
    }
ENTRY(pxl_gemm_bf16p_amx, 0, float, pxl_gemm_bf16p_avx512bf16)
ENTRY(pxl_gemm_bf16p_bf16_amx, 1, uint16_t, pxl_gemm_bf16p_bf16_avx512bf16)
ENTRY(pxl_gemm_bf16p_silu_amx, 2, uint16_t, pxl_gemm_bf16p_silu_avx512bf16)
ENTRY(pxl_gemm_bf16p_wide_amx, 3, float, pxl_gemm_bf16p_wide_avx512bf16)

/* one block of a long K on the tiles, whatever rm (pxl_gemm_p_acc_fn) */
void pxl_gemm_bf16p_acc_amx(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                            int accumulate, const void *pf, size_t npf) {
    product(rm, K, X, ldx, Wp, Y, ldy, accumulate, pf, npf);
}

/* the roofline's bf16 peak on a set with these kernels: 4 independent tile accumulators, each
 * tdpbf16ps 16 x 16 x 32 pairs, register-resident; ops (2 per multiply-add) done */
double pxl_amx_peak_bf16(size_t iters) {
    pxl_tile_config c = {.palette = 1};
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    pxl_tile_configure(&c);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (size_t n = 0; n < iters; n++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    pxl_tile_release();
    return (double)iters * 4 * 16 * 16 * 32 * 2;
}
