/* Linear: y (T, N) = x (T, K) @ W (N, K)^T + b, for every weight format.
 *
 * Threads split N (each reads its own weight rows once: decode is bandwidth-bound).
 * T == 1 runs GEMV tiles; T > 1 walks T in chunks that stay in L2 and tiles each chunk
 * against the weight rows; dense weights a set packs run its packed micro-kernel at every T.
 * Quantised weights run int8 dot products on the blocks (x quantised per 32-block, as
 * llama.cpp does): blocks repacked 16 rows at a time at every T, GGUF-layout blocks for small
 * T, while for larger T those are dequantised a panel at a time into L1/L2 and reused by
 * every token tile. GGUF K-quants (Q4_K / Q5_K / Q6_K) take the GGUF-layout path with x
 * quantised per 256 (Q8_K, pxl_kquants.h). Our own GEMM rather than OpenBLAS's sgemm, which is slower on these
 * shapes (`perfxlm bench gemv` runs both side by side).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "pxl_kquants.h"
#ifdef __x86_64__
#include <xmmintrin.h>
#endif

/* (the token counts that pick a path: PXL_T_PRIVATE in pxl_abi.h, PXL_Q_DOT_MAX_T and
 * PXL_PACKED_Q_MIN_T in pxl_kernels.h) */
#define T_CHUNK 64   /* tokens per pass over the weights: 64 x K floats stay in L2 */
#define PANEL 16     /* quantised rows dequantised at a time */
#define STREAM_MIN_BYTES (4 << 20) /* a widened output at least this big is stored non-temporally */
#define PACKED_T_CHUNK (4 * T_CHUNK) /* tokens per pass over the packed panels */
#define PXL_KC 2048                  /* K per block of a longer K (run_packed_kblocks): a chunk's x block is 1 MB */
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

