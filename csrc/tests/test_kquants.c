/* K-quant kernel tests (Q4_K, Q5_K, Q6_K): Linear on every kernel set this CPU can run, decode
 * (int8 products on Q8_K x), prefill (dequantised panels) and batch-invariant, against a double
 * scalar reference that dequantises the blocks by llama.cpp's dequantize_row_q*_K loops,
 * written out here apart from the library's own. Ends with "N passed, N failed". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* the public API, and internals: the Q8_K quantiser and the token counts that pick a path */
#include "pxl_kquants.h"

static int passed, failed;
static const char *isa = "";

static float frand(void) { return (float)rand() / (float)RAND_MAX * 2.0f - 1.0f; }
static uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static float get(int dt, const void *p, size_t i) { return dt ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i]; }
static double fp16(uint16_t h) { /* normal numbers only (the test makes no others) */
    return ldexp(1.0 + (h & 0x3ff) / 1024.0, ((h >> 10) & 0x1f) - 15) * (h & 0x8000 ? -1 : 1);
}
/* a random positive fp16 in [2^lo, 2^hi) */
static uint16_t rand_fp16(int lo, int hi) { return (uint16_t)((lo + 15 + rand() % (hi - lo)) << 10 | (rand() & 0x3ff)); }

static const char *fmt_name(int fmt) { return fmt == PXL_Q4_K ? "q4_K" : fmt == PXL_Q5_K ? "q5_K" : "q6_K"; }
static size_t block_bytes(int fmt) { return fmt == PXL_Q4_K ? 144 : fmt == PXL_Q5_K ? 176 : 210; }

/* llama.cpp's get_scale_min_k4 */
static void scale_min(int j, const uint8_t *q, int *d, int *m) {
    if (j < 4) *d = q[j] & 63, *m = q[j + 4] & 63;
    else *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
}

