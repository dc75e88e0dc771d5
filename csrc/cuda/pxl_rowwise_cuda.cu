// Row-wise ops: RMSNorm (one block per row), RoPE (one thread per rotated pair),
// SiLU-mul and Add (grid-stride), in fp32 or bf16 activations computed in float.
#include "pxl_gpu.h"

namespace {
__global__ void rmsnorm_kernel(int dt, int D, const void *x, const void *w, float eps, void *y) {
    const size_t row = (size_t)blockIdx.x * D;
    float ss = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) { float v = pxl_ld(dt, x, row + d); ss += v * v; }
    __shared__ float part[1024 / 32];
    ss = pxl_warp_sum(ss);
    const int warp = threadIdx.x / PXL_WARP, nwarps = blockDim.x / PXL_WARP;
    if (threadIdx.x % PXL_WARP == 0) part[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int i = 0; i < nwarps; i++) t += part[i];
        part[0] = rsqrtf(t / D + eps);
    }
    __syncthreads();
    const float r = part[0];
    for (int d = threadIdx.x; d < D; d += blockDim.x) pxl_st(dt, y, row + d, pxl_ld(dt, w, d) * (pxl_ld(dt, x, row + d) * r));
}

__global__ void rope_kernel(int dt, int T, int H, int hd, const void *x, const int64_t *pos, const void *cos,
                            const void *sin, void *y) {
    const int half = hd / 2;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, total = (size_t)T * H * half;
    if (i >= total) return;
    const int j = i % half;
    const size_t th = i / half, t = th / H, o = th * hd;
    const size_t c = (size_t)pos[t] * hd;
    const float a = pxl_ld(dt, x, o + j), b = pxl_ld(dt, x, o + j + half);
    pxl_st(dt, y, o + j, a * pxl_ld(dt, cos, c + j) - b * pxl_ld(dt, sin, c + j));
    pxl_st(dt, y, o + j + half, b * pxl_ld(dt, cos, c + j + half) + a * pxl_ld(dt, sin, c + j + half));
}

__global__ void silu_mul_kernel(int dt, int64_t n, const void *g, const void *u, void *y) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float a = pxl_ld(dt, g, i);
        pxl_st(dt, y, i, a / (1.f + __expf(-a)) * pxl_ld(dt, u, i));
    }
}

__global__ void add_kernel(int dt, int64_t n, const void *a, const void *b, void *y) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        pxl_st(dt, y, i, pxl_ld(dt, a, i) + pxl_ld(dt, b, i));
}

int grid_for(int64_t n) { return (int)((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535); }
}  // namespace

extern "C" int pxl_gpu_rmsnorm(int dt, int T, int D, const void *x, const void *w, float eps, void *y,
                               pxl_stream_t stream) {
    rmsnorm_kernel<<<T, 256, 0, stream>>>(dt, D, x, w, eps, y);
    return (int)cudaGetLastError();
}
extern "C" int pxl_gpu_rope(int dt, int T, int H, int hd, const void *x, const int64_t *pos, const void *cos,
                            const void *sin, void *y, pxl_stream_t stream) {
    const int64_t n = (int64_t)T * H * (hd / 2);
    rope_kernel<<<(int)((n + 255) / 256), 256, 0, stream>>>(dt, T, H, hd, x, pos, cos, sin, y);
    return (int)cudaGetLastError();
}
extern "C" int pxl_gpu_silu_mul(int dt, int64_t n, const void *g, const void *u, void *y, pxl_stream_t stream) {
    silu_mul_kernel<<<grid_for(n), 256, 0, stream>>>(dt, n, g, u, y);
    return (int)cudaGetLastError();
}
extern "C" int pxl_gpu_add(int dt, int64_t n, const void *a, const void *b, void *y, pxl_stream_t stream) {
    add_kernel<<<grid_for(n), 256, 0, stream>>>(dt, n, a, b, y);
    return (int)cudaGetLastError();
}
