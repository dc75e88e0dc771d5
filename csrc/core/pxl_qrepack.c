/* Quantised weights repacked 16 rows a block (PXL_Q8_0R / Q4_0R / Q4_1R; layout in
 * perfxlm_ops.h): the packer, dequantisation for the prefill paths, and the scalar kernel
 * any kernel set can run them with.
 *
 * Why repack: on GGUF's row-major blocks a decode GEMV does per row and block one int8 dot
 * product, a horizontal sum and scalar scale work, which makes Q4_1 decode compute-bound
 * rather than bandwidth-bound. Interleaving 16 rows lets one 64-byte vpdpbusd advance 16 rows
 * by 4 weights against x's 4 int8 broadcast, and one vector FMA scale 16 rows' block sums
 * (llama.cpp's CPU "repack" buffers do the same). */
#include "pxl_kernels.h"

#define G PXL_QR_ROWS /* rows per repacked block */

/* one GGUF block's bytes; a repacked block is G of them */
static size_t block_bytes(int fmt) { return pxl_row_bytes(fmt, PXL_QK); }
static size_t quants_at(int fmt) { return fmt == PXL_Q4_1 ? 4 * G : 2 * G; } /* after d[16] (and m[16]) */

/* weight j of a GGUF block's quants, as the unsigned value the repacked layout stores */
static uint8_t gguf_quant(int fmt, const uint8_t *blk, int j) {
    if (fmt == PXL_Q8_0) return (uint8_t)(((const pxl_block_q8_0 *)blk)->qs[j] + 128);
    const uint8_t *qs = blk + (fmt == PXL_Q4_1 ? 4 : 2);
    return j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4;
}

/* byte offset (from the quants) and nibble shift of row r's weight j in a repacked block */
static void quant_pos(int fmt, int r, int j, size_t *byte, int *shift) {
    if (fmt == PXL_Q8_0) {
        *byte = (size_t)(j / 4) * 64 + 4 * r + j % 4, *shift = 0;
    } else {
        int p = j / 8, h = (j % 8) / 4;
        *byte = (size_t)p * 64 + 4 * r + j % 4, *shift = 4 * h;
    }
}

void pxl_repack_q(int fmt, size_t N, size_t K, const void *W, void *out) {
    const size_t nb = K / PXL_QK, bs = block_bytes(fmt), gbs = G * bs, qa = quants_at(fmt);
    uint8_t *o = out;
    memset(o, 0, (N + G - 1) / G * nb * gbs); /* padding rows: zero scales, zero quants */
    for (size_t n = 0; n < N; n++)
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = (const uint8_t *)W + (n * nb + i) * bs;
            uint8_t *g = o + ((n / G) * nb + i) * gbs;
            int r = (int)(n % G);
            memcpy(g + 2 * r, blk, 2);                                  /* d */
            if (fmt == PXL_Q4_1) memcpy(g + 2 * G + 2 * r, blk + 2, 2); /* m */
            for (int j = 0; j < PXL_QK; j++) {
                size_t byte;
                int shift;
                quant_pos(fmt, r, j, &byte, &shift);
                g[qa + byte] |= (uint8_t)(gguf_quant(fmt, blk, j) << shift);
            }
        }
}

/* row r's weight j of a repacked block, unsigned as stored */
static int stored_quant(int fmt, const uint8_t *g, int r, int j) {
    size_t byte;
    int shift;
    quant_pos(fmt, r, j, &byte, &shift);
    int v = g[quants_at(fmt) + byte];
    return fmt == PXL_Q8_0 ? v : (v >> shift) & 0x0f;
}

void pxl_dequant_rows_qr(int fmt, const void *W, size_t n0, size_t rows, size_t K, float *out) {
    fmt = PXL_QBASE(fmt);
    const size_t nb = K / PXL_QK, gbs = G * block_bytes(fmt);
    for (size_t n = n0; n < n0 + rows; n++, out += K)
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *g = (const uint8_t *)W + ((n / G) * nb + i) * gbs;
            int r = (int)(n % G);
            float d = pxl_fp16_to_fp32(((const uint16_t *)g)[r]);
            float m = fmt == PXL_Q4_1 ? pxl_fp16_to_fp32(((const uint16_t *)g)[G + r]) : fmt == PXL_Q4_0 ? -8 * d : 0;
            for (int j = 0; j < PXL_QK; j++) {
                int q = stored_quant(fmt, g, r, j);
                out[i * PXL_QK + j] = fmt == PXL_Q8_0 ? d * (float)(q - 128) : d * (float)q + m;
            }
        }
}

/* The same sums as the vector kernels, one row at a time: per block the exact integer dot,
 * then y += d_w (dot d_x + e) and m_w c on their own accumulators (pxl_qx) */
void pxl_gemv_qr_generic(int fmt, size_t T, size_t rows, size_t K, const void *W, const pxl_qx *x, float *y,
                         size_t ldy) {
    fmt = PXL_QBASE(fmt);
    const size_t nb = K / PXL_QK, gbs = G * block_bytes(fmt);
    for (size_t t = 0; t < T; t++)
        for (size_t n = 0; n < rows; n++) {
            float acc = 0, accm = 0;
            for (size_t i = 0; i < nb; i++) {
                const uint8_t *g = (const uint8_t *)W + ((n / G) * nb + i) * gbs;
                int r = (int)(n % G);
                int32_t dot = 0;
                for (int j = 0; j < PXL_QK; j++) dot += stored_quant(fmt, g, r, j) * x[t].q[i * PXL_QK + j];
                float dw = pxl_fp16_to_fp32(((const uint16_t *)g)[r]);
                if (fmt == PXL_Q8_0) {
                    acc += dw * x[t].d[i] * ((float)dot + x[t].e[i]);
                } else {
                    acc += dw * ((float)dot * x[t].d[i] + x[t].e[i]);
                    if (fmt == PXL_Q4_1) accm += pxl_fp16_to_fp32(((const uint16_t *)g)[G + r]) * x[t].c[i];
                }
            }
            y[t * ldy + n] = acc + accm;
        }
}
