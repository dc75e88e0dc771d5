/* Weight-only quantised GEMV on GGUF blocks, portable C: the weights are never
 * expanded to fp32 in memory; each block's dot product is scaled once by its d (and m). */
#include "perfxlm_ops.h"

void pxl_gemv_q8_0(size_t N, size_t K, const pxl_block_q8_0 *W, const float *x, float *y) {
    size_t nb = K / PXL_QK;
    for (size_t n = 0; n < N; n++) {
        const pxl_block_q8_0 *b = W + n * nb;
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            const float *xb = x + i * PXL_QK;
            float dot = 0;
            for (int j = 0; j < PXL_QK; j++) dot += (float)b[i].qs[j] * xb[j];
            s += pxl_fp16_to_fp32(b[i].d) * dot;
        }
        y[n] = s;
    }
}

void pxl_gemv_q4_0(size_t N, size_t K, const pxl_block_q4_0 *W, const float *x, float *y) {
    size_t nb = K / PXL_QK;
    for (size_t n = 0; n < N; n++) {
        const pxl_block_q4_0 *b = W + n * nb;
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            const float *xb = x + i * PXL_QK;
            float dot = 0;
            for (int j = 0; j < PXL_QK / 2; j++)
                dot += (float)((b[i].qs[j] & 0xf) - 8) * xb[j] + (float)((b[i].qs[j] >> 4) - 8) * xb[j + 16];
            s += pxl_fp16_to_fp32(b[i].d) * dot;
        }
        y[n] = s;
    }
}

void pxl_gemv_q4_1(size_t N, size_t K, const pxl_block_q4_1 *W, const float *x, float *y) {
    size_t nb = K / PXL_QK;
    for (size_t n = 0; n < N; n++) {
        const pxl_block_q4_1 *b = W + n * nb;
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            const float *xb = x + i * PXL_QK;
            float dot = 0, xsum = 0; /* sum(d*q*x + m*x) = d*dot(q, x) + m*sum(x) */
            for (int j = 0; j < PXL_QK / 2; j++) {
                dot += (float)(b[i].qs[j] & 0xf) * xb[j] + (float)(b[i].qs[j] >> 4) * xb[j + 16];
                xsum += xb[j] + xb[j + 16];
            }
            s += pxl_fp16_to_fp32(b[i].d) * dot + pxl_fp16_to_fp32(b[i].m) * xsum;
        }
        y[n] = s;
    }
}