size_t pxl_packed_bytes(int wfmt, size_t N, size_t K) {
    const pxl_kernel_set *ks = pxl_kernels();
    if (wfmt == PXL_Q4_K || wfmt == PXL_Q6_K)
        return pxl_gemm_kr_for(ks) && K % PXL_QK_K == 0 && K / PXL_QK_K <= PXL_QK_K_MAX_BLOCKS
                   ? (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * PXL_QR_ROWS *
                         pxl_row_bytes(wfmt == PXL_Q4_K ? PXL_Q4_KR : PXL_Q6_KR, K)
                   : 0;
    if (wfmt >= PXL_Q8_0 && wfmt <= PXL_Q4_1)
        return ks->gemv_qr[wfmt] && K % PXL_QK == 0
                   ? (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * PXL_QR_ROWS * pxl_row_bytes(wfmt, K)
                   : 0;
    if (wfmt == PXL_F32 && ks->gemm_f32p) return (N + PXL_PANEL - 1) / PXL_PANEL * K * PXL_PANEL * 4;
    if (wfmt != PXL_BF16 || K % 2 || !ks->gemm_bf16p) return 0;
    return (N + PXL_PANEL - 1) / PXL_PANEL * K * PXL_PANEL * 2;
}

/* one panel: rows [0, rows) of src (rows, K) in fp32 or bf16 -> [K/2][32][2] bf16, zero-padded */
static void pack_panel(int src_fmt, size_t rows, size_t K, const void *src, uint16_t *out) {
    for (size_t p = 0; p < K / 2; p++)
        for (size_t j = 0; j < PXL_PANEL; j++)
            for (size_t h = 0; h < 2; h++) {
                uint16_t v = 0;
                if (j < rows)
                    v = src_fmt == PXL_BF16 ? ((const uint16_t *)src)[j * K + 2 * p + h]
                                            : pxl_f32_to_bf16(((const float *)src)[j * K + 2 * p + h]);
                out[(p * PXL_PANEL + j) * 2 + h] = v;
            }
}

/* fp32 rows [0, rows) of src (rows, K) -> [K][32] fp32, zero-padded */
static void pack_panel_f32(size_t rows, size_t K, const float *src, float *out) {
    for (size_t k = 0; k < K; k++)
        for (size_t j = 0; j < PXL_PANEL; j++) out[k * PXL_PANEL + j] = j < rows ? src[j * K + k] : 0.0f;
}

void pxl_pack_weights(int wfmt, size_t N, size_t K, const void *W, void *out) {
    if (wfmt == PXL_Q4_K || wfmt == PXL_Q6_K) {
        pxl_repack_qk(wfmt, N, K, W, out);
        return;
    }
    if (wfmt >= PXL_Q8_0 && wfmt <= PXL_Q4_1) {
        pxl_repack_q(wfmt, N, K, W, out);
        return;
    }
    if (wfmt == PXL_F32) {
        for (size_t n = 0; n < N; n += PXL_PANEL)
            pack_panel_f32(N - n < PXL_PANEL ? N - n : PXL_PANEL, K, (const float *)W + n * K, (float *)out + n * K);
        return;
    }
    for (size_t n = 0; n < N; n += PXL_PANEL)
        pack_panel(wfmt, N - n < PXL_PANEL ? N - n : PXL_PANEL, K, (const uint16_t *)W + n * K,
                   (uint16_t *)out + n * K);
}

/* panel j: features 0-15 are gate rows 16j .. 16j + 15, features 16-31 the same rows of up, so
 * one call's accumulators hold both factors of 16 outputs (the tail's missing rows are zeros) */
void pxl_pack_gated(int wfmt, size_t N, size_t K, const void *Wg, const void *Wu, void *out) {
    size_t es = wfmt == PXL_F32 ? 4 : 2, half = PXL_PANEL / 2, slot = (size_t)PXL_PANEL * K * es;
    for (size_t n = 0; n < N; n += half) {
        size_t rows = N - n < half ? N - n : half;
        char *dst = (char *)out + n / half * slot;
        memset(dst, 0, slot);
        for (int h = 0; h < 2; h++) { /* features h * 16 + j <- row n + j of gate (h = 0) or up */
            const char *src = (const char *)(h ? Wu : Wg) + n * K * es;
            for (size_t j = 0; j < rows; j++)
                for (size_t k = 0; k < K; k++) {
                    size_t f = h * half + j;
                    if (wfmt == PXL_F32)
                        ((float *)dst)[k * PXL_PANEL + f] = ((const float *)src)[j * K + k];
                    else /* [K/2][32][2] */
                        ((uint16_t *)dst)[(k / 2 * PXL_PANEL + f) * 2 + k % 2] = ((const uint16_t *)src)[j * K + k];
                }
        }
    }
}

/* Where fp32 results go when they are not y itself: bias added, then rounded once to dt and
 * stored as odt (dt's values, widened when odt is PXL_F32). y and bias start at the thread's
 * first column. */
typedef struct {
    int dt, odt;
    int gated; /* panels of 16 gate and 16 up features: y = silu(gate) * up (pxl_linear_silu) */
    const void *bias;
    void *y;
    size_t ldy;
    int stream; /* non-temporal stores (x86): y is too big to be in a cache when it is read */
    pxl_silu_bf16_fn silu_bf16; /* the kernel set's gated epilogue in bf16 (NULL: the loop below) */
} out_spec;

/* rows x cols of fp32 src (lds) -> out at (r0, c0): a loop per case, so each clone vectorises
 * it (the team code around it is built for the baseline ISA, where it would run as scalar SSE2) */
PXL_CLONES static void store_rows(const out_spec *o, size_t r0, size_t c0, size_t rows, size_t cols, const float *src,
                                  size_t lds) {
    for (size_t r = 0; r < rows; r++) {
        const float *a = src + r * lds;
        if (o->dt == PXL_F32) {
            float *y = (float *)o->y + (r0 + r) * o->ldy + c0;
            const float *b = o->bias ? (const float *)o->bias + c0 : NULL;
            if (b) for (size_t j = 0; j < cols; j++) y[j] = a[j] + b[j];
            else memcpy(y, a, cols * 4);
        } else if (o->odt == PXL_F32) { /* bf16 values, stored widened */
            float *y = (float *)o->y + (r0 + r) * o->ldy + c0;
            const uint16_t *b = o->bias ? (const uint16_t *)o->bias + c0 : NULL;
#ifdef __x86_64__
            if (o->stream && !b && cols == PXL_PANEL && (uintptr_t)y % 64 == 0) { /* whole lines, around the caches */
                float t[PXL_PANEL];
                for (size_t j = 0; j < PXL_PANEL; j++) t[j] = pxl_round_bf16(a[j]);
                for (size_t j = 0; j < PXL_PANEL; j += 4) _mm_stream_ps(y + j, _mm_loadu_ps(t + j));
                continue;
            }
#endif
            if (b) for (size_t j = 0; j < cols; j++) y[j] = pxl_round_bf16(a[j] + pxl_bf16_to_f32(b[j]));
            else for (size_t j = 0; j < cols; j++) y[j] = pxl_round_bf16(a[j]);
        } else {
            uint16_t *y = (uint16_t *)o->y + (r0 + r) * o->ldy + c0;
            const uint16_t *b = o->bias ? (const uint16_t *)o->bias + c0 : NULL;
            if (b) for (size_t j = 0; j < cols; j++) y[j] = pxl_f32_to_bf16(a[j] + pxl_bf16_to_f32(b[j]));
            else for (size_t j = 0; j < cols; j++) y[j] = pxl_f32_to_bf16(a[j]);
        }
    }
}

/* rows x cols of silu(g) * u from fp32 tiles g and u (lds) -> out at (r0, c0), each of g and u
 * rounded to dt first, as two Linears' outputs would be */
PXL_CLONES static void store_gated(const out_spec *o, size_t r0, size_t c0, size_t rows, size_t cols, const float *g,
                                   const float *u, size_t lds) {
    for (size_t r = 0; r < rows; r++) {
        const float *a = g + r * lds, *b = u + r * lds;
        if (o->dt == PXL_F32) {
            float *y = (float *)o->y + (r0 + r) * o->ldy + c0;
            for (size_t j = 0; j < cols; j++) y[j] = pxl_silu_mul1(a[j], b[j]);
        } else if (o->silu_bf16) {
            o->silu_bf16(cols, a, b, (uint16_t *)o->y + (r0 + r) * o->ldy + c0);
        } else {
            uint16_t *y = (uint16_t *)o->y + (r0 + r) * o->ldy + c0;
            for (size_t j = 0; j < cols; j++)
                y[j] = pxl_f32_to_bf16(pxl_silu_mul1(pxl_round_bf16(a[j]), pxl_round_bf16(b[j])));
        }
    }
}

/* Y (T, cols) = X (T, K) . packed panels, bf16 (PXL_BF16P) or fp32 (f32: PXL_F32P); T walks
 * in chunks that stay in L2 while a panel (32 x K: L1-sized in bf16, L2 in fp32) serves every
 * token of the chunk. With `out`, each call's rows go to out as soon as the call is done: the
 * kernel set rounds and stores them itself where it can (bf16 out, or the gated SiLU-mul),
 * else they pass through Y, a scratch tile of one call's rows x PXL_PANEL columns, while it is
 * in L1: no T x cols fp32 copy of the result (6 MB for the lm_head of a 64-token decode step)
 * goes through memory. Gated, a panel makes 16 columns of out. */
/* run_packed's bf16 fp32-out case for K over PXL_KC, on sets with an accumulating kernel: a
 * chunk's x rows (4 MB at K = 8192) no longer stay in L2 while every panel passes, and each panel
 * would read them again from L3. So K runs in blocks: a block of the chunk's x (1 MB) stays in
 * L2 for all the panels, and the sums wait in Y from block to block (fp32, so exactly: the bits
 * of one pass). Whole panels only (cols a multiple of PXL_PANEL), and prefill-sized T. */
static void run_packed_kblocks(const pxl_kernel_set *ks, size_t T, size_t cols, size_t K, const uint16_t *X,
                               size_t ldx, const uint16_t *Wp, float *Y, size_t ldy) {
    const size_t rmax = (size_t)ks->bf16p_rm;
    for (size_t t0 = 0; t0 < T; t0 += PACKED_T_CHUNK) {
        size_t t1 = t0 + PACKED_T_CHUNK < T ? t0 + PACKED_T_CHUNK : T;
        size_t calls = (t1 - t0 + rmax - 1) / rmax, base = (t1 - t0) / calls, extra = (t1 - t0) % calls;
        for (size_t k0 = 0; k0 < K; k0 += PXL_KC) {
            size_t kc = K - k0 < PXL_KC ? K - k0 : PXL_KC;
            for (size_t n = 0; n < cols; n += PXL_PANEL) { /* a panel's K rows k0 .. : [K/2][32][2] */
                const uint16_t *w = Wp + n * K + k0 * PXL_PANEL;
                for (size_t c = 0, t = t0; c < calls; c++) {
                    int rm = (int)(base + (c < extra));
                    ks->gemm_bf16p_acc(rm, kc, X + t * ldx + k0, ldx, w, Y + t * ldy + n, ldy, k0 > 0);
                    t += rm;
                }
            }
        }
    }
}

static void run_packed(const pxl_kernel_set *ks, int f32, size_t T, size_t cols, size_t K, const void *X,
                       size_t ldx, const void *Wp, float *Y, size_t ldy, const out_spec *out, size_t c0) {
    if (!f32 && !out && ks->gemm_bf16p_acc && ks->bf16p_rm && K > PXL_KC && K % 32 == 0 && cols % PXL_PANEL == 0 &&
        T >= (size_t)ks->bf16p_rm) {
        run_packed_kblocks(ks, T, cols, K, X, ldx, Wp, Y, ldy);
        return;
    }
    size_t es = f32 ? 4 : 2;
    /* weights packed under another kernel set (pxl_set_isa since): the portable kernels */
    pxl_gemm_p_fn gemm = f32 ? (ks->gemm_f32p ? ks->gemm_f32p : pxl_gemm_f32p_generic)
                             : (ks->gemm_bf16p ? ks->gemm_bf16p : pxl_gemm_bf16p_generic);
    const int gated = out && out->gated;
    /* bf16 out, no bias: the set's own rounding store (a separate kernel for the gated product) */
    pxl_gemm_p_bf16_fn direct = NULL;
    if (!f32 && out && !out->bias && out->dt == PXL_BF16 && out->odt == PXL_BF16 && ks->gemm_bf16p)
        direct = gated ? ks->gemm_bf16p_silu : ks->gemm_bf16p_bf16;
    /* the logits: bf16 values widened, whole lines around the caches (n and c0 are multiples of
     * PXL_PANEL, so a full panel's rows start on a line when y and ldy allow) */
    pxl_gemm_p_fn wide = !f32 && out && !out->bias && out->stream && out->dt == PXL_BF16 && out->odt == PXL_F32 &&
                                 ks->gemm_bf16p && (uintptr_t)out->y % 64 == 0 && out->ldy % 16 == 0
                             ? ks->gemm_bf16p_wide_nt
                             : NULL;
    const size_t width = gated ? PXL_PANEL / 2 : PXL_PANEL; /* out columns a panel makes */
    const size_t rmax = !f32 && ks->gemm_bf16p && ks->bf16p_rm ? (size_t)ks->bf16p_rm : PXL_PANEL_RM; /* rows a call */
    const size_t lines = K * PXL_PANEL * es / 64;           /* cache lines of a panel */
    for (size_t t0 = 0; t0 < T; t0 += PACKED_T_CHUNK) {
        size_t t1 = t0 + PACKED_T_CHUNK < T ? t0 + PACKED_T_CHUNK : T;
        /* the chunk in calls of near-equal size (64 tokens: 11, 11, 11, 11, 10, 10, not 12 x 5 + 4):
         * a call with few tokens has too few accumulators to hide the FMA latency */
        size_t calls = (t1 - t0 + rmax - 1) / rmax, base = (t1 - t0) / calls, extra = (t1 - t0) % calls;
        const size_t npanels = (cols + width - 1) / width;
        for (size_t s = 0; s < npanels; s++) { /* panels in memory order */
            size_t n = s * width;
            int nvalid = cols - n < width ? (int)(cols - n) : (int)width;
            const char *w = (const char *)Wp + s * PXL_PANEL * K * es;
            /* the next panel comes from DRAM in a decode step, and the hardware prefetchers only
             * follow demand misses: the calls after a panel's first run from L1 and leave the
             * memory idle, so each call prefetches its share of the next panel's lines */
            const char *next = s + 1 < npanels ? w + PXL_PANEL * K * es : NULL;
            for (size_t c = 0, t = t0; c < calls; c++) {
                int rm = (int)(base + (c < extra));
                /* the next chunk's x rows, a share a call: a prefill's x (megabytes, the op before's
                 * output) comes from L3 or DRAM, and each chunk's first panel would wait on it
                 * (prefetcht0, the default hint: prefetcht1 / t2 do not bring these lines in) */
                if (t1 < T) {
                    size_t xl = ((T - t1 < PACKED_T_CHUNK ? T - t1 : PACKED_T_CHUNK) * ldx * es + 63) / 64;
                    size_t G = npanels * calls, g = s * calls + c;
                    const char *xn = (const char *)X + t1 * ldx * es;
                    for (size_t l = xl * g / G; l < xl * (g + 1) / G; l++) __builtin_prefetch(xn + l * 64);
                }
                size_t l0 = next ? lines * c / calls : 0, l1 = next ? lines * (c + 1) / calls : 0;
                const char *pf = next ? next + l0 * 64 : NULL;
                const char *x = (const char *)X + t * ldx * es;
                if (wide && nvalid == PXL_PANEL) {
                    wide(rm, K, x, ldx, w, (float *)out->y + t * out->ldy + c0 + n, out->ldy, nvalid, pf, l1 - l0);
                } else if (direct) {
                    direct(rm, K, x, ldx, w, (uint16_t *)out->y + t * out->ldy + c0 + n, out->ldy, nvalid, pf, l1 - l0);
                } else if (!out) {
                    gemm(rm, K, x, ldx, w, Y + t * ldy + n, ldy, nvalid, pf, l1 - l0);
                } else { /* through the tile, one call's rows while they are in L1 (a whole chunk's
                          * tile, stored at the panel's end, would leave L1 first) */
                    gemm(rm, K, x, ldx, w, Y, PXL_PANEL, gated ? PXL_PANEL : nvalid, pf, l1 - l0);
                    if (gated) store_gated(out, t, c0 + n, rm, nvalid, Y, Y + PXL_PANEL / 2, PXL_PANEL);
                    else store_rows(out, t, c0 + n, rm, nvalid, Y, PXL_PANEL);
                }
                t += rm;
            }
        }
    }
}

/* columns [0, cols) of y = x @ W^T where W starts at this thread's first row: into Y, or for
 * the packed paths with `out`, through a one-panel tile Y into out */
static void compute(const pxl_kernel_set *ks, int wfmt, int packed_q, size_t T, size_t cols, size_t K,
                    const void *xk, size_t ldx, const int8_t *qbuf, int planes, const float *sx, const char *W,
                    float *Y, size_t ldy, const out_spec *out) {
    if (sx) { /* bf16 x on repacked blocks, weights exact: up to PXL_QR_T tokens share each load */
        size_t nb = K / PXL_QK, step = T <= PXL_QR_T ? cols : 4 * PANEL;
        for (size_t n = 0; n < cols; n += step)
            for (size_t t0 = 0; t0 < T; t0 += PXL_QR_T) {
                size_t tn = T - t0 < PXL_QR_T ? T - t0 : PXL_QR_T, rows = cols - n < step ? cols - n : step;
                ks->gemv_qr_bf16(wfmt, tn, rows, K, W + n * pxl_row_bytes(wfmt, K), (const uint16_t *)xk + t0 * ldx,
                                 ldx, sx + t0 * nb, Y + t0 * ldy + n, ldy);
            }
    } else if (wfmt == PXL_BF16P || wfmt == PXL_F32P) {
        run_packed(ks, wfmt == PXL_F32P, T, cols, K, xk, ldx, W, Y, ldy, out, 0);
    } else if (wfmt <= PXL_BF16) {
        run_tiles(ks, wfmt == PXL_F32 ? ks->tile_f32 : ks->tile_bf16, wfmt == PXL_F32 ? 4 : 2, T, 0, cols, K, xk, W,
                  Y, ldy);
    } else if (qbuf && PXL_IS_KQUANT(wfmt) && (wfmt == PXL_Q4_KR || wfmt == PXL_Q6_KR || pxl_gemm_qk_for(ks, wfmt))) {
        /* up to PXL_QK_T rows of Q8_K x share each weight load (planes = 2: a token's two planes
         * are neighbouring rows, their results summed from yp, (PXL_QK_T, cols)) */
        size_t tq = PXL_QK_T / planes, step = T <= tq ? cols : 4 * PANEL;
        const int kr = wfmt == PXL_Q4_KR || wfmt == PXL_Q6_KR;
        pxl_gemm_kr_fn gkr = kr ? pxl_gemm_kr_for(ks) : NULL;
        pxl_gemm_qk_fn gqk = kr ? NULL : pxl_gemm_qk_for(ks, wfmt);
        float *yp = planes == 2 ? pxl_scratch(3, PXL_QK_T * cols * 4) : NULL;
        pxl_q8k xs[PXL_QK_T];
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
        pxl_gemv_qr_fn qr = ks->gemv_qr[PXL_QBASE(wfmt)];
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
        const int direct = wfmt >= PXL_Q8_0R && wfmt <= PXL_Q4_1R && ks->qr_bf16p; /* no fp32 rows between */
        float *rows = pxl_scratch(3, (size_t)PXL_PANEL * K * 4 + (size_t)PXL_PANEL * K * 2);
        uint16_t *panel = (uint16_t *)(rows + PXL_PANEL * K);
        for (size_t n = 0; n < cols; n += PXL_PANEL) {
            size_t r = cols - n < PXL_PANEL ? cols - n : PXL_PANEL;
            if (direct) {
                ks->qr_bf16p(wfmt, W, n, r, K, panel);
            } else {
                pxl_dequant_rows(wfmt, W, n, r, K, rows);
                pack_panel(PXL_F32, r, K, rows, panel);
            }
            run_packed(ks, 0, T, r, K, xk, ldx, panel, out ? Y : Y + n, ldy, out, n);
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

static void linear_team(const pxl_kernel_set *ks, int dt, int odt, int gated, int wfmt, size_t T, size_t N,
                        size_t K, const void *x, const void *W, const void *bias, void *y) {
    const int bf16_w = wfmt == PXL_BF16 || wfmt == PXL_BF16P, kq = PXL_IS_KQUANT(wfmt);
    const int quant = PXL_IS_QUANT(wfmt) || kq, repacked = wfmt >= PXL_Q8_0R && wfmt <= PXL_Q4_1R;
    /* quantised weights: int8 dot products for decode-sized T (and every T when batch
     * invariant, so a row's result never depends on the batch), dequantised panels else.
     * Repacked blocks always: their kernel shares each weight load among PXL_QR_T tokens and
     * needs no dequantised copy, which beats dequantised fp32 / bf16 GEMM at every T, except
     * on sets whose bf16 GEMM outruns their int8 dot products (qr_bf16p_prefill, AMX): there a
     * prefill dequantises the blocks into bf16 panels and rounds x to bf16, whatever dt is.
     * PXL_QX_BF16 takes bf16 x at every T: the blocks times x directly for decode-sized T (and
     * every T when batch invariant), those panels from PXL_QR_PANEL_MIN_T tokens; PXL_QX_INT8
     * never. K-quants: pxl_qk_dot (a multi-token kernel beats dequantising up to a few hundred
     * tokens). */
    const int mode = pxl_quant_x(), qx = repacked && ks->qr_bf16p ? mode : PXL_QX_INT8;
    const int qr_bf16x =
        qx == PXL_QX_BF16 && ks->gemv_qr_bf16 && (T < PXL_QR_PANEL_MIN_T || pxl_batch_invariant());
    const int qr_panels = !qr_bf16x && (qx == PXL_QX_BF16 || (qx == PXL_QX_AUTO && ks->qr_bf16p_prefill &&
                                                              T >= PXL_QR_PANEL_MIN_T && !pxl_batch_invariant()));
    const int qdot = kq ? pxl_qk_dot(ks, dt, wfmt, T)
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
    const int convert = (xbf16 ? dt == PXL_F32 : dt == PXL_BF16) || restride;
    /* PXL_QX_INT16: where int8 dot products run (Q8_K ones too), x as two int8 planes */
    const int planes = mode == PXL_QX_INT16 && qdot ? 2 : 1;
    const size_t xes = xbf16 ? 2 : 4,
                 qbytes = planes * (kq ? T * pxl_q8k_bytes(K) : T * K + 3 * T * (K / PXL_QK) * 4);
    const size_t ldx = convert && (packed || packed_q) ? ((K * xes + 63) / 64 | 1) * 64 / xes : K;
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

    size_t n0, n1;
    pxl_split(N, gated ? PXL_PANEL / 2 : wfmt == PXL_BF16P || wfmt == PXL_F32P || packed_q ? PXL_PANEL : PXL_QR_ROWS,
              &n0, &n1);
    if (n0 >= n1) return;
    size_t cols = n1 - n0;
    const char *Wn = (const char *)W + (gated + 1) * (wfmt == PXL_BF16P   ? n0 * K * 2
                                                     : wfmt == PXL_F32P ? n0 * K * 4
                                                                        : n0 * pxl_row_bytes(wfmt, K));
    if (dt == PXL_F32 && odt == PXL_F32 && !bias && !gated) {
        compute(ks, wfmt, packed_q, T, cols, K, xk, ldx, qbuf, planes, sx, Wn, (float *)y + n0, N, NULL);
        return;
    }
    /* bias or bf16 output: this thread's columns in fp32, then added and rounded once */
    size_t es = dt == PXL_F32 ? 4 : 2, oes = odt == PXL_F32 ? 4 : 2;
    /* A decode step's logits (T x vocabulary fp32: megabytes) are read only after the whole
     * lm_head has streamed its weights through the caches, so they are written around them: no
     * read for ownership of every line, no eviction of the weights still to come. */
    const int stream = odt == PXL_F32 && dt != PXL_F32 && (double)T * N * 4 >= STREAM_MIN_BYTES;
    out_spec o = {dt, odt, gated, bias ? (const char *)bias + n0 * es : NULL, (char *)y + n0 * oes, N, stream,
                  ks->silu_bf16};
    const int fused = wfmt == PXL_BF16P || wfmt == PXL_F32P || packed_q;
    /* fused: one call's rows (run_packed) */
    float *yp = pxl_scratch(1, (fused ? PXL_AMX_RM * (size_t)PXL_PANEL : T * cols) * 4);
    compute(ks, wfmt, packed_q, T, cols, K, xk, ldx, qbuf, planes, sx, Wn, yp, cols, fused ? &o : NULL);
    if (!fused) store_rows(&o, 0, 0, T, cols, yp, cols);
#ifdef __x86_64__
    if (stream) _mm_sfence(); /* (the streamed lines are weakly ordered: visible before the barrier) */
#endif
}

void pxl_linear_to(int dt, int odt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W,
                   const void *bias, void *y) {
    const pxl_kernel_set *ks = pxl_kernels();
    int nth = (double)T * N * K < 32768 ? 1 : pxl_num_threads(); /* tiny: not worth waking threads */
    if (dt == PXL_F32) odt = PXL_F32; /* (no narrowing store) */
    PXL_ON_TEAM(nth, linear_team(ks, dt, odt, 0, wfmt, T, N, K, x, W, bias, y));
}

void pxl_linear_silu(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *Wgu, void *y) {
    if (wfmt != PXL_BF16P && wfmt != PXL_F32P) { /* a caller's bug: no other layout alternates panels */
        fprintf(stderr, "pxl_linear_silu: weights must be packed panels (PXL_BF16P / PXL_F32P), got %d\n", wfmt);
        abort();
    }
    const pxl_kernel_set *ks = pxl_kernels();
    int nth = 2.0 * T * N * K < 32768 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, linear_team(ks, dt, dt, 1, wfmt, T, N, K, x, Wgu, NULL, y));
}

void pxl_linear(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W, const void *bias,
                void *y) {
    pxl_linear_to(dt, dt, wfmt, T, N, K, x, W, bias, y);
}
