/* Portable C kernels: the fallback on every CPU, the base the ISA files must beat,
 * and the building blocks (fp16 decode, dequantisation) they share. */
#include <math.h>

#include "pxl_kquants.h"

float pxl_fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

size_t pxl_row_bytes(int fmt, size_t K) {
    switch (fmt) {
    case PXL_F32: return K * 4;
    case PXL_BF16: return K * 2;
    case PXL_Q8_0: return K / PXL_QK * sizeof(pxl_block_q8_0);
    case PXL_Q4_0: return K / PXL_QK * sizeof(pxl_block_q4_0);
    case PXL_Q4_1: return K / PXL_QK * sizeof(pxl_block_q4_1);
    case PXL_Q4_K: return K / PXL_QK_K * sizeof(pxl_block_q4_K);
    case PXL_Q5_K: return K / PXL_QK_K * sizeof(pxl_block_q5_K);
    case PXL_Q6_K: return K / PXL_QK_K * sizeof(pxl_block_q6_K);
    case PXL_Q4_KR: return K / PXL_QK_K * sizeof(pxl_block_q4_Kx16) / PXL_QR_ROWS; /* a row's share of its block */
    case PXL_Q5_KR: return K / PXL_QK_K * sizeof(pxl_block_q5_Kx16) / PXL_QR_ROWS;
    case PXL_Q6_KR: return K / PXL_QK_K * sizeof(pxl_block_q6_Kx16) / PXL_QR_ROWS;
    default: return pxl_row_bytes(PXL_QBASE(fmt), K); /* repacked: the same bytes, 16 rows interleaved */
    }
}

void pxl_dequant_rows(int fmt, const void *W, size_t n0, size_t rows, size_t K, float *out) {
    if (fmt >= PXL_Q8_0R && fmt <= PXL_Q4_1R) {
        pxl_dequant_rows_qr(fmt, W, n0, rows, K, out);
        return;
    }
    if (PXL_IS_KR(fmt)) {
        pxl_dequant_rows_kr(fmt, W, n0, rows, K, out);
        return;
    }
    if (PXL_IS_KQUANT(fmt)) {
        pxl_dequant_rows_k(fmt, (const char *)W + n0 * pxl_row_bytes(fmt, K), rows, K, out);
        return;
    }
    const char *base = (const char *)W + n0 * pxl_row_bytes(fmt, K);
    size_t nb = K / PXL_QK;
    for (size_t r = 0; r < rows; r++, out += K) {
        const char *row = base + r * pxl_row_bytes(fmt, K);
        if (fmt == PXL_F32) {
            memcpy(out, row, K * 4);
        } else if (fmt == PXL_BF16) {
            for (size_t k = 0; k < K; k++) out[k] = pxl_bf16_to_f32(((const uint16_t *)row)[k]);
        } else if (fmt == PXL_Q8_0) {
            const pxl_block_q8_0 *b = (const pxl_block_q8_0 *)row;
            for (size_t i = 0; i < nb; i++) {
                float d = pxl_fp16_to_fp32(b[i].d);
                for (int j = 0; j < PXL_QK; j++) out[i * PXL_QK + j] = d * b[i].qs[j];
            }
        } else { /* Q4_0 and Q4_1: w = d * nibble + m, with m = -8d for Q4_0 */
            for (size_t i = 0; i < nb; i++) {
                const uint8_t *qs;
                float d, m;
                if (fmt == PXL_Q4_0) {
                    const pxl_block_q4_0 *b = (const pxl_block_q4_0 *)row + i;
                    d = pxl_fp16_to_fp32(b->d), m = -8 * d, qs = b->qs;
                } else {
                    const pxl_block_q4_1 *b = (const pxl_block_q4_1 *)row + i;
                    d = pxl_fp16_to_fp32(b->d), m = pxl_fp16_to_fp32(b->m), qs = b->qs;
                }
                for (int j = 0; j < PXL_QK / 2; j++) {
                    out[i * PXL_QK + j] = d * (qs[j] & 0xf) + m;
                    out[i * PXL_QK + j + 16] = d * (qs[j] >> 4) + m;
                }
            }
        }
    }
}

PXL_INLINE float elem(const int BF16, const void *p, size_t i) {
    return BF16 ? pxl_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

PXL_INLINE void tile_generic(const int BF16, int rm, int rn, size_t K, const void *X, size_t ldx, const void *W,
                             size_t ldw, float *Y, size_t ldy) {
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < rn; j++) {
            size_t xo = i * ldx, wo = j * ldw;
            float acc[8] = {0}; /* eight chains: lets the compiler vectorise the dot */
            size_t k = 0;
            for (; k + 8 <= K; k += 8)
                for (int u = 0; u < 8; u++) acc[u] += elem(BF16, X, xo + k + u) * elem(BF16, W, wo + k + u);
            float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            for (; k < K; k++) s += elem(BF16, X, xo + k) * elem(BF16, W, wo + k);
            Y[i * ldy + j] = s;
        }
}

