/* RVV 1.0 kernels, VLEN-agnostic (tested under qemu at VLEN 128..1024), written for the
 * fewest retired instructions per weight (make -C csrc count-rvv).
 *
 * fp32 / bf16 tiles: every (token, feature) dot product runs the same kernel, x . w over K in
 * LMUL=8 strips (the widest register groups), two features a pass so each x strip feeds two
 * FMAs. A row's sum never depends on the tile around it, so decode (T = 1) and prefill give
 * the same bits (pxl_batch_invariant) with no separate path.
 *
 * Quantised GEMVs (int8 activations, pxl_qx): the lanes are weight rows, not K, so a block's
 * fp16 scale is per lane and no reduction is needed. A strided segment load (stride: one
 * row's bytes) brings 4 consecutive quants of one block for vl rows, one register group per
 * quant, and each is multiplied by the token's int8 x[k], a scalar shared by every lane
 * (vwmul.vx / vwmacc.vx); the block's scales of all vl rows come in one strided load and are
 * converted in vector registers. vl grows with VLEN, so the instruction count falls with it.
 * (On silicon a strided segment load may cost more per element than a unit-stride one: the
 * repacked PXL_Q*R layouts would give the same lanes with unit-stride loads.)
 */
#include "pxl_kernels.h"

#if defined(__riscv_v_intrinsic) && __riscv_v_intrinsic >= 11000
#include <riscv_vector.h>

/* ---- fp32 / bf16 tiles ---- */

/* y[j] = x . W[j] for j < 2 npairs (>= 1), one token against rows ldw bytes apart, two rows a pass
 * in LMUL=8 strips along K: v8-v15 hold an x strip (widened to fp32), v0-v7 a weight strip,
 * v16-v23 and v24-v31 the two rows' sums. Inline assembly: clang 16 compiles the intrinsics
 * version of a loop that keeps these four groups live (all 32 registers) with a spill and a
 * vsetvli in every strip; here a strip is its loads, one pointer bump per load, two FMAs and
 * a branch. Full strips run tail-agnostic; the last, shorter one tail-undisturbed, so lanes
 * past its vl keep their partial sums for the reductions over VLMAX. */
#define DOT_ROWS(name, T, LOG_ES, LDX, LDW)                                                                      \
    static void name(size_t K, const T *x, const T *w, size_t ldw, size_t npairs, float *y) {                    \
        size_t vlmax, step, tail, full, ldw2 = 2 * ldw;                                                           \
        const T *xp, *w0, *w1, *end;                                                                              \
        float r;                                                                                                  \
        __asm__ volatile("vsetvli   %[vlmax], zero, e32, m8, ta, ma\n\t"                                          \
                         "slli      %[step], %[vlmax], " #LOG_ES "\n\t"                                           \
                         "remu      %[tail], %[K], %[vlmax]\n\t"                                                  \
                         "sub       %[full], %[K], %[tail]\n\t"                                                   \
                         "slli      %[full], %[full], " #LOG_ES "\n"                                              \
                         "4:\n\t" /* a pair of rows: w, w + ldw */                                                \
                         "vmv.v.i   v16, 0\n\t"                                                                   \
                         "vmv.v.i   v24, 0\n\t"                                                                   \
                         "mv        %[xp], %[x]\n\t"                                                              \
                         "mv        %[w0], %[w]\n\t"                                                              \
                         "add       %[w1], %[w], %[ldw]\n\t"                                                      \
                         "add       %[end], %[x], %[full]\n\t"                                                    \
                         "beq       %[xp], %[end], 2f\n"                                                          \
                         "1:\n\t" LDX("xp") LDW("w0")                                                             \
                         "add       %[xp], %[xp], %[step]\n\t"                                                    \
                         "add       %[w0], %[w0], %[step]\n\t"                                                    \
                         "vfmacc.vv v16, v8, v0\n\t" LDW("w1")                                                    \
                         "add       %[w1], %[w1], %[step]\n\t"                                                    \
                         "vfmacc.vv v24, v8, v0\n\t"                                                              \
                         "bne       %[xp], %[end], 1b\n"                                                          \
                         "2:\n\t"                                                                                 \
                         "beqz      %[tail], 3f\n\t"                                                              \
                         "vsetvli   zero, %[tail], e32, m8, tu, ma\n\t" LDX("xp") LDW("w0")                       \
                         "vfmacc.vv v16, v8, v0\n\t" LDW("w1")                                                    \
                         "vfmacc.vv v24, v8, v0\n\t"                                                              \
                         "vsetvli   zero, %[vlmax], e32, m8, ta, ma\n"                                            \
                         "3:\n\t"                                                                                 \
                         "vmv.s.x      v0, zero\n\t"                                                              \
                         "vfredusum.vs v8, v16, v0\n\t"                                                           \
                         "vfmv.f.s     %[r], v8\n\t"                                                              \
                         "fsw          %[r], 0(%[y])\n\t"                                                         \
                         "vfredusum.vs v8, v24, v0\n\t"                                                           \
                         "vfmv.f.s     %[r], v8\n\t"                                                              \
                         "fsw          %[r], 4(%[y])\n\t"                                                         \
                         "addi      %[y], %[y], 8\n\t"                                                            \
                         "add       %[w], %[w], %[ldw2]\n\t"                                                      \
                         "addi      %[n], %[n], -1\n\t"                                                           \
                         "bnez      %[n], 4b"                                                                     \
                         : [w] "+r"(w), [n] "+r"(npairs), [y] "+r"(y), [vlmax] "=&r"(vlmax), [step] "=&r"(step), \
                           [tail] "=&r"(tail), [full] "=&r"(full), [xp] "=&r"(xp), [w0] "=&r"(w0),                \
                           [w1] "=&r"(w1), [end] "=&r"(end), [r] "=&f"(r)                                         \
                         : [K] "r"(K), [x] "r"(x), [ldw] "r"(ldw), [ldw2] "r"(ldw2)                                \
                         : "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11",   \
                           "v12", "v13", "v14", "v15", "v16", "v17", "v18", "v19", "v20", "v21", "v22", "v23",    \
                           "v24", "v25", "v26", "v27", "v28", "v29", "v30", "v31");                               \
    }
