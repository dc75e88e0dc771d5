/* RVV 1.0 kernels, VLEN-agnostic (tested under qemu at VLEN 128..1024).
 *
 * GEMM tiles in the dot-product form of the x86 files: 2 tokens x 4 features of LMUL=2
 * accumulators strip-mined along K by vsetvl; the last, shorter strip accumulates with
 * the tail-undisturbed (_tu) policy so lanes past vl keep their partial sums, and the
 * reduction runs over VLMAX. Rows past rm/rn alias row 0 and are computed but not stored,
 * so one unrolled body serves every tile shape. Quantised GEMVs widen one GGUF block
 * (int8, or nibbles) to fp32 in registers and scale its dot product once by d.
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

#define PXL_INLINE static inline __attribute__((always_inline))

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

static void gemv_q8_0_rvv(size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum, float *y) {
    (void)xsum;
    size_t nb = K / PXL_QK, vl = __riscv_vsetvl_e32m8(PXL_QK); /* 32 lanes fit e32m8 from VLEN 128 up */
    vfloat32m1_t z = __riscv_vfmv_v_f_f32m1(0, 1);
    for (size_t n = n0; n < n1; n++) {
        const pxl_block_q8_0 *b = (const pxl_block_q8_0 *)W + n * nb;
        vfloat32m8_t acc = __riscv_vfmv_v_f_f32m8(0, vl);
        for (size_t i = 0; i < nb; i++) {
            vint32m8_t q = __riscv_vsext_vf4_i32m8(__riscv_vle8_v_i8m2(b[i].qs, vl), vl);
            vfloat32m8_t p = __riscv_vfmul_vv_f32m8(__riscv_vfcvt_f_x_v_f32m8(q, vl), __riscv_vle32_v_f32m8(x + i * PXL_QK, vl), vl);
            acc = __riscv_vfmacc_vf_f32m8(acc, pxl_fp16_to_fp32(b[i].d), p, vl);
        }
        y[n] = __riscv_vfmv_f_s_f32m1_f32(__riscv_vfredusum_vs_f32m8_f32m1(acc, z, vl));
    }
}

static void gemv_q4_rvv(int q41, size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum,
                        float *y) {
    size_t nb = K / PXL_QK, bs = q41 ? sizeof(pxl_block_q4_1) : sizeof(pxl_block_q4_0), vl = __riscv_vsetvl_e32m4(16);
    vfloat32m1_t z = __riscv_vfmv_v_f_f32m1(0, 1);
    for (size_t n = n0; n < n1; n++) {
        const char *row = (const char *)W + n * nb * bs;
        vfloat32m4_t acc = __riscv_vfmv_v_f_f32m4(0, vl);
        float off = 0;
        for (size_t i = 0; i < nb; i++) {
            const char *blk = row + i * bs;
            float d = pxl_fp16_to_fp32(*(const uint16_t *)blk);
            off += (q41 ? pxl_fp16_to_fp32(*(const uint16_t *)(blk + 2)) : -8 * d) * xsum[i];
            vuint8m1_t qb = __riscv_vle8_v_u8m1((const uint8_t *)blk + (q41 ? 4 : 2), vl);
            vfloat32m4_t lo = __riscv_vfcvt_f_xu_v_f32m4(__riscv_vzext_vf4_u32m4(__riscv_vand_vx_u8m1(qb, 0xf, vl), vl), vl);
            vfloat32m4_t hi = __riscv_vfcvt_f_xu_v_f32m4(__riscv_vzext_vf4_u32m4(__riscv_vsrl_vx_u8m1(qb, 4, vl), vl), vl);
            vfloat32m4_t p = __riscv_vfmul_vv_f32m4(lo, __riscv_vle32_v_f32m4(x + i * PXL_QK, vl), vl);
            p = __riscv_vfmacc_vv_f32m4(p, hi, __riscv_vle32_v_f32m4(x + i * PXL_QK + 16, vl), vl);
            acc = __riscv_vfmacc_vf_f32m4(acc, d, p, vl);
        }
        y[n] = __riscv_vfmv_f_s_f32m1_f32(__riscv_vfredusum_vs_f32m4_f32m1(acc, z, vl)) + off;
    }
}
static void gemv_q4_0_rvv(size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum, float *y) {
    gemv_q4_rvv(0, n0, n1, K, W, x, xsum, y);
}
static void gemv_q4_1_rvv(size_t n0, size_t n1, size_t K, const void *W, const float *x, const float *xsum, float *y) {
    gemv_q4_rvv(1, n0, n1, K, W, x, xsum, y);
}

const pxl_kernel_set pxl_kernels_rvv = {
    .isa = "rvv", .rm = 2, .rn = 4, .gemv_rn = 4, .tile_f32 = tile_f32_rvv, .tile_bf16 = tile_bf16_rvv,
    .gemv_q = {[PXL_Q8_0] = gemv_q8_0_rvv, [PXL_Q4_0] = gemv_q4_0_rvv, [PXL_Q4_1] = gemv_q4_1_rvv},
};
#endif
