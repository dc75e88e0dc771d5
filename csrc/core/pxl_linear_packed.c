/* Linear on packed panels (PXL_BF16P / PXL_F32P, pxl_pack.c): the kernel set's micro-kernel
 * walks T in chunks that stay in L2 against one panel at a time, and each call's rows leave as
 * the output asks (bias, rounding, the gated SiLU-mul, streamed logits). */
#include "pxl_linear.h"
#pragma GCC diagnostic ignored "-Wpsabi" /* vector values in the non-AVX-512 clones: all inlined */
#ifdef __x86_64__
#include <xmmintrin.h>
#endif

/* rows x cols of fp32 src (lds) -> out at (r0, c0): a loop per case, so each clone vectorises
 * it (the team code around it is built for the baseline ISA, where it would run as scalar SSE2) */
PXL_CLONES void pxl_store_rows(const out_spec *o, size_t r0, size_t c0, size_t rows, size_t cols, const float *src,
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

/* one row of cols silu(g) * u from fp32 sums g and u -> out's row r at column c0, each of g
 * and u rounded to dt first, as two Linears' outputs would be */
PXL_INLINE void gated_row(const out_spec *o, size_t r, size_t c0, size_t cols, const float *a, const float *b) {
    if (o->dt == PXL_F32 && o->yr) {
        uint16_t *y = (uint16_t *)o->y + r * o->ldy + c0;
        for (size_t j = 0; j < cols; j++) y[j] = pxl_f32_to_bf16(pxl_silu_mul1(a[j], b[j]));
    } else if (o->dt == PXL_F32) {
        float *y = (float *)o->y + r * o->ldy + c0;
        for (size_t j = 0; j < cols; j++) y[j] = pxl_silu_mul1(a[j], b[j]);
    } else if (o->silu_bf16) {
        o->silu_bf16(cols, a, b, (uint16_t *)o->y + r * o->ldy + c0);
    } else {
        uint16_t *y = (uint16_t *)o->y + r * o->ldy + c0;
        for (size_t j = 0; j < cols; j++)
            y[j] = pxl_f32_to_bf16(pxl_silu_mul1(pxl_round_bf16(a[j]), pxl_round_bf16(b[j])));
    }
}

/* gated_row's fp32 case for a whole gated panel's 16 columns, as one 16-lane vector (one
 * register on AVX-512, where the vectoriser would take two halves and masks): the same bits */
PXL_INLINE void gated_row16_f32(const out_spec *o, size_t r, size_t c0, const float *a, const float *b) {
    f32x16 g, u;
    memcpy(&g, a, sizeof g);
    memcpy(&u, b, sizeof u);
    f32x16 y = pxl_silu_mul16(g, u);
    if (o->yr) {
        pxl_u16x16 h = pxl_f32x16_to_bf16(y);
        memcpy((uint16_t *)o->y + r * o->ldy + c0, &h, sizeof h);
    } else {
        memcpy((float *)o->y + r * o->ldy + c0, &y, sizeof y);
    }
}

/* rows x cols of silu(g) * u from fp32 tiles g and u (lds) -> out at (r0, c0). Whole gated
 * panels (16 columns) pass the width as a constant, so their loops need no masks or remainder */
PXL_CLONES static void store_gated(const out_spec *o, size_t r0, size_t c0, size_t rows, size_t cols, const float *g,
                                   const float *u, size_t lds) {
    for (size_t r = 0; r < rows; r++) {
        const float *a = g + r * lds, *b = u + r * lds;
        if (cols == PXL_PANEL / 2 && o->dt == PXL_F32) gated_row16_f32(o, r0 + r, c0, a, b);
        else if (cols == PXL_PANEL / 2) gated_row(o, r0 + r, c0, PXL_PANEL / 2, a, b);
        else gated_row(o, r0 + r, c0, cols, a, b);
    }
}

/* Whether pxl_run_packed's bf16 fp32-out case for K over PXL_KC applies, on sets with an
 * accumulating kernel: a chunk's x rows (4 MB at K = 8192) no longer stay in L2 while every
 * panel passes, and each panel would read them again from L3. So K runs in blocks: a block of
 * the chunk's x (1 MB) stays in L2 for all the panels, and the sums wait in Y from block to
 * block (fp32, so exactly: the bits of one pass). Whole panels only (cols a multiple of
 * PXL_PANEL), and prefill-sized T. */
int pxl_packed_kblocks(const pxl_kernel_set *ks, size_t T, size_t cols, size_t K) {
    return ks->gemm_bf16p_acc && ks->bf16p_rm && K > PXL_KC && K % 32 == 0 && cols % PXL_PANEL == 0 &&
           T >= (size_t)ks->bf16p_rm;
}

/* one block of pxl_packed_kblocks' loops: the row chunk from t0 (of T rows), the K block from k0,
 * into columns [n0, n1) of Y, added to what the blocks before left there unless k0 is 0 */
void pxl_run_packed_kblock(const pxl_kernel_set *ks, size_t T, size_t K, size_t t0, size_t k0, size_t n0,
                           size_t n1, const uint16_t *X, size_t ldx, const uint16_t *Wp, float *Y, size_t ldy) {
    const size_t rmax = (size_t)ks->bf16p_rm, t1 = t0 + PXL_T_CHUNK < T ? t0 + PXL_T_CHUNK : T,
                 kc = K - k0 < PXL_KC ? K - k0 : PXL_KC;
    size_t calls = (t1 - t0 + rmax - 1) / rmax, base = (t1 - t0) / calls, extra = (t1 - t0) % calls;
    const size_t lines = kc * PXL_PANEL * 2 / 64; /* cache lines of a panel's block */
    for (size_t n = n0; n < n1; n += PXL_PANEL) { /* a panel's K rows k0 .. : [K/2][32][2] */
        const uint16_t *w = Wp + n * K + k0 * PXL_PANEL;
        /* the next panel's block, a share a call, as pxl_run_packed prefetches the next panel */
        const char *next = n + PXL_PANEL < n1 ? (const char *)(w + K * PXL_PANEL) : NULL;
        for (size_t c = 0, t = t0; c < calls; c++) {
            int rm = (int)(base + (c < extra));
            size_t l0 = lines * c / calls, npf = next || calls == 1 ? lines * (c + 1) / calls - l0 : 0;
            ks->gemm_bf16p_acc(rm, kc, X + t * ldx + k0, ldx, w, Y + t * ldy + n, ldy, k0 > 0,
                               next ? next + l0 * 64 : NULL, npf);
            t += rm;
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
void pxl_run_packed(const pxl_kernel_set *ks, int f32, size_t T, size_t cols, size_t K, const void *X,
                    size_t ldx, const void *Wp, float *Y, size_t ldy, const out_spec *out, size_t c0) {
    if (!f32 && !out && pxl_packed_kblocks(ks, T, cols, K)) {
        for (size_t t0 = 0; t0 < T; t0 += PXL_T_CHUNK)
            for (size_t k0 = 0; k0 < K; k0 += PXL_KC)
                pxl_run_packed_kblock(ks, T, K, t0, k0, 0, cols, X, ldx, Wp, Y, ldy);
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
    for (size_t t0 = 0; t0 < T; t0 += PXL_T_CHUNK) {
        size_t t1 = t0 + PXL_T_CHUNK < T ? t0 + PXL_T_CHUNK : T;
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
                    size_t xl = ((T - t1 < PXL_T_CHUNK ? T - t1 : PXL_T_CHUNK) * ldx * es + 63) / 64;
                    size_t G = npanels * calls, g = s * calls + c;
                    const char *xn = (const char *)X + t1 * ldx * es;
                    for (size_t l = xl * g / G; l < xl * (g + 1) / G; l++) __builtin_prefetch(xn + l * 64);
                }
                /* (a panel's only call streams it, prefetching ahead, with or without a next) */
                size_t l0 = lines * c / calls, npf = next || calls == 1 ? lines * (c + 1) / calls - l0 : 0;
                const char *pf = next ? next + l0 * 64 : NULL;
                const char *x = (const char *)X + t * ldx * es;
                if (wide && nvalid == PXL_PANEL) {
                    wide(rm, K, x, ldx, w, (float *)out->y + t * out->ldy + c0 + n, out->ldy, nvalid, pf, npf);
                } else if (direct) {
                    direct(rm, K, x, ldx, w, (uint16_t *)out->y + t * out->ldy + c0 + n, out->ldy, nvalid, pf, npf);
                } else if (!out) {
                    gemm(rm, K, x, ldx, w, Y + t * ldy + n, ldy, nvalid, pf, npf);
                } else { /* through the tile, one call's rows while they are in L1 (a whole chunk's
                          * tile, stored at the panel's end, would leave L1 first) */
                    gemm(rm, K, x, ldx, w, Y, PXL_PANEL, gated ? PXL_PANEL : nvalid, pf, npf);
                    if (gated) store_gated(out, t, c0 + n, rm, nvalid, Y, Y + PXL_PANEL / 2, PXL_PANEL);
                    else pxl_store_rows(out, t, c0 + n, rm, nvalid, Y, PXL_PANEL);
                }
                t += rm;
            }
        }
    }
}
