/* perfxlm kernel signatures: one per op variant, with its shape contract.
 *
 * Row-major everywhere. T = tokens, K = in features, N = out features,
 * D = hidden size, H = heads, hd = head dim. Weights of Linear are (N, K):
 * one output feature per row, as in the ONNX graph and in GGUF files.
 * Quantised weights keep GGUF's block layouts (32 weights per block):
 *   Q8_0: { fp16 d; int8  qs[32]; }            w = d * q
 *   Q4_0: { fp16 d; uint8 qs[16]; }            w = d * (nibble - 8)
 *   Q4_1: { fp16 d; fp16 m; uint8 qs[16]; }    w = d * nibble + m
 * where byte j holds weight j in its low nibble and weight j + 16 in its high one.
 */
#ifndef PERFXLM_OPS_H
#define PERFXLM_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PXL_QK 32 /* weights per quantisation block */

typedef struct { uint16_t d; int8_t qs[PXL_QK]; } pxl_block_q8_0;
typedef struct { uint16_t d; uint8_t qs[PXL_QK / 2]; } pxl_block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[PXL_QK / 2]; } pxl_block_q4_1;

float pxl_fp16_to_fp32(uint16_t h);

/* W (N, K) @ x (K,) -> y (N,)                                   decode, fp32 */
void pxl_sgemv(size_t N, size_t K, const float *W, const float *x, float *y);
/* X (T, K) @ W (N, K)^T -> Y (T, N)                             prefill, fp32 */
void pxl_sgemm(size_t T, size_t N, size_t K, const float *X, const float *W, float *Y);
/* Wq (N, K/32 blocks) @ x (K,) -> y (N,); K % 32 == 0            decode, GGUF blocks */
void pxl_gemv_q8_0(size_t N, size_t K, const pxl_block_q8_0 *W, const float *x, float *y);
void pxl_gemv_q4_0(size_t N, size_t K, const pxl_block_q4_0 *W, const float *x, float *y);
void pxl_gemv_q4_1(size_t N, size_t K, const pxl_block_q4_1 *W, const float *x, float *y);
/* y (T, D) = w (D,) * x (T, D) / sqrt(mean(x^2) + eps) */
void pxl_rmsnorm(size_t T, size_t D, const float *x, const float *w, float eps, float *y);
/* y (T, H*hd) = x * cos[pos] + rotate_half(x) * sin[pos]; cos, sin (P, hd); halves layout */
void pxl_rope(size_t T, size_t H, size_t hd, const float *x, const int64_t *pos, const float *cos,
              const float *sin, float *y);
/* y (n,) = silu(gate) * up */
void pxl_silu_mul(size_t n, const float *gate, const float *up, float *y);
/* y (n,) = a + b */
void pxl_add(size_t n, const float *a, const float *b, float *y);

#ifdef __cplusplus
}
#endif
#endif
