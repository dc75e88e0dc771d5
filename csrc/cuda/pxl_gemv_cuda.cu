// Decode GEMV, one warp per output feature: y (T, N) = x (T, K) @ W (N, K)^T + b for
// small T (prefill GEMMs go to cuBLAS through torch). Weights fp32, bf16 or GGUF blocks
// (Q8_0/Q4_0/Q4_1, read as stored: each lane takes whole 32-weight blocks).
#include "pxl_gpu.h"

namespace {
constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float dot_row(int wfmt, const void *W, int n, int K, int dt, const void *x, int t) {
    float s = 0.f;
    const int lane = threadIdx.x % PXL_WARP;
    if (wfmt <= PXL_BF16) {  // dense fp32 / bf16
        for (int k = lane; k < K; k += PXL_WARP) s += pxl_ld(wfmt, W, (size_t)n * K + k) * pxl_ld(dt, x, (size_t)t * K + k);
        return s;
    }
    const int nb = K / PXL_QK;
    const size_t bs = wfmt == PXL_Q8_0 ? 34 : wfmt == PXL_Q4_0 ? 18 : 20;  // GGUF block bytes (perfxlm_ops.h)
    const uint8_t *row = (const uint8_t *)W + (size_t)n * nb * bs;
    for (int b = lane; b < nb; b += PXL_WARP) {
        const uint8_t *blk = row + b * bs;
        const float d = pxl_half(blk[0] | (uint16_t)blk[1] << 8);
        float dot = 0.f, xs = 0.f;
        const size_t x0 = (size_t)t * K + b * PXL_QK;
        if (wfmt == PXL_Q8_0) {
            for (int j = 0; j < 32; j++) dot += (float)(int8_t)blk[2 + j] * pxl_ld(dt, x, x0 + j);
            s += d * dot;
        } else {
            const uint8_t *qs = blk + (wfmt == PXL_Q4_1 ? 4 : 2);
            for (int j = 0; j < 16; j++) {
                float lo = pxl_ld(dt, x, x0 + j), hi = pxl_ld(dt, x, x0 + j + 16);
                dot += (float)(qs[j] & 15) * lo + (float)(qs[j] >> 4) * hi;
                xs += lo + hi;
            }
            const float m = wfmt == PXL_Q4_1 ? pxl_half(blk[2] | (uint16_t)blk[3] << 8) : -8.f * d;
            s += d * dot + m * xs;
        }
    }
    return s;
}

__global__ void gemv_kernel(int dt, int wfmt, int T, int N, int K, const void *x, const void *W, const void *bias,
                            void *y) {
    const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / PXL_WARP, t = blockIdx.y;
    if (n >= N) return;
    float s = pxl_warp_sum(dot_row(wfmt, W, n, K, dt, x, t));
    if (threadIdx.x % PXL_WARP == 0) {
        if (bias) s += pxl_ld(dt, bias, n);
        pxl_st(dt, y, (size_t)t * N + n, s);
    }
}
}  // namespace

extern "C" int pxl_gpu_linear_gemv(int dt, int wfmt, int T, int N, int K, const void *x, const void *W,
                                   const void *bias, void *y, pxl_stream_t stream) {
    dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock, T);
    gemv_kernel<<<grid, kWarpsPerBlock * PXL_WARP, 0, stream>>>(dt, wfmt, T, N, K, x, W, bias, y);
    return (int)cudaGetLastError();
}
