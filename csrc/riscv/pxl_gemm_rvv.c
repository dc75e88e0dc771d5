/* RVV 1.0 kernels, VLEN-agnostic (tested under qemu at VLEN 128..1024).
 *
 * GEMM tiles in the dot-product form of the x86 files: 2 tokens x 4 features of LMUL=2
 * accumulators strip-mined along K by vsetvl; the last, shorter strip accumulates with
 * the tail-undisturbed (_tu) policy so lanes past vl keep their partial sums, and the
 * reduction runs over VLMAX. Rows past rm/rn alias row 0 and are computed but not stored,
 * so one unrolled body serves every tile shape. Quantised GEMVs take int8 activations
 * (pxl_qx): one GGUF block's exact int32 dot product, scaled once by d_w * d_x.
 */
#include "pxl_kernels.h"

#if defined(__riscv_v_intrinsic) && __riscv_v_intrinsic >= 11000
#include <riscv_vector.h>

static inline vfloat32m2_t ld_f32(const void *p, size_t k, size_t vl) {
    return __riscv_vle32_v_f32m2((const float *)p + k, vl);
}
static inline vfloat32m2_t ld_bf16(const void *p, size_t k, size_t vl) { /* bf16 -> fp32: a 16-bit shift */
    vuint32m2_t w = __riscv_vzext_vf2_u32m2(__riscv_vle16_v_u16m1((const uint16_t *)p + k, vl), vl);
    return __riscv_vreinterpret_v_u32m2_f32m2(__riscv_vsll_vx_u32m2(w, 16, vl));
}

PXL_INLINE void tile(const int BF16, int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw,
                     float *Y, size_t ldy) {
    const size_t es = BF16 ? 2 : 4, vlmax = __riscv_vsetvlmax_e32m2();
    const char *x0 = X, *x1 = rm > 1 ? (const char *)X + ldx * es : x0;
    const char *w0 = W, *w1 = rn > 1 ? (const char *)W + ldw * es : w0;
    const char *w2 = rn > 2 ? (const char *)W + 2 * ldw * es : w0, *w3 = rn > 3 ? (const char *)W + 3 * ldw * es : w0;
    vfloat32m2_t a00 = __riscv_vfmv_v_f_f32m2(0, vlmax), a01 = a00, a02 = a00, a03 = a00;
    vfloat32m2_t a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (size_t k = 0; k < K;) {
        size_t vl = __riscv_vsetvl_e32m2(K - k);
        vfloat32m2_t b0 = BF16 ? ld_bf16(w0, k, vl) : ld_f32(w0, k, vl), b1 = BF16 ? ld_bf16(w1, k, vl) : ld_f32(w1, k, vl);
        vfloat32m2_t b2 = BF16 ? ld_bf16(w2, k, vl) : ld_f32(w2, k, vl), b3 = BF16 ? ld_bf16(w3, k, vl) : ld_f32(w3, k, vl);
        vfloat32m2_t x = BF16 ? ld_bf16(x0, k, vl) : ld_f32(x0, k, vl);
        a00 = __riscv_vfmacc_vv_f32m2_tu(a00, x, b0, vl), a01 = __riscv_vfmacc_vv_f32m2_tu(a01, x, b1, vl);
        a02 = __riscv_vfmacc_vv_f32m2_tu(a02, x, b2, vl), a03 = __riscv_vfmacc_vv_f32m2_tu(a03, x, b3, vl);
        x = BF16 ? ld_bf16(x1, k, vl) : ld_f32(x1, k, vl);
        a10 = __riscv_vfmacc_vv_f32m2_tu(a10, x, b0, vl), a11 = __riscv_vfmacc_vv_f32m2_tu(a11, x, b1, vl);
        a12 = __riscv_vfmacc_vv_f32m2_tu(a12, x, b2, vl), a13 = __riscv_vfmacc_vv_f32m2_tu(a13, x, b3, vl);
        k += vl;
    }
    vfloat32m1_t z = __riscv_vfmv_v_f_f32m1(0, 1);
#define RED(a) __riscv_vfmv_f_s_f32m1_f32(__riscv_vfredusum_vs_f32m2_f32m1(a, z, vlmax))
    float r[2][4] = {{RED(a00), RED(a01), RED(a02), RED(a03)}, {RED(a10), RED(a11), RED(a12), RED(a13)}};
#undef RED
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < rn; j++) Y[i * ldy + j] = r[i][j];
}

