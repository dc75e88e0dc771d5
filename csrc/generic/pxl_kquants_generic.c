/* K-quants (pxl_kquants.h), portable: x to Q8_K, the scalar GEMV the ISA files must match,
 * dequantisation for prefill panels, and the choice of kernel per kernel set. */
#include <string.h>

#include "pxl_kquants.h"

/* the 16-sums of a 256-block's levels: |sum| <= 16 * 127 */
static inline void block_sums(const int8_t *qb, int16_t *bsums) {
    for (int s = 0; s < PXL_QK_K / 16; s++) {
        int32_t sum = 0;
        for (int l = 0; l < 16; l++) sum += qb[s * 16 + l];
        bsums[s] = (int16_t)sum;
    }
}

/* one 256-block per pass, amax / 127 as the scale (symmetric, as the 32-blocks are): plain
 * selects and arithmetic, so every clone vectorises it (it runs per Linear call in decode) */
PXL_CLONES static void quantize_q8k_blocks(size_t nb, const float *x, int8_t *q, float *d, int16_t *bsums) {
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * PXL_QK_K;
        float db = pxl_amax(xb, PXL_QK_K) / 127.0f, id = db != 0 ? 1.0f / db : 0.0f;
        int8_t *qb = q + b * PXL_QK_K;
        for (int j = 0; j < PXL_QK_K; j++) qb[j] = (int8_t)pxl_round_even(xb[j] * id);
        block_sums(qb, bsums + b * (PXL_QK_K / 16));
        d[b] = db;
    }
}

/* PXL_QX_INT16: a 256-block as X = round(x / s), s = amax / 32512, in two Q8_K planes
 * X = 255 h + l (pxl_split_x16) of scales 255 s and s */
PXL_CLONES static void quantize_q8k16_blocks(size_t nb, const float *x, int8_t *qh, float *dh, int16_t *bh,
                                             int8_t *ql, float *dl, int16_t *bl) {
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * PXL_QK_K;
        float s = pxl_amax(xb, PXL_QK_K) / PXL_X16_MAX, is = s != 0 ? 1.0f / s : 0.0f;
        int8_t *hb = qh + b * PXL_QK_K, *lb = ql + b * PXL_QK_K;
        for (int j = 0; j < PXL_QK_K; j++) {
            int32_t h, l;
            pxl_split_x16(pxl_round_even(xb[j] * is), &h, &l);
            hb[j] = (int8_t)h, lb[j] = (int8_t)l;
        }
        block_sums(hb, bh + b * (PXL_QK_K / 16));
        block_sums(lb, bl + b * (PXL_QK_K / 16));
        dh[b] = 255.0f * s, dl[b] = s;
    }
}

void pxl_quantize_q8k(size_t K, const float *x, void *buf, pxl_q8k *out) {
    *out = pxl_q8k_at(buf, K);
    quantize_q8k_blocks(K / PXL_QK_K, x, buf, (float *)out->d, (int16_t *)out->bsums);
}

void pxl_quantize_q8k16(size_t K, const float *x, void *hi, void *lo) {
    pxl_q8k h = pxl_q8k_at(hi, K), l = pxl_q8k_at(lo, K);
    quantize_q8k16_blocks(K / PXL_QK_K, x, hi, (float *)h.d, (int16_t *)h.bsums, lo, (float *)l.d,
                          (int16_t *)l.bsums);
}

static size_t block_bytes(int fmt) {
    return fmt == PXL_Q4_K ? sizeof(pxl_block_q4_K) : fmt == PXL_Q5_K ? sizeof(pxl_block_q5_K) : sizeof(pxl_block_q6_K);
}