#define LDX_F32(p) "vle32.v   v8, (%[" p "])\n\t"
#define LDW_F32(p) "vle32.v   v0, (%[" p "])\n\t"
DOT_ROWS(dot_rows_f32, float, 2, LDX_F32, LDW_F32)
/* bf16 -> fp32 is a 16-bit shift; the 16-bit loads land in the upper half of the group that
 * vzext then fills, an overlap RVV allows for widening */
#define LDX_BF16(p) "vle16.v   v12, (%[" p "])\n\tvzext.vf2 v8, v12\n\tvsll.vi   v8, v8, 16\n\t"
#define LDW_BF16(p) "vle16.v   v4, (%[" p "])\n\tvzext.vf2 v0, v4\n\tvsll.vi   v0, v0, 16\n\t"
DOT_ROWS(dot_rows_bf16, uint16_t, 1, LDX_BF16, LDW_BF16)
#undef DOT_ROWS

/* each token against the tile's features in pairs; an odd last one pairs with itself */
#define TILE(name, T, dot_rows)                                                                                  \
    static void name(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,   \
                     size_t ldy) {                                                                               \
        const T *w = W, *last = w + (size_t)(rn - 1) * ldw;                                                     \
        for (int i = 0; i < rm; i++) {                                                                           \
            const T *x = (const T *)X + i * ldx;                                                                 \
            if (rn > 1) dot_rows(K, x, w, ldw * sizeof(T), (size_t)rn / 2, Y + i * ldy);                         \
            if (rn & 1) {                                                                                        \
                float y[2];                                                                                      \
                dot_rows(K, x, last, 0, 1, y);                                                                   \
                Y[i * ldy + rn - 1] = y[0];                                                                      \
            }                                                                                                    \
        }                                                                                                        \
    }
TILE(tile_f32_rvv, float, dot_rows_f32)
TILE(tile_bf16_rvv, uint16_t, dot_rows_bf16)
#undef TILE

/* ---- quantised GEMVs: vl rows in the lanes ---- */

/* the fp16 at byte offset `at` of each of vl rows rb bytes apart, as fp32, exact for zeros,
 * subnormals, infinities and NaNs (no zvfh in RVV 1.0's base). h sign-extended and shifted
 * left by 13 holds fp32's sign, and h's exponent and mantissa in fp32's places, with copies
 * of the sign in bits 28-30; with those cleared it reads as 2^-112 times h's value,
 * subnormals included. Exponent 31 (inf / NaN) lands on |f| >= 2^16 (finite halves stay
 * <= 65504), where the all-ones exponent is set instead, mantissa kept. Inline assembly:
 * clang 16 places h where the result's register group must go, beside the two live
 * accumulators, and spills one of them every block; here h sits in v4-v7 (v0: the mask). */
