/* The repacked quantised GEMVs with AVX512-VNNI's vpdpbusd: one instruction for 16 rows x 4
 * uint8 x int8 products instead of two, and Q8_0 (stored + 128) without saturation. */
#define PXL_VNNI 1
#include "pxl_q_gemv_r16_avx512.c"
