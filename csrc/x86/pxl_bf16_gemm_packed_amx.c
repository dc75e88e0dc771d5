/* bf16 GEMM micro-kernel on packed weights with AMX (Sapphire Rapids and later Xeons): the
 * same contract as pxl_gemm_bf16p_avx512bf16, on tile registers. A packed panel, [K/2][32][2]
 * bf16, is already AMX's "VNNI" layout for B: rows of K pairs, 128 bytes apart, whose first and
 * second 64 bytes are features 0-15 and 16-31. So per 32 values of K the kernel loads one A
 * tile (rm rows of x, 64 bytes each), two B tiles straight from the panel, and runs two
 * tdpbf16ps into two C tiles of rm x 16 fp32; no repacking. The sums then leave through the
 * AVX512-BF16 kernel's own stores (pxl_bf16p_store_avx512bf16), so the roundings, the gated
 * SiLU-mul and the streamed logits are that kernel's, bit for bit. A row's sums depend on its
 * own x only, whatever rm is. K not a multiple of 32 runs the AVX512-BF16 kernel, and so do
 * decode calls (AVX_MAX_RM). */
#include <immintrin.h>
#include <string.h>

#include "pxl_kernels.h"

/* tile registers (numbers: the intrinsics paste them into the instruction) */
#define C0 0
#define C1 1
#define A 2
#define B0 3
#define B1 4

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Configures the tiles for rm rows unless they already are. The configuration is per thread and
 * other AMX code in the process (oneDNN under torch) may have changed or released it, so it is
 * read back rather than remembered. */
static inline void configure(int rm) {
    tile_config want = {.palette = 1}, have;
    want.rows[C0] = want.rows[C1] = want.rows[A] = (uint8_t)rm;
    want.rows[B0] = want.rows[B1] = 16;
    for (int t = C0; t <= B1; t++) want.colsb[t] = 64;
    _tile_storeconfig(&have);
    if (memcmp(&want, &have, sizeof want)) _tile_loadconfig(&want);
}

static inline void product(int rm, size_t K, const uint16_t *X, size_t ldx, const uint16_t *Wp, float *acc,
                           const char *pf, size_t npf) {
    configure(rm);
    _tile_zero(C0);
    _tile_zero(C1);
    for (size_t k = 0; k < K; k += 32) {
        /* the next panel's lines, one per K pair as the AVX512-BF16 kernel spreads them */
        for (size_t l = k / 2; l < k / 2 + 16 && l < npf; l++) {
            if (rm <= 4) _mm_prefetch(pf + l * 64, _MM_HINT_T1);
            else _mm_prefetch(pf + l * 64, _MM_HINT_T0);
        }
        _tile_loadd(A, X + k, ldx * 2);
        _tile_loadd(B0, Wp + k * 32, 128);
        _tile_loadd(B1, Wp + k * 32 + 32, 128);
        _tile_dpbf16ps(C0, A, B0);
        _tile_dpbf16ps(C1, A, B1);
    }
    _tile_stored(C0, acc, 128);
    _tile_stored(C1, acc + 16, 128);
}

/* Calls of up to this many rows (decode steps) run the AVX512-BF16 kernel: streaming the weights
 * from DRAM, it kept 10 % more decode tokens/s than the tiles (1B-class bf16, W2). With
 * PXL_BATCH_INVARIANT every call takes the tiles, so a token's sums never depend on its batch. */
#define AVX_MAX_RM 4

#define ENTRY(name, out, YT, fallback)                                                                            \
    void name(int rm, size_t K, const void *X, size_t ldx, const void *Wp, YT *Y, size_t ldy, int nvalid,           \
              const void *pf, size_t npf) {                                                                         \
        if (K % 32 || (rm <= AVX_MAX_RM && !pxl_batch_invariant())) {                                             \
            fallback(rm, K, X, ldx, Wp, Y, ldy, nvalid, pf, npf);                                                  \
            return;                                                                                                \
        }                                                                                                          \
        float acc[PXL_PANEL_RM * PXL_PANEL] __attribute__((aligned(64)));                                          \
        product(rm, K, X, ldx, Wp, acc, pf, npf);                                                                  \
        pxl_bf16p_store_avx512bf16(out, rm, acc, Y, ldy, nvalid);                                                  \
    }
ENTRY(pxl_gemm_bf16p_amx, 0, float, pxl_gemm_bf16p_avx512bf16)
ENTRY(pxl_gemm_bf16p_bf16_amx, 1, uint16_t, pxl_gemm_bf16p_bf16_avx512bf16)
ENTRY(pxl_gemm_bf16p_silu_amx, 2, uint16_t, pxl_gemm_bf16p_silu_avx512bf16)
ENTRY(pxl_gemm_bf16p_wide_amx, 3, float, pxl_gemm_bf16p_wide_avx512bf16)
