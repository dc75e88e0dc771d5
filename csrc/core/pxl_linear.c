/* Linear: y (T, N) = x (T, K) @ W (N, K)^T + b, for every weight format.
 *
 * Threads split N (each reads its own weight rows once: decode is bandwidth-bound): in fixed
 * shares for decode-sized T, in chunks taken in turn for larger T.
 * T == 1 runs GEMV tiles; T > 1 walks T in chunks that stay in L2 and tiles each chunk
 * against the weight rows; dense weights a set packs run its packed micro-kernel at every T.
 * Quantised weights run int8 dot products on the blocks (x quantised per 32-block, as
 * llama.cpp does): blocks repacked 16 rows at a time at every T, GGUF-layout blocks for small
 * T, while for larger T those are dequantised a panel at a time into L1/L2 and reused by
 * every token tile. GGUF K-quants (Q4_K / Q5_K / Q6_K) take the GGUF-layout path with x
 * quantised per 256 (Q8_K, pxl_kquants.h). Our own GEMM rather than OpenBLAS's sgemm, which is slower on these
 * shapes (`perfxlm bench gemv` runs both side by side). The packed panels' layouts are
 * pxl_pack.c's, their GEMM driver pxl_linear_packed.c's. Linears of one x (q, k, v) run as
 * one over their stacked weights (pxl_linear_parts): x prepared once, each part's columns
 * stored to its own array.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "pxl_kquants.h"
#include "pxl_linear.h"
#ifdef __x86_64__
#include <xmmintrin.h>
#endif

/* (the token counts that pick a path: PXL_T_PRIVATE in pxl_abi.h, PXL_Q_DOT_MAX_T and
 * PXL_PACKED_Q_MIN_T in pxl_kernels.h) */
#define T_CHUNK 64   /* tokens per pass over the weights: 64 x K floats stay in L2 */
#define PANEL 16     /* quantised rows dequantised at a time */
#define STREAM_MIN_BYTES (4 << 20) /* a widened output at least this big is stored non-temporally */
#define LINEAR_CHUNKS 8 /* column chunks per thread, for T past PXL_T_PRIVATE */
#define CHUNK_MIN_FLOP (16.0 * 1024 * 1024) /* work of a column chunk at least */
/* a thread's rows, and every PANEL of them, start on a repacked block */
_Static_assert(PANEL % PXL_QR_ROWS == 0, "PANEL rows are whole repacked blocks");

static void run_tiles(const pxl_kernel_set *ks, pxl_tile_fn tile, size_t es, size_t T, size_t n0, size_t n1,
                      size_t K, const char *X, const char *W, float *Y, size_t ldy) {
    if (T == 1) {
        for (size_t n = n0; n < n1; n += ks->gemv_rn) {
            int rn = n1 - n < (size_t)ks->gemv_rn ? (int)(n1 - n) : ks->gemv_rn;
            tile(1, rn, K, X, K, W + n * K * es, K, Y + n, ldy);
        }
        return;
    }
    for (size_t t0 = 0; t0 < T; t0 += T_CHUNK) {
        size_t t1 = t0 + T_CHUNK < T ? t0 + T_CHUNK : T;
        for (size_t n = n0; n < n1; n += ks->rn) {
            int rn = n1 - n < (size_t)ks->rn ? (int)(n1 - n) : ks->rn;
            for (size_t t = t0; t < t1; t += ks->rm) {
                int rm = t1 - t < (size_t)ks->rm ? (int)(t1 - t) : ks->rm;
                tile(rm, rn, K, X + t * K * es, K, W + n * K * es, K, Y + t * ldy + n, ldy);
            }
        }
    }
}

/* n values fp32 -> bf16 (to_bf16) or bf16 -> fp32: a loop of its own, so each clone
 * vectorises it (the team code around it is built for the baseline ISA) */