static inline vfloat32m8_t scales(const uint8_t *at, size_t rb, size_t vl) {
    vfloat32m8_t f;
    __asm__("vsetvli   zero, %[vl], e32, m8, ta, mu\n\t"
            "vlse16.v  v4, (%[at]), %[rb]\n\t" /* (16-bit elements under e32m8: 4 registers) */
            "vsext.vf2 %[f], v4\n\t"
            "vsll.vi   %[f], %[f], 13\n\t"
            "vand.vx   %[f], %[f], %[keep]\n\t"
            "vfmul.vf  %[f], %[f], %[p112]\n\t"
            "vmfge.vf  v0, %[f], %[big]\n\t"
            "vmfle.vf  v1, %[f], %[nbig]\n\t"
            "vmor.mm   v0, v0, v1\n\t"
            "vor.vx    %[f], %[f], %[inf], v0.t"
            : [f] "=&vr"(f)
            : [at] "r"(at), [rb] "r"(rb), [vl] "r"(vl), [keep] "r"(0x8fffffffL), [p112] "f"(0x1p112f),
              [big] "f"(65536.0f), [nbig] "f"(-65536.0f), [inf] "r"(0x7f800000L)
            : "memory", "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7");
    return f;
}

/* sum of q[j] x[j], j < 4, for the 4 int8 quants at q of each of vl rows rb bytes apart,
 * added to s (or alone: first). Two products per int16 lane before widening: |q x| <= 128 *
 * 127 (x is quantised to [-127, 127]), so a pair's sum fits int16, where three would not. */
static inline vint32m8_t dot4_q8(vint32m8_t s, int first, const int8_t *q, size_t rb, const int8_t *x, size_t vl) {
    vint8m2_t q0, q1, q2, q3;
    __riscv_vlsseg4e8_v_i8m2(&q0, &q1, &q2, &q3, q, (ptrdiff_t)rb, vl);
    vint16m4_t p0 = __riscv_vwmacc_vx_i16m4(__riscv_vwmul_vx_i16m4(q0, x[0], vl), x[1], q1, vl);
    vint16m4_t p1 = __riscv_vwmacc_vx_i16m4(__riscv_vwmul_vx_i16m4(q2, x[2], vl), x[3], q3, vl);
    return first ? __riscv_vwadd_vv_i32m8(p0, p1, vl)
                 : __riscv_vwadd_wv_i32m8(__riscv_vwadd_wv_i32m8(s, p0, vl), p1, vl);
}

static void gemv_q8_0_rvv(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *xp, float *y) {
    const size_t nb = K / PXL_QK, rb = nb * sizeof(pxl_block_q8_0);
    const pxl_qx x = *xp; /* (a local copy: scales()' memory clobber does not reload its pointers) */
    for (size_t n = n0, vl; n < n1; n += vl) {
        vl = __riscv_vsetvl_e8m2(n1 - n);
        const pxl_block_q8_0 *b = (const pxl_block_q8_0 *)((const uint8_t *)W + n * rb);
        vfloat32m8_t acc = __riscv_vfmv_v_f_f32m8(0, vl);
        for (size_t i = 0; i < nb; i++) {
            const int8_t *xq = x.q + i * PXL_QK;
            vint32m8_t s = __riscv_vundefined_i32m8();
            for (int j = 0; j < PXL_QK; j += 4) s = dot4_q8(s, j == 0, b[i].qs + j, rb, xq + j, vl);
            /* y += d_w d_x sum: exact int32 sum (|sum| < 2^24), one rounding each */
            vfloat32m8_t t = __riscv_vfmul_vf_f32m8(__riscv_vfcvt_f_x_v_f32m8(s, vl), x.d[i], vl);
            acc = __riscv_vfmacc_vv_f32m8(acc, scales((const uint8_t *)&b[i].d, rb, vl), t, vl);
        }
        __riscv_vse32_v_f32m8(y + n, acc, vl);
    }
}

/* the 8 nibble products of 4 bytes of Q4 quants (low nibble with x[j], high with x[j + 16])
 * of vl rows rb bytes apart, added to p (or alone: first) */
