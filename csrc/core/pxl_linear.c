/* Linear: y (T, N) = x (T, K) @ W (N, K)^T + b, for every weight format.
 *
 * Threads split N (each reads its own weight rows once: decode is bandwidth-bound).
 * T == 1 runs GEMV tiles (or the fused quantised GEMV); T > 1 walks T in chunks that
 * stay in L2 and tiles each chunk against the weight rows. Quantised weights for T > 1
 * are dequantised a 16-row panel at a time into L1/L2 and reused by every token tile.
 * (OpenBLAS's sgemm was slower on every SmolLM2 prefill shape: `perfxlm bench gemv --rows 512`.)
 */
#include "pxl_kernels.h"

#define T_CHUNK 64   /* tokens per pass over the weights: 64 x K floats stay in L2 */
#define PANEL 16     /* quantised rows dequantised at a time */
#define T_PRIVATE 4  /* up to this many tokens, each thread converts x itself (no barrier) */

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

/* rows [t0, t1) of x in the kernels' input type (bf16 for bf16 weights, else fp32), and
 * each 32-block's sum of x for Q4 weights (the offset term m * sum(x_block)) */
static void prepare_rows(int dt, int wfmt, size_t t0, size_t t1, size_t K, const void *x, void *xk, float *xsum) {
    for (size_t t = t0; t < t1; t++) {
        if (wfmt == PXL_BF16 && dt == PXL_F32)
            for (size_t i = 0; i < K; i++) ((uint16_t *)xk)[t * K + i] = pxl_f32_to_bf16(((const float *)x)[t * K + i]);
        else if (wfmt != PXL_BF16 && dt == PXL_BF16)
            for (size_t i = 0; i < K; i++) ((float *)xk)[t * K + i] = pxl_bf16_to_f32(((const uint16_t *)x)[t * K + i]);
        if (xsum)
            for (size_t b = 0; b < K / PXL_QK; b++) {
                float s = 0;
                for (int j = 0; j < PXL_QK; j++) s += ((const float *)xk)[t * K + b * PXL_QK + j];
                xsum[t * (K / PXL_QK) + b] = s;
            }
    }
}

/* columns [0, cols) of y = x @ W^T where W starts at this thread's first row */
static void compute(const pxl_kernel_set *ks, int wfmt, size_t T, size_t cols, size_t K, const void *xk,
                    const float *xsum, const char *W, float *Y, size_t ldy) {
    if (wfmt <= PXL_BF16) {
        run_tiles(ks, wfmt == PXL_F32 ? ks->tile_f32 : ks->tile_bf16, wfmt == PXL_F32 ? 4 : 2, T, 0, cols, K, xk, W,
                  Y, ldy);
    } else if (T <= 2) {
        for (size_t t = 0; t < T; t++)
            ks->gemv_q[wfmt](0, cols, K, W, (const float *)xk + t * K, xsum ? xsum + t * (K / PXL_QK) : NULL,
                             Y + t * ldy);
    } else {
        float *panel = pxl_scratch(3, (size_t)PANEL * K * 4);
        for (size_t n = 0; n < cols; n += PANEL) {
            size_t rows = cols - n < PANEL ? cols - n : PANEL;
            pxl_dequant_rows(wfmt, W, n, rows, K, panel);
            run_tiles(ks, ks->tile_f32, 4, T, 0, rows, K, xk, (const char *)panel, Y + n, ldy);
        }
    }
}

static void linear_team(const pxl_kernel_set *ks, int dt, int wfmt, size_t T, size_t N, size_t K, const void *x,
                        const void *W, const void *bias, void *y) {
    const int convert = wfmt == PXL_BF16 ? dt == PXL_F32 : dt == PXL_BF16;
    const int q4 = wfmt == PXL_Q4_0 || wfmt == PXL_Q4_1;
    const size_t xes = wfmt == PXL_BF16 ? 2 : 4, nb = K / PXL_QK;
    const void *xk = x;
    float *xsum = NULL;
    if ((convert || q4) && T <= T_PRIVATE) { /* decode: every thread prepares x for itself */
        void *buf = convert ? pxl_scratch(0, T * K * xes) : NULL;
        xsum = q4 ? pxl_scratch(2, T * nb * 4) : NULL;
        prepare_rows(dt, wfmt, 0, T, K, x, buf ? buf : (void *)x, xsum);
        if (buf) xk = buf;
    } else if (convert || q4) { /* prefill: the team prepares shared rows, then waits for all */
        void *buf = NULL;
        float *sums = NULL;
#pragma omp single copyprivate(buf, sums)
        {
            buf = convert ? pxl_scratch(0, T * K * xes) : NULL;
            sums = q4 ? pxl_scratch(2, T * nb * 4) : NULL;
        }
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        prepare_rows(dt, wfmt, t0, t1, K, x, buf ? buf : (void *)x, sums);
#pragma omp barrier
        if (buf) xk = buf;
        xsum = sums;
    }

    size_t n0, n1;
    pxl_split(N, 16, &n0, &n1);
    if (n0 >= n1) return;
    size_t cols = n1 - n0;
    const char *Wn = (const char *)W + n0 * pxl_row_bytes(wfmt, K);
    if (dt == PXL_F32 && !bias) {
        compute(ks, wfmt, T, cols, K, xk, xsum, Wn, (float *)y + n0, N);
        return;
    }
    /* bias or bf16 output: this thread's columns in fp32, then added and rounded once */
    float *yp = pxl_scratch(1, T * cols * 4);
    compute(ks, wfmt, T, cols, K, xk, xsum, Wn, yp, cols);
    for (size_t t = 0; t < T; t++)
        for (size_t j = 0; j < cols; j++) {
            size_t n = n0 + j;
            float v = yp[t * cols + j];
            if (bias) v += dt == PXL_F32 ? ((const float *)bias)[n] : pxl_bf16_to_f32(((const uint16_t *)bias)[n]);
            if (dt == PXL_F32) ((float *)y)[t * N + n] = v;
            else ((uint16_t *)y)[t * N + n] = pxl_f32_to_bf16(v);
        }
}

void pxl_linear(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W, const void *bias,
                void *y) {
    const pxl_kernel_set *ks = pxl_kernels();
    int nth = (double)T * N * K < 32768 ? 1 : pxl_num_threads(); /* tiny: not worth waking threads */
    PXL_ON_TEAM(nth, linear_team(ks, dt, wfmt, T, N, K, x, W, bias, y));
}