PXL_CLONES static void convert_row(int to_bf16, size_t n, const void *src, void *dst) {
    if (to_bf16) for (size_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = pxl_f32_to_bf16(((const float *)src)[i]);
    else for (size_t i = 0; i < n; i++) ((float *)dst)[i] = pxl_bf16_to_f32(((const uint16_t *)src)[i]);
}

/* row t's Q8_K x in a K-quant qbuf: pieces of pxl_q8k_bytes(K) */
static pxl_q8k q8k_at(const int8_t *qbuf, size_t K, size_t t) { return pxl_q8k_at(qbuf + t * pxl_q8k_bytes(K), K); }

/* x rows [t0, t1) as the kernels read them: converted between bf16 and fp32 (or copied) into
 * xc, ldc apart (when not NULL) and, for int8 dot products, quantised into qbuf (q (T, K) |
 * d | c | e, each (T, nb); with planes = 2 (PXL_QX_INT16) 2T rows of each, row t as rows 2t
 * and 2t + 1; for K-quants, T (or 2T, the same way) pieces of Q8_K); for bf16 x on repacked blocks,
 * each 32-block's sum of the bf16 values into sx (T, nb) */
static void prepare_rows(int dt, int wfmt, int xbf16, size_t T, size_t t0, size_t t1, size_t K, const void *x,
                         void *xc, size_t ldc, int8_t *qbuf, int planes, float *sx) {
    size_t nb = K / PXL_QK;
    for (size_t t = t0; t < t1; t++) {
        const float *xf = xc ? (const float *)xc + t * ldc : (const float *)x + t * K; /* (qbuf: fp32) */
        if (xc && xbf16)
            convert_row(1, K, (const float *)x + t * K, (uint16_t *)xc + t * ldc);
        else if (xc && dt == PXL_F32)
            memcpy((float *)xc + t * ldc, (const float *)x + t * K, K * 4);
        else if (xc)
            convert_row(0, K, (const uint16_t *)x + t * K, (float *)xc + t * ldc);
        if (qbuf && PXL_IS_KQUANT(wfmt)) {
            size_t qb = pxl_q8k_bytes(K);
            pxl_q8k unused;
            if (planes == 2) pxl_quantize_q8k16(K, xf, qbuf + 2 * t * qb, qbuf + (2 * t + 1) * qb);
            else pxl_quantize_q8k(K, xf, qbuf + t * qb, &unused);
        } else if (qbuf) {
            size_t TP = T * planes, r = t * planes;
            float *d = (float *)(qbuf + TP * K), *c = d + TP * nb, *e = c + TP * nb;
            (planes == 2 ? pxl_quantize_x16 : pxl_quantize_x)(wfmt, 1, K, xf, qbuf + r * K, d + r * nb, c + r * nb,
                                                              e + r * nb);
        }
        if (sx) {
            const uint16_t *xb = xc ? (const uint16_t *)xc + t * ldc : (const uint16_t *)x + t * K;
            for (size_t i = 0; i < nb; i++) {
                float s = 0;
                for (int j = 0; j < PXL_QK; j++) s += pxl_bf16_to_f32(xb[i * PXL_QK + j]);
                sx[t * nb + i] = s;
            }
        }
    }
}


/* x as the kernels read it (prepare_rows): xk (rows ldx apart), or quantised into qbuf (planes),
 * or its block sums sx */
typedef struct {
    const void *xk;
    size_t ldx;
    const int8_t *qbuf;
    int planes;
    const float *sx;
} x_ready;

/* columns [0, cols) of y = x @ W^T where W starts at the first one's row: into Y, or for
 * the packed paths with `out`, through a one-panel tile Y into out */
static void compute(const pxl_kernel_set *ks, int wfmt, int packed_q, size_t T, size_t cols, size_t K,
                    const x_ready *x, const char *W, float *Y, size_t ldy, const out_spec *out) {
    const void *xk = x->xk;
    const size_t ldx = x->ldx;
    const int8_t *qbuf = x->qbuf;
    const int planes = x->planes;
    const float *sx = x->sx;
    if (sx) { /* bf16 x on repacked blocks, weights exact: up to PXL_QR_BF16_T tokens share each load */
        size_t nb = K / PXL_QK, step = T <= PXL_QR_BF16_T ? cols : 4 * PANEL;
        for (size_t n = 0; n < cols; n += step)
            for (size_t t0 = 0; t0 < T; t0 += PXL_QR_BF16_T) {
                size_t tn = T - t0 < PXL_QR_BF16_T ? T - t0 : PXL_QR_BF16_T, rows = cols - n < step ? cols - n : step;
                ks->gemv_qr_bf16(wfmt, tn, rows, K, W + n * pxl_row_bytes(wfmt, K), (const uint16_t *)xk + t0 * ldx,
                                 ldx, sx + t0 * nb, Y + t0 * ldy + n, ldy);
            }
    } else if (wfmt == PXL_BF16P || wfmt == PXL_F32P) {
        pxl_run_packed(ks, wfmt == PXL_F32P, T, cols, K, xk, ldx, W, Y, ldy, out, 0);
    } else if (wfmt <= PXL_BF16) {
        run_tiles(ks, wfmt == PXL_F32 ? ks->tile_f32 : ks->tile_bf16, wfmt == PXL_F32 ? 4 : 2, T, 0, cols, K, xk, W,
                  Y, ldy);
    } else if (qbuf && PXL_IS_KQUANT(wfmt) && (PXL_IS_KR(wfmt) || pxl_gemm_qk_for(ks, wfmt))) {
        /* up to PXL_QKR_T (repacked) or PXL_QK_T rows of Q8_K x share each weight load (planes =
         * 2: a token's two planes are neighbouring rows, their results summed from yp, (tmax, cols)) */
        const int kr = PXL_IS_KR(wfmt);
        size_t tmax = kr ? PXL_QKR_T : PXL_QK_T, tq = tmax / planes, step = T <= tq ? cols : 4 * PANEL;
        pxl_gemm_kr_fn gkr = kr ? pxl_gemm_kr_for(ks) : NULL;
        pxl_gemm_qk_fn gqk = kr ? NULL : pxl_gemm_qk_for(ks, wfmt);
        float *yp = planes == 2 ? pxl_scratch(3, tmax * cols * 4) : NULL;
        _Static_assert(PXL_QKR_T >= PXL_QK_T, "xs holds either kernel's tokens");
        pxl_q8k xs[PXL_QKR_T];
        for (size_t n = 0; n < cols; n += step)
            for (size_t t0 = 0; t0 < T; t0 += tq) {
                size_t tn = T - t0 < tq ? T - t0 : tq, n1 = n + step < cols ? n + step : cols;
                for (size_t r = 0; r < tn * planes; r++) xs[r] = q8k_at(qbuf, K, t0 * planes + r);
                float *y = yp ? yp : Y + t0 * ldy; /* (columns n .. n1 of it) */
                size_t ly = yp ? cols : ldy;
                if (kr) gkr(wfmt, tn * planes, n1 - n, K, W + n * pxl_row_bytes(wfmt, K), xs, y + n, ly);
                else gqk(wfmt, tn * planes, n, n1, K, W, xs, y, ly);
                for (size_t t = 0; yp && t < tn; t++)
                    for (size_t j = n; j < n1; j++)
                        Y[(t0 + t) * ldy + j] = yp[2 * t * cols + j] + yp[(2 * t + 1) * cols + j];
            }
    } else if (qbuf && PXL_IS_KQUANT(wfmt)) { /* Q8_K x, token by token over panels of rows in L1 */
        size_t step = T == 1 ? cols : PANEL;
        pxl_gemv_qk_fn qk = pxl_gemv_qk_for(ks);
        float *yl = planes == 2 ? pxl_scratch(3, cols * 4) : NULL; /* the low plane's row */
        for (size_t n = 0; n < cols; n += step) {
            size_t n1 = n + step < cols ? n + step : cols;
            for (size_t t = 0; t < T; t++) {
                pxl_q8k xt = q8k_at(qbuf, K, t * planes);
                qk(wfmt, n, n1, K, W, &xt, Y + t * ldy);
                if (!yl) continue;
                pxl_q8k xl = q8k_at(qbuf, K, t * planes + 1);
                qk(wfmt, n, n1, K, W, &xl, yl);
                for (size_t j = n; j < n1; j++) Y[t * ldy + j] += yl[j];
            }
        }
    } else if (qbuf && wfmt >= PXL_Q8_0R) { /* repacked: up to PXL_QR_T rows of q share each weight load */
        /* (planes = 2: a token's two planes are neighbouring rows of q, summed after the kernel) */
        size_t nb = K / PXL_QK, TP = T * planes, tq = PXL_QR_T / planes, step = T <= tq ? cols : 4 * PANEL;
        const float *d = (const float *)(qbuf + TP * K), *c = d + TP * nb, *e = c + TP * nb;
        float *yp = planes == 2 ? pxl_scratch(3, PXL_QR_T * step * 4) : NULL;
        pxl_qx xs[PXL_QR_T];
        pxl_gemv_qr_fn qr = T > tq && ks->gemm_qr[PXL_QBASE(wfmt)] ? ks->gemm_qr[PXL_QBASE(wfmt)]
                                                                    : ks->gemv_qr[PXL_QBASE(wfmt)];
        for (size_t n = 0; n < cols; n += step)
            for (size_t t0 = 0; t0 < T; t0 += tq) {
                size_t tn = T - t0 < tq ? T - t0 : tq, rows = cols - n < step ? cols - n : step;
                for (size_t r = 0, r0 = t0 * planes; r < tn * planes; r++)
                    xs[r] = (pxl_qx){qbuf + (r0 + r) * K, d + (r0 + r) * nb, c + (r0 + r) * nb, e + (r0 + r) * nb};
                const char *Wr = W + n * pxl_row_bytes(wfmt, K);
                float *y = yp ? yp : Y + t0 * ldy + n;
                size_t ly = yp ? rows : ldy;
                if (qr) qr(tn * planes, rows, K, Wr, xs, y, ly);
                else pxl_gemv_qr_generic(wfmt, tn * planes, rows, K, Wr, xs, y, ly);
                for (size_t t = 0; yp && t < tn; t++)
                    for (size_t j = 0; j < rows; j++)
                        Y[(t0 + t) * ldy + n + j] = yp[2 * t * rows + j] + yp[(2 * t + 1) * rows + j];
            }
    } else if (qbuf) { /* int8 dot products, token by token over panels of rows that stay in L1 */
        size_t nb = K / PXL_QK, TP = T * planes, step = T == 1 ? cols : PANEL;
        const float *d = (const float *)(qbuf + TP * K), *c = d + TP * nb, *e = c + TP * nb;
        float *yl = planes == 2 ? pxl_scratch(3, cols * 4) : NULL; /* the low plane's row */
        for (size_t n = 0; n < cols; n += step) {
            size_t n1 = n + step < cols ? n + step : cols;
            for (size_t t = 0; t < T; t++) {
                size_t r = t * planes;
                pxl_qx xt = {qbuf + r * K, d + r * nb, c + r * nb, e + r * nb};
                ks->gemv_q[wfmt](n, n1, K, W, &xt, Y + t * ldy);
                if (!yl) continue;
                pxl_qx xl = {qbuf + (r + 1) * K, d + (r + 1) * nb, c + (r + 1) * nb, e + (r + 1) * nb};
                ks->gemv_q[wfmt](n, n1, K, W, &xl, yl);
                for (size_t j = n; j < n1; j++) Y[t * ldy + j] += yl[j];
            }
        }
    } else if (packed_q) { /* bf16 x: dequantised panels packed for the bf16 micro-kernel */
        const int direct = ((wfmt >= PXL_Q8_0R && wfmt <= PXL_Q4_1R) || PXL_IS_KR(wfmt)) &&
                           ks->qr_bf16p; /* no fp32 rows between */
        float *rows = pxl_scratch(3, (size_t)PXL_PANEL * K * 4 + (size_t)PXL_PANEL * K * 2);
        uint16_t *panel = (uint16_t *)(rows + PXL_PANEL * K);
        for (size_t n = 0; n < cols; n += PXL_PANEL) {
            size_t r = cols - n < PXL_PANEL ? cols - n : PXL_PANEL;
            if (direct) {
                ks->qr_bf16p(wfmt, W, n, r, K, panel);
            } else {
                pxl_dequant_rows(wfmt, W, n, r, K, rows);
                pxl_pack_panel(PXL_F32, r, K, rows, panel);
            }
            pxl_run_packed(ks, 0, T, r, K, xk, ldx, panel, out ? Y : Y + n, ldy, out, n);
        }
    } else { /* fp32 GEMM tiles over dequantised panels of rows */
        float *panel = pxl_scratch(3, (size_t)PANEL * K * 4);
        for (size_t n = 0; n < cols; n += PANEL) {
            size_t rows = cols - n < PANEL ? cols - n : PANEL;
            pxl_dequant_rows(wfmt, W, n, rows, K, panel);
            run_tiles(ks, ks->tile_f32, 4, T, 0, rows, K, xk, (const char *)panel, Y + n, ldy);
        }
    }
}

/* whether y is the fp32 sums themselves: nothing to add, round or gate on the way out */
static inline int sums_are_y(int dt, int odt, const void *bias, int gated, int yr) {
    return dt == PXL_F32 && odt == PXL_F32 && !bias && !gated && !yr;
}

/* columns [n0, n0 + cols) of the whole output: stored at column j0 of y, a (T, ldy) array */
static void columns(const pxl_kernel_set *ks, int dt, int odt, int gated, int yr, int wfmt, int packed_q, size_t T,
                    size_t K, const x_ready *x, const void *W, const void *bias, size_t n0, size_t cols, void *y,
                    size_t j0, size_t ldy) {
    const char *Wn = (const char *)W + (gated + 1) * (wfmt == PXL_BF16P   ? n0 * K * 2
                                                     : wfmt == PXL_F32P ? n0 * K * 4
                                                                        : n0 * pxl_row_bytes(wfmt, K));
    if (sums_are_y(dt, odt, bias, gated, yr)) {
        compute(ks, wfmt, packed_q, T, cols, K, x, Wn, (float *)y + j0, ldy, NULL);
        return;
    }
    /* bias or bf16 output: this thread's columns in fp32, then added and rounded once */
    size_t es = dt == PXL_F32 ? 4 : 2, oes = odt == PXL_F32 && !yr ? 4 : 2;
    /* A decode step's logits (T x vocabulary fp32: megabytes) are read only after the whole
     * lm_head has streamed its weights through the caches, so they are written around them: no
     * read for ownership of every line, no eviction of the weights still to come. */
    const int stream = odt == PXL_F32 && dt != PXL_F32 && (double)T * ldy * 4 >= STREAM_MIN_BYTES;
    out_spec o = {dt, odt, gated, bias ? (const char *)bias + n0 * es : NULL, (char *)y + j0 * oes, ldy, stream,
                  ks->silu_bf16, yr};
    const int fused = wfmt == PXL_BF16P || wfmt == PXL_F32P || packed_q;
    /* fused: one call's rows (run_packed) */
    float *yp = pxl_scratch(1, (fused ? PXL_AMX_RM * (size_t)PXL_PANEL : T * cols) * 4);
    compute(ks, wfmt, packed_q, T, cols, K, x, Wn, yp, cols, fused ? &o : NULL);
    if (!fused) pxl_store_rows(&o, 0, 0, T, cols, yp, cols);
#ifdef __x86_64__
    if (stream) _mm_sfence(); /* (the streamed lines are weakly ordered: visible before the barrier) */
#endif
}

/* the parts of one Linear's output: columns [0, n[0]) to y[0], the next n[1] to y[1], ... (each
 * its own (T, n[i]) array); one part for a plain Linear */
typedef struct {
    int count;
    const size_t *n;
    void *const *y;
} out_parts;

/* columns [n0, n1) of the whole output, a part at a time (parts start on a panel or block:
 * pxl_linear_parts) */
static void span(const pxl_kernel_set *ks, int dt, int odt, int gated, int yr, int wfmt, int packed_q, size_t T,
                 size_t K, const x_ready *x, const void *W, const void *bias, out_parts parts, size_t n0, size_t n1) {
    for (size_t i = 0, base = 0; i < (size_t)parts.count; base += parts.n[i++]) {
        size_t c0 = n0 > base ? n0 : base, c1 = n1 < base + parts.n[i] ? n1 : base + parts.n[i];
        if (c0 < c1)
            columns(ks, dt, odt, gated, yr, wfmt, packed_q, T, K, x, W, bias, c0, c1 - c0, parts.y[i], c0 - base,
                    yr ? PXL_LDXR(parts.n[i]) : parts.n[i]);
    }
}

static void linear_team(const pxl_kernel_set *ks, int dt, int odt, int gated, int wfmt, size_t T, size_t N,
                        size_t K, const void *x, const void *W, const void *bias, out_parts parts) {
    /* PXL_XR / PXL_YR: x, or the gated y, as bf16 rows PXL_LDXR apart (pxl_abi.h), which only
     * fp32 activations on packed bf16 weights take (the plan sets them so) */
    const int xr = dt & PXL_XR, yr = dt & PXL_YR;
    dt = PXL_DT(dt), odt = PXL_DT(odt);
    if ((xr || yr) && !(dt == PXL_F32 && wfmt == PXL_BF16P && (!yr || gated))) { /* a caller's bug */
        fprintf(stderr, "linear: bf16 rows (dt flags %#x) need fp32 activations on PXL_BF16P weights%s, got dt %d "
                "and weights %d\n", xr | yr, yr ? " and a gated y" : "", dt, wfmt);
        abort();
    }
    const int bf16_w = wfmt == PXL_BF16 || wfmt == PXL_BF16P, kq = PXL_IS_KQUANT(wfmt);
    const int quant = PXL_IS_QUANT(wfmt) || kq, repacked = wfmt >= PXL_Q8_0R && wfmt <= PXL_Q4_1R;
    /* quantised weights: int8 dot products for decode-sized T (and every T when batch
     * invariant, so a row's result never depends on the batch), dequantised panels else.
     * Repacked blocks always: their kernel shares each weight load among PXL_QR_T tokens and
     * needs no dequantised copy, which beats dequantised fp32 / bf16 GEMM at every T, except
     * on sets whose bf16 GEMM outruns their int8 dot products (qr_bf16p_prefill, AMX): there a
     * prefill dequantises the blocks into bf16 panels and rounds x to bf16, whatever dt is.
     * PXL_QX_BF16 takes bf16 x at every T: the blocks times x directly for decode-sized T (and
     * every T when batch invariant), those panels from PXL_QR_PANEL_MIN_T tokens;
     * PXL_QX_INT16_DECODE those panels from that many tokens on every set with them; PXL_QX_INT8
     * never. K-quants: pxl_qk_dot (a multi-token kernel beats dequantising up to a few hundred
     * tokens), except that a prefill takes the panels as one on the 32-blocks does (and under
     * PXL_QX_BF16 from that many tokens: they have no bf16 decode kernel): repacked blocks
     * straight into the panel, those kept in GGUF's layout (Q5_K) through fp32 rows. */
    const int mode = pxl_quant_x(), qx = (repacked || kq) && ks->qr_bf16p ? mode : PXL_QX_INT8;
    const int prefill = T >= PXL_QR_PANEL_MIN_T && !pxl_batch_invariant();
    const int qr_bf16x = !kq && qx == PXL_QX_BF16 && ks->gemv_qr_bf16 && !prefill;
    const int qr_panels = !qr_bf16x && (qx == PXL_QX_BF16 ? !kq || prefill
                                                          : prefill && (qx == PXL_QX_INT16_DECODE ||
                                                                        (qx == PXL_QX_AUTO && ks->qr_bf16p_prefill)));
    const int qdot = kq ? !qr_panels && pxl_qk_dot(ks, dt, wfmt, T)
                        : quant && (repacked ? !qr_panels && !qr_bf16x : T <= PXL_Q_DOT_MAX_T || pxl_batch_invariant());
    /* prefill on quantised weights with bf16 x: packed bf16 panels where the set has the kernel */
    const int packed_q =
        quant && !qdot && ks->gemm_bf16p && (qr_panels || (dt == PXL_BF16 && T >= PXL_PACKED_Q_MIN_T));
    /* The packed kernels read the same K step of up to PXL_PANEL_RM rows at once: rows a multiple
     * of 4 KiB apart (K = 2048 or 8192) would all fall in one L1 set and evict each other every
     * few steps. So the rows they read lie an odd number of cache lines apart: converted rows
     * are written so, and fp32 rows a multiple of 8 lines apart (12 rows in at most 8 of the 64
     * sets) are copied so. */
    const int packed = wfmt == PXL_BF16P || wfmt == PXL_F32P;
    const int restride = wfmt == PXL_F32P && dt == PXL_F32 && T > 1 && K * 4 % 512 == 0;
    const int xbf16 = bf16_w || packed_q || qr_bf16x; /* the kernels take x in bf16 */
    const int convert = !xr && ((xbf16 ? dt == PXL_F32 : dt == PXL_BF16) || restride);
    /* PXL_QX_INT16(_DECODE): where int8 dot products run (Q8_K ones too), x as two int8 planes */
    const int planes = PXL_QX_IS_16(mode) && qdot ? 2 : 1;
    const size_t xes = xbf16 ? 2 : 4,
                 qbytes = planes * (kq ? T * pxl_q8k_bytes(K) : T * K + 3 * T * (K / PXL_QK) * 4);
    const size_t ldx = xr || (convert && (packed || packed_q)) ? ((K * xes + 63) / 64 | 1) * 64 / xes : K;
    void *xc = NULL;
    int8_t *qbuf = NULL;
    float *sx = NULL; /* (qr_bf16x: the blocks' sums of x, in qbuf's slot) */
    const size_t sxbytes = T * (K / PXL_QK) * 4;
    if ((convert || qdot || qr_bf16x) && T <= PXL_T_PRIVATE) { /* decode: every thread prepares x for itself */
        xc = convert ? pxl_scratch(0, T * ldx * xes) : NULL;
        qbuf = qdot ? pxl_scratch(2, qbytes) : NULL;
        sx = qr_bf16x ? pxl_scratch(2, sxbytes) : NULL;
        prepare_rows(dt, wfmt, xbf16, T, 0, T, K, x, xc, ldx, qbuf, planes, sx);
    } else if (convert || qdot || qr_bf16x) { /* prefill: the team prepares shared rows, then waits for all */
#pragma omp single copyprivate(xc, qbuf, sx)
        {
            xc = convert ? pxl_scratch(0, T * ldx * xes) : NULL;
            qbuf = qdot ? pxl_scratch(2, qbytes) : NULL;
            sx = qr_bf16x ? pxl_scratch(2, sxbytes) : NULL;
        }
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        prepare_rows(dt, wfmt, xbf16, T, t0, t1, K, x, xc, ldx, qbuf, planes, sx);
#pragma omp barrier
    }
    const void *xk = xc ? xc : x;

    /* The columns in chunks of whole panels (or blocks). For a decode-sized T (or a Linear too
     * small for more than a chunk a thread) each thread takes a fixed share, whose panels
     * prefetch the next in one chain (the weights stream from DRAM). So does a batched decode
     * that a bf16 panel takes in one call (AMX: up to 32 tokens): it streams its weights too,
     * and each chunk taken in turn would start on a panel nothing prefetched. Larger T compute
     * longer per panel: there the chunks are taken in turn, so a thread whose vCPU runs slow for
     * a while takes fewer, where fixed shares would leave the other waiting at the op's end. A
     * column's sums do not depend on which thread makes them. */
    const size_t unit = gated ? PXL_PANEL / 2 : packed || packed_q ? PXL_PANEL : PXL_QR_ROWS;
    const size_t units = (N + unit - 1) / unit, share = (units + PXL_NTH() - 1) / PXL_NTH();
    /* LINEAR_CHUNKS a thread, each at least CHUNK_MIN_FLOP: taking a chunk (an atomic on a line
     * the threads share) and its first panel, which nothing prefetched, cost little beside it */
    size_t per = units / (LINEAR_CHUNKS * PXL_NTH());
    const size_t least = (size_t)(CHUNK_MIN_FLOP / (2.0 * T * K * (gated ? 2 : 1) * unit)) + 1;
    per = per > least ? per : least;
    const x_ready xp = {xk, ldx, qbuf, planes, sx};
    const int one_call = wfmt == PXL_BF16P && ks->bf16p_rm && T <= (size_t)ks->bf16p_rm; /* a call a panel */
    if (T <= PXL_T_PRIVATE || per >= share || one_call) {
        size_t n0, n1;
        pxl_split(N, unit, &n0, &n1);
        span(ks, dt, odt, gated, yr, wfmt, packed_q, T, K, &xp, W, bias, parts, n0, n1);
        return;
    }
    const size_t chunk = per * unit, nchunks = (N + chunk - 1) / chunk;
    if (wfmt == PXL_BF16P && sums_are_y(dt, odt, bias, gated, yr) && parts.count == 1 &&
        pxl_packed_kblocks(ks, T, N, K)) {
        /* A long K's blocks (pxl_linear.h) in turn, each block's column chunks taken in turn: a
         * chunk per pass over all of K would read the whole x from L3 again for a few panels */
        for (size_t t0 = 0; t0 < T; t0 += PXL_T_CHUNK)
            for (size_t k0 = 0; k0 < K; k0 += PXL_KC) {
#pragma omp for schedule(dynamic, 1)
                for (size_t c = 0; c < nchunks; c++)
                    pxl_run_packed_kblock(ks, T, K, t0, k0, c * chunk, (c + 1) * chunk < N ? (c + 1) * chunk : N, xk,
                                          ldx, W, parts.y[0], N);
            }
        return;
    }
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t c = 0; c < nchunks; c++)
        span(ks, dt, odt, gated, yr, wfmt, packed_q, T, K, &xp, W, bias, parts, c * chunk,
             (c + 1) * chunk < N ? (c + 1) * chunk : N);
}

