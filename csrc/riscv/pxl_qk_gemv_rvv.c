/* K-quant GEMV (pxl_kquants.h), RVV 1.0, VLEN-agnostic: each 32 quants of a super-block (16
 * for Q6_K's sub-blocks) are one strip of uint8 (e8m2 holds 32 from VLEN 128 up), multiplied
 * with the token's Q8_K bytes by a widening signed x unsigned multiply into int16 and one
 * widening reduction into the sub-block's exact int32 dot, then scaled by its integer scale;
 * the mins (Q4_K, Q5_K) and Q6_K's -32 come from x's bsums. */
#include "pxl_kquants.h"

#if defined(__riscv_v_intrinsic) && __riscv_v_intrinsic >= 11000
#include <riscv_vector.h>

/* dot(u, q) over vl <= 32 lanes: |u q| <= 63 * 128 fits int16, the sum int32 */
static inline int32_t dot_u8(vuint8m2_t u, const int8_t *q, size_t vl) {
    vint16m4_t p = __riscv_vwmulsu_vv_i16m4(__riscv_vle8_v_i8m2(q, vl), u, vl);
    return __riscv_vmv_x_s_i32m1_i32(__riscv_vwredsum_vs_i16m4_i32m1(p, __riscv_vmv_v_x_i32m1(0, 1), vl));
}

static float block_q6_K(const pxl_block_q6_K *b, const int8_t *q, const int16_t *bsum) {
    const size_t vl = __riscv_vsetvl_e8m2(32);
    int32_t sumi = 0;
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
        vuint8m2_t vh = __riscv_vle8_v_u8m2(qh, vl);
        for (int g = 0; g < 4; g++) {
            vuint8m2_t v = __riscv_vle8_v_u8m2(ql + 32 * (g & 1), vl);
            v = g < 2 ? __riscv_vand_vx_u8m2(v, 0xF, vl) : __riscv_vsrl_vx_u8m2(v, 4, vl);
            vuint8m2_t hb = __riscv_vand_vx_u8m2(__riscv_vsrl_vx_u8m2(vh, 2 * g, vl), 3, vl);
            v = __riscv_vor_vv_u8m2(v, __riscv_vsll_vx_u8m2(hb, 4, vl), vl);
            const int8_t *qg = q + 128 * h + 32 * g;
            const int s = 8 * h + 2 * g;
            /* two sub-blocks of 16: the second half of the strip slid down */
            int32_t d0 = dot_u8(v, qg, 16), d1 = dot_u8(__riscv_vslidedown_vx_u8m2(v, 16, vl), qg + 16, 16);
            sumi += b->scales[s] * (d0 - 32 * bsum[s]) + b->scales[s + 1] * (d1 - 32 * bsum[s + 1]);
        }
    }
    return pxl_fp16_to_fp32(b->d) * (float)sumi;
}

/* Q4_K / Q5_K: d sum(sc dot) - dmin sum(m bsum), both scaled by x's d by the caller */
static float block_q45_K(const int fmt, const uint8_t *blk, const int8_t *q, const int16_t *bsum) {
    const size_t vl = __riscv_vsetvl_e8m2(32);
    const uint8_t *scales = fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->scales : ((const pxl_block_q5_K *)blk)->scales;
    const uint8_t *qs = fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->qs : ((const pxl_block_q5_K *)blk)->qs;
    uint8_t sc[8], m[8];
    pxl_k4_scales(scales, sc, m);
    vuint8m2_t vh = fmt == PXL_Q5_K ? __riscv_vle8_v_u8m2(((const pxl_block_q5_K *)blk)->qh, vl)
                                    : __riscv_vmv_v_x_u8m2(0, vl);
    int32_t sumi = 0, summ = 0;
    for (int j = 0; j < 4; j++) {
        vuint8m2_t v = __riscv_vle8_v_u8m2(qs + 32 * j, vl);
        vuint8m2_t lo = __riscv_vand_vx_u8m2(v, 0xF, vl), hi = __riscv_vsrl_vx_u8m2(v, 4, vl);
        if (fmt == PXL_Q5_K) {
            lo = __riscv_vor_vv_u8m2(lo, __riscv_vsll_vx_u8m2(__riscv_vand_vx_u8m2(__riscv_vsrl_vx_u8m2(vh, 2 * j, vl), 1, vl), 4, vl), vl);
            hi = __riscv_vor_vv_u8m2(hi, __riscv_vsll_vx_u8m2(__riscv_vand_vx_u8m2(__riscv_vsrl_vx_u8m2(vh, 2 * j + 1, vl), 1, vl), 4, vl), vl);
        }
        sumi += sc[2 * j] * dot_u8(lo, q + 64 * j, vl) + sc[2 * j + 1] * dot_u8(hi, q + 64 * j + 32, vl);
    }
    for (int j = 0; j < 8; j++) summ += m[j] * (bsum[2 * j] + bsum[2 * j + 1]);
    const uint16_t *dd = (const uint16_t *)blk;
    return pxl_fp16_to_fp32(dd[0]) * (float)sumi - pxl_fp16_to_fp32(dd[1]) * (float)summ;
}

void pxl_gemv_qk_rvv(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y) {
    const size_t nb = K / PXL_QK_K;
    const size_t bs = fmt == PXL_Q4_K ? sizeof(pxl_block_q4_K) : fmt == PXL_Q5_K ? sizeof(pxl_block_q5_K)
                                                                               : sizeof(pxl_block_q6_K);
    for (size_t n = n0; n < n1; n++) {
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = (const uint8_t *)W + (n * nb + i) * bs;
            const int8_t *q = x->q + i * PXL_QK_K;
            const int16_t *bsum = x->bsums + i * (PXL_QK_K / 16);
            float b = fmt == PXL_Q6_K  ? block_q6_K((const pxl_block_q6_K *)blk, q, bsum)
                      : fmt == PXL_Q4_K ? block_q45_K(PXL_Q4_K, blk, q, bsum)
                                        : block_q45_K(PXL_Q5_K, blk, q, bsum);
            s += x->d[i] * b;
        }
        y[n] = s;
    }
}
#endif
