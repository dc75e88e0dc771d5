/* The AVX2 quantised GEMVs with AVX512-VNNI's vpdpbusd (256-bit, AVX512VL): one
 * instruction for the 32 uint8 x int8 products of a block instead of two. */
#define PXL_VNNI 1
#include "pxl_q_gemv_avx2.c"