void pxl_linear_to(int dt, int odt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W,
                   const void *bias, void *y) {
    const pxl_kernel_set *ks = pxl_kernels();
    int nth = (double)T * N * K < 32768 ? 1 : pxl_num_threads(); /* tiny: not worth waking threads */
    if (PXL_DT(dt) == PXL_F32) odt = PXL_F32; /* (no narrowing store) */
    out_parts one = {1, &N, &y};
    PXL_ON_TEAM(nth, linear_team(ks, dt, odt, 0, wfmt, T, N, K, x, W, bias, one));
}

void pxl_linear_parts(int dt, int wfmt, size_t T, size_t K, int count, const size_t *n, const void *x, const void *W,
                      const void *bias, void *const *y) {
    size_t N = 0;
    for (int i = 0; i < count; i++) {
        if (n[i] % PXL_PANEL) { /* a caller's bug: a part would start inside a panel or block */
            fprintf(stderr, "pxl_linear_parts: part %d has %zu features, not a multiple of %d\n", i, n[i], PXL_PANEL);
            abort();
        }
        N += n[i];
    }
    const pxl_kernel_set *ks = pxl_kernels();
    int nth = (double)T * N * K < 32768 ? 1 : pxl_num_threads();
    out_parts parts = {count, n, y};
    PXL_ON_TEAM(nth, linear_team(ks, dt, dt, 0, wfmt, T, N, K, x, W, bias, parts));
}

void pxl_linear_silu(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *Wgu, void *y) {
    if (wfmt != PXL_BF16P && wfmt != PXL_F32P) { /* a caller's bug: no other layout alternates panels */
        fprintf(stderr, "pxl_linear_silu: weights must be packed panels (PXL_BF16P / PXL_F32P), got %d\n", wfmt);
        abort();
    }
    const pxl_kernel_set *ks = pxl_kernels();
    int nth = 2.0 * T * N * K < 32768 ? 1 : pxl_num_threads();
    out_parts one = {1, &N, &y};
    PXL_ON_TEAM(nth, linear_team(ks, dt, dt, 1, wfmt, T, N, K, x, Wgu, NULL, one));
}

void pxl_linear(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W, const void *bias,
                void *y) {
    pxl_linear_to(dt, dt, wfmt, T, N, K, x, W, bias, y);
}