/* the 256 unsigned quants of one super-block (Q4_K / Q5_K: 0..31; Q6_K: 0..63, before the -32) */
PXL_INLINE void unpack_k(int fmt, const uint8_t *blk, uint8_t *u) {
    if (fmt == PXL_Q6_K) {
        const pxl_block_q6_K *b = (const pxl_block_q6_K *)blk;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b->ql + 64 * h, *qh = b->qh + 32 * h;
            for (int g = 0; g < 4; g++)
                for (int l = 0; l < 32; l++) {
                    int nib = g < 2 ? ql[l + 32 * (g & 1)] & 0xF : ql[l + 32 * (g & 1)] >> 4;
                    u[128 * h + 32 * g + l] = (uint8_t)(nib | ((qh[l] >> (2 * g)) & 3) << 4);
                }
        }
        return;
    }
    const uint8_t *qs = fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->qs : ((const pxl_block_q5_K *)blk)->qs;
    const uint8_t *qh = fmt == PXL_Q5_K ? ((const pxl_block_q5_K *)blk)->qh : NULL;
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < 32; l++) {
            int lo = qs[32 * j + l] & 0xF, hi = qs[32 * j + l] >> 4;
            if (qh) lo |= ((qh[l] >> (2 * j)) & 1) << 4, hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
            u[64 * j + l] = (uint8_t)lo, u[64 * j + 32 + l] = (uint8_t)hi;
        }
}

void pxl_gemv_qk_generic(int fmt, size_t n0, size_t n1, size_t K, const void *W, const pxl_q8k *x, float *y) {
    size_t nb = K / PXL_QK_K, bs = block_bytes(fmt);
    uint8_t u[PXL_QK_K];
    for (size_t n = n0; n < n1; n++) {
        float s = 0;
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = (const uint8_t *)W + (n * nb + i) * bs;
            const int8_t *q = x->q + i * PXL_QK_K;
            const int16_t *bsum = x->bsums + i * (PXL_QK_K / 16);
            unpack_k(fmt, blk, u);
            int32_t sumi = 0, summ = 0;
            if (fmt == PXL_Q6_K) { /* sc (u - 32) over 16s: sc (dot(u, q) - 32 bsum) */
                const pxl_block_q6_K *b = (const pxl_block_q6_K *)blk;
                for (int sb = 0; sb < 16; sb++) {
                    int32_t dot = 0;
                    for (int l = 0; l < 16; l++) dot += u[16 * sb + l] * q[16 * sb + l];
                    sumi += b->scales[sb] * (dot - 32 * bsum[sb]);
                }
                s += pxl_fp16_to_fp32(b->d) * x->d[i] * (float)sumi;
                continue;
            }
            const uint8_t *scales = fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->scales
                                                    : ((const pxl_block_q5_K *)blk)->scales;
            uint8_t sc[8], m[8];
            pxl_k4_scales(scales, sc, m);
            for (int sb = 0; sb < 8; sb++) {
                int32_t dot = 0;
                for (int l = 0; l < 32; l++) dot += u[32 * sb + l] * q[32 * sb + l];
                sumi += sc[sb] * dot, summ += m[sb] * (bsum[2 * sb] + bsum[2 * sb + 1]);
            }
            const uint16_t *dd = (const uint16_t *)blk; /* d, dmin lead both layouts */
            s += x->d[i] * (pxl_fp16_to_fp32(dd[0]) * (float)sumi - pxl_fp16_to_fp32(dd[1]) * (float)summ);
        }
        y[n] = s;
    }
}

/* one super-block -> 256 floats, fmt a constant: a scale (and min) per sub-block, then plain
 * loops over its quants that every clone vectorises (prefill dequantises whole matrices) */
PXL_INLINE void dequant_block_k(const int fmt, const uint8_t *blk, float *o) {
    uint8_t u[PXL_QK_K];
    unpack_k(fmt, blk, u);
    if (fmt == PXL_Q6_K) {
        const pxl_block_q6_K *b = (const pxl_block_q6_K *)blk;
        float d = pxl_fp16_to_fp32(b->d);
        for (int s = 0; s < 16; s++) {
            float a = d * b->scales[s];
            for (int l = 0; l < 16; l++) o[16 * s + l] = a * (float)(u[16 * s + l] - 32);
        }
        return;
    }
    const uint16_t *dd = (const uint16_t *)blk;
    float d = pxl_fp16_to_fp32(dd[0]), dmin = pxl_fp16_to_fp32(dd[1]);
    uint8_t sc[8], m[8];
    pxl_k4_scales(fmt == PXL_Q4_K ? ((const pxl_block_q4_K *)blk)->scales : ((const pxl_block_q5_K *)blk)->scales, sc,
                  m);
    for (int s = 0; s < 8; s++) {
        float a = d * sc[s], c = dmin * m[s];
        for (int l = 0; l < 32; l++) o[32 * s + l] = a * u[32 * s + l] - c;
    }
}

