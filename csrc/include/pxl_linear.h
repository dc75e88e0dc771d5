/* Linear's packed-panel path, shared by pxl_linear.c (which picks the path and splits the
 * work) and pxl_linear_packed.c (which runs it). Private to the library. */
#ifndef PXL_LINEAR_H
#define PXL_LINEAR_H

#include "pxl_kernels.h"

/* Where fp32 results go when they are not y itself: bias added, then rounded once to dt and
 * stored as odt (dt's values, widened when odt is PXL_F32). y and bias start at the thread's
 * first column. */
typedef struct {
    int dt, odt;
    int gated; /* panels of 16 gate and 16 up features: y = silu(gate) * up (pxl_linear_silu) */
    const void *bias;
    void *y;
    size_t ldy;
    int stream; /* non-temporal stores (x86): y is too big to be in a cache when it is read */
    pxl_silu_bf16_fn silu_bf16; /* the kernel set's gated epilogue in bf16 (NULL: the loop below) */
    int yr; /* dt PXL_F32, gated: y's fp32 values stored rounded to bf16 (PXL_YR) */
} out_spec;

/* one panel: rows [0, rows) of src (rows, K) in fp32 or bf16 -> [K/2][32][2] bf16, zero-padded */
void pxl_pack_panel(int src_fmt, size_t rows, size_t K, const void *src, uint16_t *out);
/* rows x cols of fp32 src (lds apart) -> o's y at (r0, c0), as o says */
void pxl_store_rows(const out_spec *o, size_t r0, size_t c0, size_t rows, size_t cols, const float *src, size_t lds);
/* Y (T, cols) = X (T, K) . packed panels (PXL_BF16P, or PXL_F32P with f32); with out, each
 * call's rows go through Y (one call's rows x PXL_PANEL) to out at column c0 + n */
void pxl_run_packed(const pxl_kernel_set *ks, int f32, size_t T, size_t cols, size_t K, const void *X, size_t ldx,
                    const void *Wp, float *Y, size_t ldy, const out_spec *out, size_t c0);

#define PXL_T_CHUNK 256 /* tokens per pass over the packed panels: their x rows stay in L2 */

/* Long K on packed bf16 panels, fp32 out (pxl_packed_kblocks says where it applies): rows in
 * chunks of PXL_T_CHUNK, K in blocks of PXL_KC, a chunk's x block (1 MB) staying in L2 while
 * panels pass. A team runs each block's columns in turn (pxl_linear.c), the block after only
 * once every column has its sums so far. */
#define PXL_KC 2048
int pxl_packed_kblocks(const pxl_kernel_set *ks, size_t T, size_t cols, size_t K);
void pxl_run_packed_kblock(const pxl_kernel_set *ks, size_t T, size_t K, size_t t0, size_t k0, size_t n0,
                           size_t n1, const uint16_t *X, size_t ldx, const uint16_t *Wp, float *Y, size_t ldy);

#endif
