/* HIP vendor header: what the CUDA sources use, spelled for HIP. Hygon DCUs (gfx906 class)
 * and AMD GPUs build the csrc/cuda sources through this file; no kernel is forked. */
#pragma once
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>

#define PXL_WARP 64 /* gfx9 wavefront */
__device__ __forceinline__ float pxl_shfl_xor(float v, int m) { return __shfl_xor(v, m, PXL_WARP); }
typedef hipStream_t pxl_stream_t;

#define cudaStream_t hipStream_t
#define cudaGetLastError hipGetLastError
#define cudaSuccess hipSuccess