static inline vint16m4_t dot4_q4(vint16m4_t p, int first, const uint8_t *q, size_t rb, const int8_t *x, size_t vl) {
    vuint8m2_t v0, v1, v2, v3;
    __riscv_vlsseg4e8_v_u8m2(&v0, &v1, &v2, &v3, q, (ptrdiff_t)rb, vl);
    vint8m2_t lo = __riscv_vreinterpret_v_u8m2_i8m2(__riscv_vand_vx_u8m2(v0, 0xf, vl));
    p = first ? __riscv_vwmul_vx_i16m4(lo, x[0], vl) : __riscv_vwmacc_vx_i16m4(p, x[0], lo, vl);
    p = __riscv_vwmacc_vx_i16m4(p, x[16], __riscv_vreinterpret_v_u8m2_i8m2(__riscv_vsrl_vx_u8m2(v0, 4, vl)), vl);
#define NIBBLES(j, v)                                                                                          \
    p = __riscv_vwmacc_vx_i16m4(p, x[j], __riscv_vreinterpret_v_u8m2_i8m2(__riscv_vand_vx_u8m2(v, 0xf, vl)), vl); \
    p = __riscv_vwmacc_vx_i16m4(p, x[j + 16], __riscv_vreinterpret_v_u8m2_i8m2(__riscv_vsrl_vx_u8m2(v, 4, vl)), vl)
    NIBBLES(1, v1);
    NIBBLES(2, v2);
    NIBBLES(3, v3);
#undef NIBBLES
    return p;
}

/* Q4_0 / Q4_1: y_b = d_w (d_x dot + e) + m_w c (pxl_kernels.h: pxl_qx) */
PXL_INLINE void gemv_q4(const int q41, size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *xp, float *y) {
    const pxl_qx x = *xp;
    const size_t nb = K / PXL_QK, bs = q41 ? sizeof(pxl_block_q4_1) : sizeof(pxl_block_q4_0), rb = nb * bs;
    const size_t qs = q41 ? offsetof(pxl_block_q4_1, qs) : offsetof(pxl_block_q4_0, qs);
    for (size_t n = n0, vl; n < n1; n += vl) {
        vl = __riscv_vsetvl_e8m2(n1 - n);
        const uint8_t *row = (const uint8_t *)W + n * rb;
        vfloat32m8_t acc = __riscv_vfmv_v_f_f32m8(0, vl);
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = row + i * bs;
            const int8_t *xq = x.q + i * PXL_QK;
            /* the block's 32 products in two int16 halves: |n x| <= 15 * 127, 16 sum exactly */
            vint16m4_t p0 = dot4_q4(__riscv_vundefined_i16m4(), 1, blk + qs, rb, xq, vl);
            vint16m4_t p1 = dot4_q4(__riscv_vundefined_i16m4(), 1, blk + qs + 8, rb, xq + 8, vl);
            p0 = dot4_q4(p0, 0, blk + qs + 4, rb, xq + 4, vl);
            p1 = dot4_q4(p1, 0, blk + qs + 12, rb, xq + 12, vl);
            vint32m8_t s = __riscv_vwadd_vv_i32m8(p0, p1, vl);
            vfloat32m8_t dw = scales(blk, rb, vl), t = __riscv_vfcvt_f_x_v_f32m8(s, vl);
            t = __riscv_vfadd_vf_f32m8(__riscv_vfmul_vf_f32m8(t, x.d[i], vl), x.e[i], vl);
            acc = __riscv_vfmacc_vv_f32m8(acc, dw, t, vl);
            if (q41) acc = __riscv_vfmacc_vf_f32m8(acc, x.c[i], scales(blk + 2, rb, vl), vl);
        }
        __riscv_vse32_v_f32m8(y + n, acc, vl);
    }
}
static void gemv_q4_0_rvv(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv_q4(0, n0, n1, K, W, x, y);
}
static void gemv_q4_1_rvv(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv_q4(1, n0, n1, K, W, x, y);
}

const pxl_kernel_set pxl_kernels_rvv = {
    .isa = "rvv", .rm = 4, .rn = 8, .gemv_rn = 16, .tile_f32 = tile_f32_rvv, .tile_bf16 = tile_bf16_rvv,
    .gemv_q = {[PXL_Q8_0] = gemv_q8_0_rvv, [PXL_Q4_0] = gemv_q4_0_rvv, [PXL_Q4_1] = gemv_q4_1_rvv},
};
#endif
