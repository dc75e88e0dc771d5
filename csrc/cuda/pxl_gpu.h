/* One source for NVIDIA and AMD/Hygon: the .cu files include this header, which maps to
 * CUDA, or through dcu/pxl_hip_vendor.h to HIP (hipcc builds the very same sources).
 * Warp-level code uses PXL_WARP lanes: 32 on NVIDIA, 64 (a wavefront) on gfx9 DCUs. */
#pragma once
#include <stdint.h>

#include "../include/pxl_abi.h" /* the format codes (PXL_F32, PXL_BF16, PXL_Q8_0 ..), PXL_QK */

#if defined(__HIP_PLATFORM_AMD__) || defined(__HIPCC__)
#include "../dcu/pxl_hip_vendor.h"
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define PXL_WARP 32
__device__ __forceinline__ float pxl_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
typedef cudaStream_t pxl_stream_t;
#endif

__device__ __forceinline__ float pxl_warp_sum(float v) {
#pragma unroll
    for (int m = PXL_WARP / 2; m > 0; m >>= 1) v += pxl_shfl_xor(v, m);
    return v;
}
__device__ __forceinline__ float pxl_warp_max(float v) {
#pragma unroll
    for (int m = PXL_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, pxl_shfl_xor(v, m));
    return v;
}
/* activations: float (dt PXL_F32) or bf16 bits (dt PXL_BF16), computed in float */
__device__ __forceinline__ float pxl_ld(int dt, const void *p, size_t i) {
    if (dt == PXL_F32) return ((const float *)p)[i];
    return __uint_as_float((uint32_t)((const uint16_t *)p)[i] << 16);
}
__device__ __forceinline__ void pxl_st(int dt, void *p, size_t i, float v) {
    if (dt == PXL_F32) { ((float *)p)[i] = v; return; }
    uint32_t b = __float_as_uint(v);
    ((uint16_t *)p)[i] = (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float pxl_half(uint16_t h) { return __half2float(__ushort_as_half(h)); }

/* host entry points (extern "C", all asynchronous on `stream`) */
extern "C" {
int pxl_gpu_linear_gemv(int dt, int wfmt, int T, int N, int K, const void *x, const void *W, const void *bias,
                        void *y, pxl_stream_t stream);
int pxl_gpu_rmsnorm(int dt, int T, int D, const void *x, const void *w, float eps, void *y, pxl_stream_t stream);
int pxl_gpu_rope(int dt, int T, int H, int hd, const void *x, const int64_t *pos, const void *cos, const void *sin,
                 void *y, pxl_stream_t stream);
int pxl_gpu_silu_mul(int dt, int64_t n, const void *g, const void *u, void *y, pxl_stream_t stream);
int pxl_gpu_add(int dt, int64_t n, const void *a, const void *b, void *y, pxl_stream_t stream);
int pxl_gpu_paged_attention(int dt, int T, int B, int H, int Hkv, int hd, const void *q, const void *k,
                            const void *v, void *k_cache, void *v_cache, int block_size, const int64_t *slot_mapping,
                            const int64_t *block_tables, int max_blocks, const int64_t *seq_lens,
                            const int64_t *query_start_loc, float scale, int window, void *y, pxl_stream_t stream);
}