PXL_CLONES static void dequant_rows_k(int fmt, const uint8_t *W, size_t n, float *out) { /* n super-blocks */
    const size_t bs = block_bytes(fmt);
    if (fmt == PXL_Q4_K) for (size_t i = 0; i < n; i++) dequant_block_k(PXL_Q4_K, W + i * bs, out + i * PXL_QK_K);
    else if (fmt == PXL_Q5_K) for (size_t i = 0; i < n; i++) dequant_block_k(PXL_Q5_K, W + i * bs, out + i * PXL_QK_K);
    else for (size_t i = 0; i < n; i++) dequant_block_k(PXL_Q6_K, W + i * bs, out + i * PXL_QK_K);
}

void pxl_dequant_rows_k(int fmt, const void *W, size_t rows, size_t K, float *out) {
    dequant_rows_k(fmt, W, rows * (K / PXL_QK_K), out); /* rows are whole super-blocks, back to back */
}

void pxl_repack_qk(int fmt, size_t N, size_t K, const void *W, void *out) {
    const size_t nb = K / PXL_QK_K, q6 = fmt == PXL_Q6_K;
    const size_t bs = PXL_QR_ROWS * pxl_row_bytes(pxl_kr_of(fmt), PXL_QK_K);
    memset(out, 0, (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * nb * bs); /* zero rows pad N */
    uint8_t u[PXL_QK_K];
    for (size_t n = 0; n < N; n++)
        for (size_t i = 0; i < nb; i++) {
            const uint8_t *blk = (const uint8_t *)W + (n * nb + i) * block_bytes(fmt);
            char *xb = (char *)out + (n / PXL_QR_ROWS * nb + i) * bs;
            size_t r = n % PXL_QR_ROWS;
            unpack_k(fmt, blk, u);
            uint8_t *qs;
            if (q6) {
                const pxl_block_q6_K *b = (const pxl_block_q6_K *)blk;
                pxl_block_q6_Kx16 *x = (pxl_block_q6_Kx16 *)xb;
                x->d[r] = b->d;
                for (int s = 0; s < 16; s++) x->sc[16 * s + r] = b->scales[s];
                for (int s = 0; s < 16; s++)
                    for (int t = 0; t < 4; t++)
                        x->qh[64 * s + 4 * r + t] = (uint8_t)(u[16 * s + t] >> 4 | (u[16 * s + 4 + t] >> 4) << 2 |
                                                              (u[16 * s + 8 + t] >> 4) << 4 |
                                                              (u[16 * s + 12 + t] >> 4) << 6);
                qs = x->ql;
            } else { /* (Q5_K's d, dmin and scales lie as Q4_K's) */
                const pxl_block_q4_K *b = (const pxl_block_q4_K *)blk;
                pxl_block_q4_Kx16 *x = (pxl_block_q4_Kx16 *)xb;
                uint8_t sc[8], m[8];
                pxl_k4_scales(b->scales, sc, m);
                x->d[r] = b->d, x->dmin[r] = b->dmin;
                for (int j = 0; j < 8; j++) x->sc[16 * j + r] = sc[j], x->m[32 * (j / 2) + 2 * r + j % 2] = m[j];
                qs = x->qs;
                if (fmt == PXL_Q5_K) /* the fifth bits of quant vector 4j + p's nibbles: bits 2p, 2p + 1 */
                    for (int j = 0; j < 8; j++)
                        for (int s = 0; s < 4; s++) {
                            int h = 0;
                            for (int p = 0; p < 4; p++) {
                                const uint8_t *v = u + 32 * j + 8 * p + s;
                                h |= (v[0] >> 4) << 2 * p | (v[4] >> 4) << (2 * p + 1);
                            }
                            ((pxl_block_q5_Kx16 *)xb)->qh[64 * j + 4 * r + s] = (uint8_t)h;
                        }
            }
            for (int p = 0; p < PXL_QK_K / 8; p++) /* the low 4 bits (Q4_K: all of them) */
                for (int s = 0; s < 4; s++)
                    qs[64 * p + 4 * r + s] = (uint8_t)((u[8 * p + s] & 15) | (u[8 * p + 4 + s] & 15) << 4);
        }
}

/* (not a clone: built for the base ISA, whose lack of a fused multiply-add keeps the product
 * and the min two roundings, as the panel kernel computes them) */
void pxl_dequant_rows_kr(int fmt, const void *W, size_t n0, size_t rows, size_t K, float *out) {
    const size_t nb = K / PXL_QK_K;
    for (size_t n = n0; n < n0 + rows; n++, out += K) {
        const size_t r = n % PXL_QR_ROWS, blk0 = n / PXL_QR_ROWS * nb;
        for (size_t i = 0; i < nb; i++) {
            float *o = out + i * PXL_QK_K;
            if (fmt == PXL_Q6_KR) {
                const pxl_block_q6_Kx16 *b = (const pxl_block_q6_Kx16 *)W + blk0 + i;
                const float d = pxl_fp16_to_fp32(b->d[r]);
                for (int v = 0; v < PXL_QK_K; v++) { /* value 8p + s: byte 4r + s % 4 of vector p, nibble s / 4 */
                    int p = v / 8, s = v % 8, w = v % 16;
                    int lo = b->ql[64 * p + 4 * r + s % 4] >> 4 * (s / 4) & 15;
                    int hi = b->qh[64 * (v / 16) + 4 * r + w % 4] >> 2 * (w / 4) & 3;
                    o[v] = d * b->sc[16 * (v / 16) + r] * (float)((lo | hi << 4) - 32);
                }
                continue;
            }
            /* Q4_KR, or Q5_KR's leading Q4_KR block and its fifth bits */
            const size_t bs = PXL_QR_ROWS * pxl_row_bytes(fmt, PXL_QK_K);
            const pxl_block_q4_Kx16 *b = (const pxl_block_q4_Kx16 *)((const char *)W + (blk0 + i) * bs);
            const uint8_t *qh = fmt == PXL_Q5_KR ? ((const pxl_block_q5_Kx16 *)b)->qh : NULL;
            const float d = pxl_fp16_to_fp32(b->d[r]), dmin = pxl_fp16_to_fp32(b->dmin[r]);
            for (int v = 0; v < PXL_QK_K; v++) {
                int j = v / 32, s = v % 8, p = v % 32 / 8; /* value 8p + s of sub-block j: vector 4j + p */
                float a = d * b->sc[16 * j + r], c = dmin * b->m[32 * (j / 2) + 2 * r + j % 2];
                int q = b->qs[64 * (v / 8) + 4 * r + s % 4] >> 4 * (s / 4) & 15;
                if (qh) q |= (qh[64 * j + 4 * r + s % 4] >> (2 * p + s / 4) & 1) << 4;
                o[v] = a * (float)q - c;
            }
        }
    }
}

pxl_gemm_kr_fn pxl_gemm_kr_for(const pxl_kernel_set *ks) {
#if defined(__x86_64__)
    if (ks->vnni) return pxl_gemm_kr_avx512vnni;
#endif
    (void)ks;
    return NULL;
}

pxl_gemm_qk_fn pxl_gemm_qk_for(const pxl_kernel_set *ks, int fmt) {
#if defined(__x86_64__)
    if ((fmt == PXL_Q4_K || fmt == PXL_Q6_K) && (ks->vnni || !strcmp(ks->isa, "avx512")))
        return pxl_gemm_qk_avx512;
#endif
    (void)ks, (void)fmt;
    return NULL;
}

int pxl_qk_dot(const pxl_kernel_set *ks, int dt, int fmt, size_t T) {
    if (T <= PXL_Q_DOT_MAX_T || pxl_batch_invariant() || PXL_IS_KR(fmt)) return 1; /* (no dequantised copy) */
    return pxl_gemm_qk_for(ks, fmt) && (T < PXL_QK_DOT_MAX_T || dt != PXL_BF16 || !ks->gemm_bf16p);
}

pxl_gemv_qk_fn pxl_gemv_qk_for(const pxl_kernel_set *ks) {
#if defined(__x86_64__)
    if (ks->vnni) return pxl_gemv_qk_avx512vnni;
    if (!strcmp(ks->isa, "avx512") || !strcmp(ks->isa, "avx2")) return pxl_gemv_qk_avx2;
#endif
#ifdef PXL_HAVE_RVV
    if (!strcmp(ks->isa, "rvv")) return pxl_gemv_qk_rvv;
#endif
    return pxl_gemv_qk_generic;
}
