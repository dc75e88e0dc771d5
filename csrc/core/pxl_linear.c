/* Linear: y (T, N) = x (T, K) @ W (N, K)^T + b, for every weight format.
 *
 * Threads split N (each reads its own weight rows once: decode is bandwidth-bound).
 * T == 1 runs GEMV tiles (or the fused quantised GEMV); T > 1 walks T in chunks that
 * stay in L2 and tiles each chunk against the weight rows. Quantised weights for T > 1
 * are dequantised a 16-row panel at a time into L1/L2 and reused by every token tile.
 * (OpenBLAS's sgemm was slower on every SmolLM2 prefill shape: `perfxlm bench gemv --rows 512`.)
 */
#ifdef _OPENMP
#include <omp.h>
#endif

#include "pxl_kernels.h"

#define T_CHUNK 64  /* tokens per pass over the weights: 64 x K floats stay in L2 */
#define PANEL 16    /* quantised rows dequantised at a time */


static void run_tiles(const pxl_kernel_set *ks, pxl_tile_fn tile, size_t es, size_t T, size_t n0, size_t n1,
                      size_t K, const char *X, const char *W, float *Y, size_t ldy) {
    if (T == 1) {
        for (size_t n = n0; n < n1; n += ks->gemv_rn) {
            int rn = n1 - n < (size_t)ks->gemv_rn ? (int)(n1 - n) : ks->gemv_rn;
            tile(1, rn, K, X, K, W + n * K * es, K, Y + n, ldy);
        }
        return;
    }
    for (size_t t0 = 0; t0 < T; t0 += T_CHUNK) {
        size_t t1 = t0 + T_CHUNK < T ? t0 + T_CHUNK : T;
        for (size_t n = n0; n < n1; n += ks->rn) {
            int rn = n1 - n < (size_t)ks->rn ? (int)(n1 - n) : ks->rn;
            for (size_t t = t0; t < t1; t += ks->rm) {
                int rm = t1 - t < (size_t)ks->rm ? (int)(t1 - t) : ks->rm;
                tile(rm, rn, K, X + t * K * es, K, W + n * K * es, K, Y + t * ldy + n, ldy);
            }
        }
    }
}

/* this thread's share of [0, N), in multiples of `align` */
static void split(size_t N, size_t align, size_t *n0, size_t *n1) {
#ifdef _OPENMP
    size_t nth = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
#else
    size_t nth = 1, id = 0;
#endif
    size_t per = (N + nth - 1) / nth;
    per = (per + align - 1) / align * align;
    *n0 = id * per < N ? id * per : N;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

void pxl_linear(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W, const void *bias,
                void *y) {
    const pxl_kernel_set *ks = pxl_kernels();
    /* activations in fp32 (bf16 for the bf16 tile, which reads bf16 x as is) */
    const int bf16_x = wfmt == PXL_BF16;
    const void *xk = x;
    if (bf16_x && dt == PXL_F32) {
        uint16_t *xb = pxl_scratch(0, T * K * 2);
        for (size_t i = 0; i < T * K; i++) xb[i] = pxl_f32_to_bf16(((const float *)x)[i]);
        xk = xb;
    } else if (!bf16_x && dt == PXL_BF16) {
        float *xf = pxl_scratch(0, T * K * 4);
        for (size_t i = 0; i < T * K; i++) xf[i] = pxl_bf16_to_f32(((const uint16_t *)x)[i]);
        xk = xf;
    }
    float *yf = dt == PXL_F32 ? y : pxl_scratch(1, T * N * 4);
    const int quant = wfmt >= PXL_Q8_0;
    float *xsum = NULL;
    if (wfmt == PXL_Q4_0 || wfmt == PXL_Q4_1) { /* per-block sums of x, for the offset term m * sum(x) */
        size_t nb = K / PXL_QK;
        xsum = pxl_scratch(2, T * nb * 4);
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < nb; i++) {
                float s = 0;
                for (int j = 0; j < PXL_QK; j++) s += ((const float *)xk)[t * K + i * PXL_QK + j];
                xsum[t * nb + i] = s;
            }
    }

    {
        int nth = pxl_num_threads();
        if ((double)T * N * K < 32768) nth = 1; /* tiny: not worth waking threads */
#pragma omp parallel num_threads(nth)
        {
            size_t n0, n1;
            split(N, 16, &n0, &n1);
            if (n0 < n1) {
                if (!quant) {
                    run_tiles(ks, wfmt == PXL_F32 ? ks->tile_f32 : ks->tile_bf16, wfmt == PXL_F32 ? 4 : 2, T, n0, n1,
                              K, xk, W, yf, N);
                } else if (T <= 2) {
                    size_t nb = K / PXL_QK;
                    for (size_t t = 0; t < T; t++)
                        ks->gemv_q[wfmt](n0, n1, K, W, (const float *)xk + t * K, xsum ? xsum + t * nb : NULL,
                                         yf + t * N);
                } else {
                    float *panel = pxl_scratch(3, (size_t)PANEL * K * 4);
                    for (size_t n = n0; n < n1; n += PANEL) {
                        size_t rows = n1 - n < PANEL ? n1 - n : PANEL;
                        pxl_dequant_rows(wfmt, W, n, rows, K, panel);
                        /* the panel is W rows [n, n + rows): shift W and Y so tiles index it from 0 */
                        run_tiles(ks, ks->tile_f32, 4, T, 0, rows, K, xk, (const char *)panel, yf + n, N);
                    }
                }
            }
        }
    }
    if (bias || dt != PXL_F32) {
        for (size_t t = 0; t < T; t++)
            for (size_t n = 0; n < N; n++) {
                float v = yf[t * N + n];
                if (bias) v += dt == PXL_F32 ? ((const float *)bias)[n] : pxl_bf16_to_f32(((const uint16_t *)bias)[n]);
                if (dt == PXL_F32) ((float *)y)[t * N + n] = v;
                else ((uint16_t *)y)[t * N + n] = pxl_f32_to_bf16(v);
            }
    }
}