static void tile_f32_rvv(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                         size_t ldy) {
    tile(0, rm, rn, K, X, ldx, W, ldw, Y, ldy);
}
static void tile_bf16_rvv(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                          size_t ldy) {
    tile(1, rm, rn, K, X, ldx, W, ldw, Y, ldy);
}

/* int8 dot products on one block: 16-lane int8 strips (VLEN >= 128 holds 16 e8 at LMUL 1),
 * widening multiplies into int16 and one widening reduction into an exact int32 sum */
static void gemv_q8_0_rvv(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    size_t nb = K / PXL_QK, vl = __riscv_vsetvl_e8m2(PXL_QK); /* 32 int8 lanes: e8m2 from VLEN 128 up */
    vint32m1_t z = __riscv_vmv_v_x_i32m1(0, 1);
    for (size_t n = n0; n < n1; n++) {
        const pxl_block_q8_0 *b = (const pxl_block_q8_0 *)W + n * nb;
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            vint16m4_t p = __riscv_vwmul_vv_i16m4(__riscv_vle8_v_i8m2(b[i].qs, vl),
                                                  __riscv_vle8_v_i8m2(x->q + i * PXL_QK, vl), vl);
            int32_t dot = __riscv_vmv_x_s_i32m1_i32(__riscv_vwredsum_vs_i16m4_i32m1(p, z, vl));
            s += (float)dot * (pxl_fp16_to_fp32(b[i].d) * x->d[i]);
        }
        y[n] = s;
    }
}

static void gemv_q4_rvv(int q41, size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    size_t nb = K / PXL_QK, bs = q41 ? sizeof(pxl_block_q4_1) : sizeof(pxl_block_q4_0), vl = __riscv_vsetvl_e8m1(16);
    vint32m1_t z = __riscv_vmv_v_x_i32m1(0, 1);
    for (size_t n = n0; n < n1; n++) {
        const uint8_t *row = (const uint8_t *)W + n * nb * bs;
        float s = 0, off = 0;
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = row + i * bs;
            const int8_t *xq = x->q + i * PXL_QK;
            float dw = pxl_fp16_to_fp32(*(const uint16_t *)blk);
            off += (q41 ? pxl_fp16_to_fp32(*(const uint16_t *)(blk + 2)) * x->c[i] : 0.0f) + dw * x->e[i];
            vuint8m1_t qb = __riscv_vle8_v_u8m1(blk + (q41 ? 4 : 2), vl);
            vint8m1_t lo = __riscv_vreinterpret_v_u8m1_i8m1(__riscv_vand_vx_u8m1(qb, 0xf, vl));
            vint8m1_t hi = __riscv_vreinterpret_v_u8m1_i8m1(__riscv_vsrl_vx_u8m1(qb, 4, vl));
            vint16m2_t p = __riscv_vwmul_vv_i16m2(lo, __riscv_vle8_v_i8m1(xq, vl), vl);
            p = __riscv_vwmacc_vv_i16m2(p, hi, __riscv_vle8_v_i8m1(xq + 16, vl), vl); /* |sum| <= 2*15*127 */
            int32_t dot = __riscv_vmv_x_s_i32m1_i32(__riscv_vwredsum_vs_i16m2_i32m1(p, z, vl));
            s += (float)dot * (dw * x->d[i]);
        }
        y[n] = s + off;
    }
}
static void gemv_q4_0_rvv(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv_q4_rvv(0, n0, n1, K, W, x, y);
}
static void gemv_q4_1_rvv(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv_q4_rvv(1, n0, n1, K, W, x, y);
}

const pxl_kernel_set pxl_kernels_rvv = {
    .isa = "rvv", .rm = 2, .rn = 4, .gemv_rn = 4, .tile_f32 = tile_f32_rvv, .tile_bf16 = tile_bf16_rvv,
    .gemv_q = {[PXL_Q8_0] = gemv_q8_0_rvv, [PXL_Q4_0] = gemv_q4_0_rvv, [PXL_Q4_1] = gemv_q4_1_rvv},
};
#endif