/* one super-block -> 256 doubles: dequantize_row_q4_K / q5_K / q6_K */
static void deq_block(int fmt, const uint8_t *b, double *y) {
    if (fmt == PXL_Q6_K) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        double d = fp16((uint16_t)(b[208] | b[209] << 8));
        for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8)
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                y[l] = d * sc[is] * (((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32);
                y[l + 32] = d * sc[is + 2] * (((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32);
                y[l + 64] = d * sc[is + 4] * (((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
                y[l + 96] = d * sc[is + 6] * (((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
            }
        return;
    }
    double d = fp16((uint16_t)(b[0] | b[1] << 8)), dmin = fp16((uint16_t)(b[2] | b[3] << 8));
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = fmt == PXL_Q5_K ? b + 48 : b + 16;
    int is = 0, u1 = 1, u2 = 2;
    for (int j = 0; j < 256; j += 64, ql += 32, is += 2, u1 <<= 2, u2 <<= 2) {
        int sc, m;
        scale_min(is, scales, &sc, &m);
        double d1 = d * sc, m1 = dmin * m;
        scale_min(is + 1, scales, &sc, &m);
        double d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; l++) {
            int h = fmt == PXL_Q5_K && (qh[l] & u1) ? 16 : 0;
            *y++ = d1 * ((ql[l] & 0xF) + h) - m1;
        }
        for (int l = 0; l < 32; l++) {
            int h = fmt == PXL_Q5_K && (qh[l] & u2) ? 16 : 0;
            *y++ = d2 * ((ql[l] >> 4) + h) - m2;
        }
    }
}

/* random blocks (every quant and scale bit random, d and dmin in [1/64, 1/8)) and their values */
static uint8_t *make_weights(int fmt, size_t N, size_t K, double *deq) {
    size_t nb = K / 256, bs = block_bytes(fmt);
    uint8_t *w = malloc(N * nb * bs);
    for (size_t i = 0; i < N * nb * bs; i++) w[i] = (uint8_t)rand();
    for (size_t b = 0; b < N * nb; b++) {
        uint8_t *blk = w + b * bs;
        uint16_t d = rand_fp16(-6, -3), dmin = rand_fp16(-6, -3);
        if (fmt == PXL_Q6_K) d = rand_fp16(-10, -7), memcpy(blk + 208, &d, 2);
        else memcpy(blk, &d, 2), memcpy(blk + 2, &dmin, 2);
        deq_block(fmt, blk, deq + b * 256);
    }
    return w;
}

/* Q8_K x: q d within half a step of x, d = amax / 127, bsums the exact sums of q per 16 */
static void test_quantize_q8k(size_t K) {
    float *x = malloc(K * 4);
    for (size_t i = 0; i < K; i++) x[i] = frand() * 3;
    for (size_t i = 0; i < 256 && K >= 512; i++) x[256 + i] = 0; /* an all-zero block: d = 0, q = 0 */
    void *buf = malloc(pxl_q8k_bytes(K));
    pxl_q8k qx;
    pxl_quantize_q8k(K, x, buf, &qx);
    int ok = 1;
    for (size_t b = 0; b < K / 256; b++) {
        double amax = 0, d = qx.d[b];
        for (int j = 0; j < 256; j++) amax = fmax(amax, fabs(x[b * 256 + j]));
        ok &= fabs(d - amax / 127) <= 1e-7 * amax;
        for (int j = 0; j < 256; j++) ok &= fabs(x[b * 256 + j] - d * qx.q[b * 256 + j]) <= 0.5001 * d + 1e-12;
        for (int s = 0; s < 16; s++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += qx.q[b * 256 + 16 * s + l];
            ok &= qx.bsums[b * 16 + s] == sum;
        }
    }
    if (ok) passed++;
    else printf("FAIL [%s] quantize_q8k K=%zu\n", isa, K), failed++;
    free(x), free(buf);
}

/* PXL_QX_INT16: two Q8_K planes, h and l in [-127, 127] with scales 255 s and s, s = amax / 32512,
 * that rebuild x to half of s */
static void test_quantize_q8k16(size_t K) {
    float *x = malloc(K * 4);
    for (size_t i = 0; i < K; i++) x[i] = frand() * 3;
    for (size_t i = 0; i < 256 && K >= 512; i++) x[256 + i] = 0;
    x[7] = 3.5f, x[9] = -3.5f; /* the block's amax both ways: |X| = 32512, h = +-127 */
    size_t qb = pxl_q8k_bytes(K);
    char *buf = malloc(2 * qb);
    pxl_quantize_q8k16(K, x, buf, buf + qb);
    pxl_q8k h = pxl_q8k_at(buf, K), l = pxl_q8k_at(buf + qb, K);
    int ok = 1;
    for (size_t b = 0; b < K / 256; b++) {
        double amax = 0, s = l.d[b];
        for (int j = 0; j < 256; j++) amax = fmax(amax, fabs(x[b * 256 + j]));
        ok &= fabs(s - amax / 32512) <= 1e-7 * amax && h.d[b] == (float)(255 * l.d[b]);
        for (int j = 0; j < 256; j++) {
            int qh = h.q[b * 256 + j], ql = l.q[b * 256 + j];
            ok &= qh >= -127 && qh <= 127 && ql >= -127 && ql <= 127;
            /* (0.5 s, and x / s and 255 s rounded in fp32) */
            ok &= fabs(x[b * 256 + j] - ((double)h.d[b] * qh + s * ql)) <= 0.51 * s + 1e-12;
        }
        for (int k = 0; k < 16; k++) {
            int sh = 0, sl = 0;
            for (int j = 0; j < 16; j++) sh += h.q[b * 256 + 16 * k + j], sl += l.q[b * 256 + 16 * k + j];
            ok &= h.bsums[b * 16 + k] == sh && l.bsums[b * 16 + k] == sl;
        }
    }
    if (ok) passed++;
    else printf("FAIL [%s] quantize_q8k16 K=%zu\n", isa, K), failed++;
    free(x), free(buf);
}

/* K-quants as bf16 panels (pxl_linear.c), x rounded to bf16: a prefill on sets with
 * qr_bf16p_prefill, or under PXL_QX_BF16 or PXL_QX_INT16_DECODE, whether the blocks are repacked
 * or in GGUF's layout */
static int k_panels(int run_fmt, size_t T) {
    const pxl_kernel_set *ks = pxl_kernels();
    const int mode = pxl_quant_x();
    return PXL_IS_KQUANT(run_fmt) && ks->qr_bf16p && T >= PXL_QR_PANEL_MIN_T &&
           !pxl_batch_invariant() &&
           (mode == PXL_QX_BF16 || mode == PXL_QX_INT16_DECODE || (mode == PXL_QX_AUTO && ks->qr_bf16p_prefill));
}

/* the repacked blocks' portable dequantisation gives the stored rows' values (within fp32's
 * rounding of w = d sc q - dmin m), and the set's panel kernel those values rounded to bf16, bit
 * for bit, zeros past the last row (the panel of rows [n0, N)) */
static void test_kr_panel(int fmt, size_t N, size_t K, size_t n0) {
    double *deq = malloc(N * K * 8);
    uint8_t *W = make_weights(fmt, N, K, deq);
    void *Wr = malloc(pxl_packed_bytes(fmt, N, K));
    pxl_pack_weights(fmt, N, K, W, Wr);
    const int kr = pxl_kr_of(fmt);
    size_t rows = N - n0 < PXL_PANEL ? N - n0 : PXL_PANEL;
    float *f = malloc(rows * K * 4);
    uint16_t *panel = malloc(K * PXL_PANEL * 2);
    pxl_dequant_rows_kr(kr, Wr, n0, rows, K, f);
    int ok = 1;
    for (size_t i = 0; i < rows * K; i++) ok &= fabs(f[i] - deq[n0 * K + i]) <= 1e-6 * (fabs(deq[n0 * K + i]) + 1);
    if (!ok) printf("FAIL [%s] dequant_rows_kr %s N=%zu K=%zu n0=%zu\n", isa, fmt_name(fmt), N, K, n0);
    pxl_kernels()->qr_bf16p(kr, Wr, n0, rows, K, panel);
    for (size_t k = 0; k < K; k++)
        for (size_t j = 0; j < PXL_PANEL; j++)
            ok &= panel[(k / 2 * PXL_PANEL + j) * 2 + k % 2] == (j < rows ? to_bf16(f[j * K + k]) : 0);
    if (ok) passed++;
    else printf("FAIL [%s] qr_bf16p %s N=%zu K=%zu n0=%zu\n", isa, fmt_name(fmt), N, K, n0), failed++;
    free(deq), free(W), free(Wr), free(f), free(panel);
}

static void test_linear(int dt, int fmt, size_t T, size_t N, size_t K, int with_bias) {
    double *deq = malloc(N * K * 8), *ref = malloc(T * N * 8), *mag = malloc(T * N * 8), *xr = malloc(T * K * 8);
    uint8_t *W = make_weights(fmt, N, K, deq);
    size_t es = dt ? 2 : 4;
    char *x = malloc(T * K * es), *b = malloc(N * es), *y = malloc(T * N * es);
    float *xf = malloc(T * K * 4);
    for (size_t i = 0; i < T * K; i++) {
        float v = frand();
        if (dt) ((uint16_t *)x)[i] = to_bf16(v), xf[i] = get(1, x, i);
        else ((float *)x)[i] = xf[i] = v;
    }
    for (size_t n = 0; n < N; n++) {
        if (dt) ((uint16_t *)b)[n] = to_bf16(frand());
        else ((float *)b)[n] = frand();
    }
    /* the int8 path meets x as Q8_K (checked on its own above): the reference then uses the same
     * quantised x, so only the kernels' sums are under test; prefill meets x itself, bf16 x on the
     * packed bf16 micro-kernel meets the weights rounded to bf16 */
    /* the kernel set's repacked copy where it has one (PXL_Q4_KR ..: the int8 path at every T) */
    size_t packed_bytes = pxl_packed_bytes(fmt, N, K);
    int run_fmt = !packed_bytes ? fmt : pxl_kr_of(fmt);
    void *Wrun = W;
    if (packed_bytes) {
        Wrun = malloc(packed_bytes);
        pxl_pack_weights(fmt, N, K, W, Wrun);
    }
    int panels = k_panels(run_fmt, T), qdot = !panels && pxl_qk_dot(pxl_kernels(), dt, run_fmt, T);
    int packed = panels || (!qdot && dt && T >= PXL_PACKED_Q_MIN_T && pxl_packed_bytes(PXL_BF16, 1, 2));
    int int16 = qdot && PXL_QX_IS_16(pxl_quant_x()); /* x as two planes (checked above) */
    size_t qb = pxl_q8k_bytes(K);
    char *qbuf = malloc(2 * qb);
    double *x8 = malloc(T * K * 8); /* int16: x at 8 bits too, to measure the planes' gain against */
    for (size_t t = 0; t < T; t++) {
        pxl_q8k qx, ql = pxl_q8k_at(qbuf + qb, K);
        pxl_quantize_q8k(K, xf + t * K, qbuf, &qx);
        for (size_t k = 0; k < K; k++) x8[t * K + k] = (double)qx.d[k / 256] * qx.q[k];
        if (int16) pxl_quantize_q8k16(K, xf + t * K, qbuf, qbuf + qb);
        for (size_t k = 0; k < K; k++)
            xr[t * K + k] = packed ? from_bf16(to_bf16(xf[t * K + k])) /* (bf16 x: the value itself) */
                            : !qdot ? xf[t * K + k]
                            : (double)qx.d[k / 256] * qx.q[k] + (int16 ? (double)ql.d[k / 256] * ql.q[k] : 0);
    }
    if (packed)
        for (size_t i = 0; i < N * K; i++) deq[i] = from_bf16(to_bf16((float)deq[i]));
    double gain8 = 0; /* int16: sum over y of (its 8-bit x's result - its 16-bit x's)^2 */
    for (size_t t = 0; t < T; t++)
        for (size_t n = 0; n < N; n++) {
            double s = with_bias ? get(dt, b, n) : 0, m = fabs(s), s8 = s;
            for (size_t k = 0; k < K; k++) s += deq[n * K + k] * xr[t * K + k], m += fabs(deq[n * K + k] * xr[t * K + k]);
            for (size_t k = 0; int16 && k < K; k++) s8 += deq[n * K + k] * x8[t * K + k];
            ref[t * N + n] = s, mag[t * N + n] = m, gain8 += (s8 - s) * (s8 - s);
        }
    pxl_linear(dt, run_fmt, T, N, K, x, Wrun, with_bias ? b : NULL, y);
    if (Wrun != W) free(Wrun);
    char name[112];
    snprintf(name, sizeof name, "linear %s w=%s%s T=%zu N=%zu K=%zu%s%s", dt ? "bf16" : "f32", fmt_name(fmt),
             packed_bytes ? " repacked" : "", T, N, K, with_bias ? " +bias" : "",
             int16 ? " (Q8_K x, two planes)" : qdot ? " (Q8_K x)" : panels ? " (bf16 panels)" : "");
    /* the mins (and Q6_K's -32) are summed apart from the scaled quants: a few times mag's
     * rounding, so the bound is wider than the 32-block formats' */
    double rel = 8e-6 * sqrt((double)K) + 1e-6, out_rel = dt ? 1.0 / 256 : 0;
    int ok = 1;
    double err2 = 0;
    for (size_t i = 0; i < T * N && ok; i++) {
        double g = get(dt, y, i), tol = rel * mag[i] + out_rel * fabs(ref[i]) + 1e-6;
        err2 += (g - ref[i]) * (g - ref[i]);
        if (!(fabs(g - ref[i]) <= tol)) {
            printf("FAIL [%s] %s: [%zu] got %.9g want %.9g (tol %.3g)\n", isa, name, i, g, ref[i], tol);
            ok = 0;
        }
    }
    /* the bound above is wider than 8-bit x's own error: the 16-bit result must also lie 20 times
     * nearer the 16-bit reference than the 8-bit one does (fp32 output; bf16's rounding is larger) */
    if (ok && int16 && !dt && !(err2 * 400 <= gain8)) {
        printf("FAIL [%s] %s: rms error %.3g, not 20x under 8-bit x's %.3g\n", isa, name, sqrt(err2 / (T * N)),
               sqrt(gain8 / (T * N)));
        ok = 0;
    }
    if (ok) passed++;
    else failed++;
    free(deq), free(ref), free(mag), free(xr), free(W), free(x), free(b), free(y), free(xf), free(qbuf), free(x8);
}

/* every row of a T-row Linear equals the same row alone, bitwise, in batch-invariant mode */
static void test_batch_invariant(int dt, int fmt, size_t T, size_t N, size_t K) {
    double *deq = malloc(N * K * 8);
    uint8_t *W = make_weights(fmt, N, K, deq);
    size_t es = dt ? 2 : 4;
    char *x = malloc(T * K * es), *y = malloc(T * N * es), *y1 = malloc(N * es);
    for (size_t i = 0; i < T * K; i++) {
        if (dt) ((uint16_t *)x)[i] = to_bf16(frand());
        else ((float *)x)[i] = frand();
    }
    size_t packed_bytes = pxl_packed_bytes(fmt, N, K); /* the repacked copy too, where the set has one */
    void *Wp = packed_bytes ? malloc(packed_bytes) : NULL;
    if (Wp) pxl_pack_weights(fmt, N, K, W, Wp);
    pxl_set_batch_invariant(1);
    int ok = 1;
    for (int rep = 0; rep < 1 + (Wp != NULL); rep++) {
        int f = !rep ? fmt : pxl_kr_of(fmt);
        const void *w = rep ? Wp : W;
        pxl_linear(dt, f, T, N, K, x, w, NULL, y);
        for (size_t t = 0; t < T; t++) {
            pxl_linear(dt, f, 1, N, K, x + t * K * es, w, NULL, y1);
            ok &= !memcmp(y + t * N * es, y1, N * es);
        }
    }
    free(Wp);
    pxl_set_batch_invariant(0);
    if (ok) passed++;
    else printf("FAIL [%s] batch invariant linear %s w=%s T=%zu N=%zu K=%zu\n", isa, dt ? "bf16" : "f32",
                fmt_name(fmt), T, N, K), failed++;
    free(deq), free(W), free(x), free(y), free(y1);
}

int main(void) {
    const char *sets[] = {"generic", "avx2", "avx512", "avx512bf16", "amx", "rvv"};
    for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
        if (pxl_set_isa(sets[s]) != 0) { printf("skip %s: not supported by this CPU or build\n", sets[s]); continue; }
        isa = pxl_isa();
        int before = passed + failed;
        srand(4321);
        test_quantize_q8k(256);
        test_quantize_q8k(1024);
        /* decode sizes (one and several tokens, rows tails, threads), prefill (the multi-token
         * kernel's token tails, or fp32 tiles over dequantised panels; bf16 panels from 64 tokens,
         * or from PXL_QK_DOT_MAX_T with the multi-token kernel), both dtypes */
        size_t shapes[][3] = {{1, 1, 256}, {1, 7, 512}, {2, 33, 256}, {3, 16, 768}, {4, 40, 512},
                              {1, 1536, 512}, {17, 70, 512}, {70, 33, 256}, {6, 129, 256}, {300, 21, 256},
                              {7, 40, 512}, {13, 33, 256}}; /* (repacked: 8 tokens a call; 7, 8 + 5) */
        for (int fmt = PXL_Q4_K; fmt <= PXL_Q6_K; fmt++) {
            for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
                for (int dt = 0; dt < 2; dt++) test_linear(dt, fmt, shapes[i][0], shapes[i][1], shapes[i][2], i % 2);
            pxl_set_batch_invariant(1); /* every T takes the int8 path */
            test_linear(PXL_F32, fmt, 9, 50, 512, 0);
            pxl_set_batch_invariant(0);
            test_batch_invariant(0, fmt, 9, 83, 512);
            test_batch_invariant(1, fmt, 5, 300, 256);
            if (pxl_packed_bytes(fmt, 1, 256) && pxl_kernels()->qr_bf16p) {
                test_kr_panel(fmt, 32, 512, 0);
                test_kr_panel(fmt, 48, 256, 32); /* the second panel: rows 32-47 and their zero tail */
            }
        }
        /* PXL_QX_BF16: a K-quant prefill takes bf16 panels on every set with them, a decode Q8_K x */
        if (pxl_set_quant_x(PXL_QX_BF16) == 0)
            for (int fmt = PXL_Q4_K; fmt <= PXL_Q6_K; fmt++) {
                test_linear(PXL_F32, fmt, 70, 33, 256, 1);
                test_linear(PXL_BF16, fmt, 40, 50, 512, 0);
                test_linear(PXL_F32, fmt, 5, 40, 512, 0);
            }
        pxl_set_quant_x(PXL_QX_AUTO);
        /* PXL_QX_INT16: Q8_K x as two planes wherever the int8 products run */
        if (pxl_set_quant_x(PXL_QX_INT16) != 0) printf("FAIL [%s] pxl_set_quant_x(int16) refused\n", isa), failed++;
        test_quantize_q8k16(256);
        test_quantize_q8k16(1024);
        for (int fmt = PXL_Q4_K; fmt <= PXL_Q6_K; fmt++) {
            size_t qshapes[][3] = {{1, 7, 512}, {3, 16, 768}, {6, 129, 256}, {1, 1536, 512}, {17, 70, 512},
                                   {7, 40, 512}};
            for (size_t i = 0; i < sizeof qshapes / sizeof qshapes[0]; i++)
                test_linear(i % 2, fmt, qshapes[i][0], qshapes[i][1], qshapes[i][2], i % 2);
            test_batch_invariant(0, fmt, 9, 83, 512);
        }
        /* PXL_QX_INT16_DECODE: those planes for decode-sized T, a prefill on panels where the set has them */
        if (pxl_set_quant_x(PXL_QX_INT16_DECODE) != 0)
            printf("FAIL [%s] pxl_set_quant_x(int16 decode) refused\n", isa), failed++;
        for (int fmt = PXL_Q4_K; fmt <= PXL_Q6_K; fmt++) {
            test_linear(PXL_F32, fmt, 3, 16, 768, 1);
            test_linear(PXL_F32, fmt, 40, 50, 512, 0);
        }
        pxl_set_quant_x(PXL_QX_AUTO);
        printf("kernel set %s: %d checks\n", isa, passed + failed - before);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
