/* The AVX2 K-quant GEMV with AVX512-VNNI's vpdpbusd (256-bit, AVX512VL): one instruction for
 * a vector's 32 uint8 x int8 products, then the sub-block scales as an int32 multiply. */
#define PXL_VNNI 1
#include "pxl_qk_gemv_avx2.c"