static void tile_f32_generic(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw, float *Y,
                             size_t ldy) {
    tile_generic(0, rm, rn, K, X, ldx, W, ldw, Y, ldy);
}
static void tile_bf16_generic(int rm, int rn, size_t K, const void *X, size_t ldx, const void *W, size_t ldw,
                              float *Y, size_t ldy) {
    tile_generic(1, rm, rn, K, X, ldx, W, ldw, Y, ldy);
}

/* Quantised GEMV straight on the blocks with int8 activations: each block's integer dot
 * product is exact in int32 and scaled once by d_w * d_x; the Q4 offset term comes from
 * the per-block c (see pxl_qx). The x86 and RVV kernels compute the same sums. */
static void gemv_q8_0_generic(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    size_t nb = K / PXL_QK;
    for (size_t n = n0; n < n1; n++) {
        const pxl_block_q8_0 *b = (const pxl_block_q8_0 *)W + n * nb;
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            int32_t dot = 0;
            for (int j = 0; j < PXL_QK; j++) dot += (int32_t)b[i].qs[j] * x->q[i * PXL_QK + j];
            s += (float)dot * (pxl_fp16_to_fp32(b[i].d) * x->d[i]);
        }
        y[n] = s;
    }
}

static void gemv_q4_generic(int q41, size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    size_t nb = K / PXL_QK, bs = q41 ? sizeof(pxl_block_q4_1) : sizeof(pxl_block_q4_0);
    for (size_t n = n0; n < n1; n++) {
        float s = 0, off = 0;
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = (const uint8_t *)W + (n * nb + i) * bs, *qs = blk + (q41 ? 4 : 2);
            const int8_t *xq = x->q + i * PXL_QK;
            int32_t dot = 0;
            for (int j = 0; j < PXL_QK / 2; j++) dot += (qs[j] & 0xf) * xq[j] + (qs[j] >> 4) * xq[j + 16];
            float dw = pxl_fp16_to_fp32(*(const uint16_t *)blk);
            s += (float)dot * (dw * x->d[i]);
            off += (q41 ? pxl_fp16_to_fp32(*(const uint16_t *)(blk + 2)) * x->c[i] : 0.0f) + dw * x->e[i];
        }
        y[n] = s + off;
    }
}
static void gemv_q4_0_generic(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv_q4_generic(0, n0, n1, K, W, x, y);
}
static void gemv_q4_1_generic(size_t n0, size_t n1, size_t K, const void *W, const pxl_qx *x, float *y) {
    gemv_q4_generic(1, n0, n1, K, W, x, y);
}

/* The packed layouts' portable kernels (PXL_F32P [K][32], PXL_BF16P [K/2][32][2]): a set
 * without its own runs weights another set packed (pxl_set_isa after packing) correctly. */
void pxl_gemm_f32p_generic(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                           int nvalid, const void *pf, size_t npf) {
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < nvalid; j++) {
            float acc = 0;
            for (size_t k = 0; k < K; k++)
                acc += ((const float *)X)[i * ldx + k] * ((const float *)Wp)[k * PXL_PANEL + j];
            Y[i * ldy + j] = acc;
        }
}
void pxl_gemm_bf16p_generic(int rm, size_t K, const void *X, size_t ldx, const void *Wp, float *Y, size_t ldy,
                            int nvalid, const void *pf, size_t npf) {
    const uint16_t *x = X, *w = Wp;
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < nvalid; j++) {
            float acc = 0;
            for (size_t k = 0; k < K; k++)
                acc += pxl_bf16_to_f32(x[i * ldx + k]) * pxl_bf16_to_f32(w[(k / 2 * PXL_PANEL + j) * 2 + k % 2]);
            Y[i * ldy + j] = acc;
        }
}

const pxl_kernel_set pxl_kernels_generic = {
    .isa = "generic", .rm = 4, .rn = 4, .gemv_rn = 4,
    .tile_f32 = tile_f32_generic, .tile_bf16 = tile_bf16_generic,
    .gemv_q = {[PXL_Q8_0] = gemv_q8_0_generic, [PXL_Q4_0] = gemv_q4_0_generic, [PXL_Q4_1] = gemv_q4_1_generic},
};
