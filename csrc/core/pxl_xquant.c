/* x quantised per 32-block for the int8 dot products on GGUF blocks (pxl_qx: pxl_kernels.h):
 * at 8 bits (q = round(x / d), d = amax / 127, as llama.cpp's Q8_0 / Q8_1) or, for
 * PXL_QX_INT16, at 16 bits as two int8 planes the same kernels take as two tokens. */
#include "pxl_kernels.h"

/* a block's c and e (pxl_qx) from its levels' sum and scale */
static inline void block_terms(int fmt, int32_t qsum, float db, float *c, float *e) {
    int base = PXL_QBASE(fmt);
    /* Q4_1's m_w term takes the rounded x's sum, as llama.cpp's Q8_1 s: the rounding error
     * then meets sum_j w_j (x_j - q_j d), the weights themselves, which centre on zero
     * better than the block's range midpoint m_w + 8 d_w that the exact sum would leave */
    *c = base == PXL_Q4_1 ? db * (float)qsum : 0.0f;
    *e = base == PXL_Q4_0 ? -8.0f * db * (float)qsum
         : fmt == PXL_Q8_0R ? -128.0f * (float)qsum /* exact: |.| < 2^24 */
                            : 0.0f;
}

/* One 32-block of x: the per-lane loops are selects and plain arithmetic (no libm roundf,
 * no float reductions the compiler may not reorder), so every clone vectorises them: this
 * runs once per Linear call and thread in decode, on the critical path of every token. */
PXL_CLONES static void quantize_blocks(int fmt, size_t nb, const float *x, int8_t *q, float *d, float *c, float *e) {
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * PXL_QK;
        float db = pxl_amax(xb, PXL_QK) / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
        int32_t qsum = 0;
        for (int j = 0; j < PXL_QK; j++) {
            int32_t r = pxl_round_even(xb[j] * id);
            q[b * PXL_QK + j] = (int8_t)r;
            qsum += r;
        }
        d[b] = db;
        block_terms(fmt, qsum, db, c + b, e + b);
    }
}

/* PXL_QX_INT16: a 32-block of x as X = round(x / s) with |X| <= 32512 (s = amax / 32512), split
 * into two int8 planes X = 255 h + l (pxl_split_x16; h, l in [-127, 127], as the int8 kernels'
 * sign tricks need): plane h is a token of scale 255 s, plane l one of scale s, and their dot
 * products add up to x's at 16 bits. */
PXL_CLONES static void quantize_blocks16(int fmt, size_t nb, const float *x, int8_t *qh, float *dh, float *ch,
                                         float *eh, int8_t *ql, float *dl, float *cl, float *el) {
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * PXL_QK;
        float s = pxl_amax(xb, PXL_QK) / PXL_X16_MAX, is = s != 0 ? 1.0f / s : 0.0f;
        int32_t hsum = 0, lsum = 0;
        for (int j = 0; j < PXL_QK; j++) {
            int32_t h, l;
            pxl_split_x16(pxl_round_even(xb[j] * is), &h, &l);
            qh[b * PXL_QK + j] = (int8_t)h, ql[b * PXL_QK + j] = (int8_t)l;
            hsum += h, lsum += l;
        }
        dh[b] = 255.0f * s, dl[b] = s;
        block_terms(fmt, hsum, dh[b], ch + b, eh + b);
        block_terms(fmt, lsum, dl[b], cl + b, el + b);
    }
}

void pxl_quantize_x(int fmt, size_t T, size_t K, const float *x, int8_t *q, float *d, float *c, float *e) {
    size_t nb = K / PXL_QK;
    for (size_t t = 0; t < T; t++)
        quantize_blocks(fmt, nb, x + t * K, q + t * K, d + t * nb, c + t * nb, e + t * nb);
}

void pxl_quantize_x16(int fmt, size_t T, size_t K, const float *x, int8_t *q, float *d, float *c, float *e) {
    size_t nb = K / PXL_QK;
    for (size_t t = 0; t < T; t++) {
        size_t h = 2 * t, l = 2 * t + 1;
        quantize_blocks16(fmt, nb, x + t * K, q + h * K, d + h * nb, c + h * nb, e + h * nb, q + l * K, d + l * nb,
                          c + l * nb, e + l * nb);
    }
}
