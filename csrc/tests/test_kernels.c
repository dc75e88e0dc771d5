/* Kernel tests: every op entry point, on every kernel set this CPU can run, against a
 * double-precision scalar reference, on odd shapes, K/N/T tails and both dtypes.
 * Ends with the line "N passed, N failed". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* the public API, and internals: pxl_quantize_x (x quantised per 32-block for the int8 dot
 * products), pxl_repack_q (the 16-row repacker, which every set can read through the scalar
 * fallback), and the token counts at which Linear changes path */
#include "pxl_kernels.h"

#pragma GCC diagnostic ignored "-Wpsabi" /* vector values (pxl_f16x16_to_f32), always inlined */

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
/* IEEE binary16 by arithmetic, apart from the library's bit tricks: x rounded to 11 significant
 * bits (nearest even; the quantum at least 2^-24, the subnormals'), inf past 65504 */
static double in_f16(double x) {
    if (x != x) return x;
    int e;
    frexp(fabs(x), &e);
    int q = e - 11 < -24 ? -24 : e - 11;
    double r = ldexp(nearbyint(ldexp(fabs(x), -q)), q);
    return copysign(r > 65504 ? INFINITY : r, x);
}
static uint16_t to_f16(float f) { /* in_f16's value encoded (NaN as a quiet one) */
    double r = in_f16(f), a = fabs(r);
    uint16_t s = signbit(r) ? 0x8000 : 0;
    if (r != r) return s | 0x7e00;
    if (a == INFINITY) return s | 0x7c00;
    if (a < 0x1p-14) return s | (uint16_t)ldexp(a, 24);
    int e;
    frexp(a, &e);
    return s | (uint16_t)((e - 1 + 15) << 10) | (uint16_t)(ldexp(a, 11 - e) - 1024);
}
static double fp16(uint16_t h) { /* test-side decoder: every pattern */
    int exp = (h >> 10) & 0x1f;
    double v = exp == 31 ? ((h & 0x3ff) ? NAN : INFINITY)
               : exp ? ldexp(1.0 + (h & 0x3ff) / 1024.0, exp - 15) : ldexp((h & 0x3ff) / 1024.0, -14);
    return h & 0x8000 ? -v : v;
}
static const char *fmt_label(int dt) { return dt == PXL_F16 ? "f16" : dt ? "bf16" : "f32"; }
static size_t fmt_bytes(int dt) { return dt ? 2 : 4; }
static float rnd(int dt, float f) { return dt ? from_bf16(to_bf16(f)) : f; }
static float get(int dt, const void *p, size_t i) {
    if (dt == PXL_F16) return (float)fp16(((const uint16_t *)p)[i]);
    return dt ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static float in_fmt(int dt, float x) { /* x as dt holds it */
    return dt == PXL_F16 ? (float)in_f16(x) : dt ? from_bf16(to_bf16(x)) : x;
}
static void *alloc_rand(int dt, size_t n, float scale) { /* random values, exactly representable in dt */
    void *p = malloc(n * 4 + 64);
    for (size_t i = 0; i < n; i++) {
        float v = frand() * scale;
        if (dt == PXL_F16) ((uint16_t *)p)[i] = to_f16(v);
        else if (dt) ((uint16_t *)p)[i] = to_bf16(v);
        else ((float *)p)[i] = v;
    }
    return p;
}

/* |got - ref| <= rel * mag + abs, where mag bounds the rounding error's scale */
static void check(const char *what, int dt, size_t n, const void *got, const double *ref, const double *mag, double rel) {
    double out_rel = dt ? 1.0 / 256 : 0; /* one bf16 rounding of the result */
    for (size_t i = 0; i < n; i++) {
        double g = get(dt, got, i), tol = rel * (mag ? mag[i] : fabs(ref[i])) + out_rel * fabs(ref[i]) + 1e-6;
        if (!(fabs(g - ref[i]) <= tol)) {
            printf("FAIL [%s] %s: [%zu] got %.9g want %.9g (tol %.3g)\n", isa, what, i, g, ref[i], tol);
            failed++;
            return;
        }
    }
    passed++;
}


/* the f16 KV cache's conversions: every f16 pattern widened by each conversion this CPU has (the
 * portable one, and on x86 F16C's and AVX-512F's), and fp32 values across f16's range (its
 * subnormals, the rounding ties, the edge of inf) rounded by the store */
static f32x16 widen_portable(const void *p) { return pxl_f16x16_widen(p); }
#ifdef PXL_X86_F16C
static f32x16 widen_f16c(const void *p) {
    f32x16 v;
    pxl_f16x16_cvt256(p, &v);
    return v;
}
static f32x16 widen_avx512(const void *p) {
    f32x16 v;
    pxl_f16x16_cvt512(p, &v);
    return v;
}
#endif
static void test_f16_conversions(void) {
    struct {
        const char *name;
        f32x16 (*widen)(const void *);
        int usable;
    } ways[] = {
        {"portable", widen_portable, 1},
#ifdef PXL_X86_F16C
        {"f16c", widen_f16c, __builtin_cpu_supports("f16c")},
        {"avx512f", widen_avx512, __builtin_cpu_supports("avx512f")},
#endif
    };
    for (size_t w = 0; w < sizeof ways / sizeof *ways; w++)
        for (uint32_t h0 = 0; ways[w].usable && h0 < 65536; h0 += 16) {
            uint16_t h[16];
            for (int i = 0; i < 16; i++) h[i] = (uint16_t)(h0 + i);
            f32x16 v = ways[w].widen(h);
            for (int i = 0; i < 16; i++) {
                double want = fp16(h[i]);
                if (!(v[i] == want || (want != want && v[i] != v[i]))) {
                    printf("FAIL [%s] f16 widening (%s): 0x%04x got %.9g want %.9g\n", isa, ways[w].name, h[i],
                           v[i], want);
                    failed++;
                    return;
                }
            }
        }
    float edge[] = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 1e9f, INFINITY, 0x1p-14f, 0x1p-24f,
                    0x1p-25f, 0x1.8p-24f, 0x1.000002p-25f, 0x1.ffcp-15f, 0x1.ffep-15f, 1.0f + 0x1p-11f,
                    1.0f + 0x1.8p-10f, 1e-30f, -3.1415926f};
    for (int i = 0; i < 200000; i++) {
        float f = i < (int)(sizeof edge / sizeof *edge) ? edge[i] : ldexpf(frand(), rand() % 46 - 28);
        uint16_t got = pxl_f32_to_f16(f), want = to_f16(f);
        if (got != want) {
            printf("FAIL [%s] f32 -> f16: %.9g got 0x%04x want 0x%04x\n", isa, f, got, want);
            failed++;
            return;
        }
    }
    if (pxl_f32_to_f16(NAN) != 0x7e00 || (pxl_f32_to_f16(-NAN) & 0x7c00) != 0x7c00) {
        printf("FAIL [%s] f32 -> f16: NaN not kept\n", isa);
        failed++;
        return;
    }
    passed++;
}

/* a random weight matrix (N, K) in `fmt` and its exact dequantised values */
static void *make_weights(int fmt, size_t N, size_t K, double *deq) {
    size_t nb = K / PXL_QK;
    if (fmt == PXL_F32 || fmt == PXL_BF16) {
        void *w = alloc_rand(fmt, N * K, 1);
        for (size_t i = 0; i < N * K; i++) deq[i] = get(fmt, w, i);
        return w;
    }
    size_t bs = fmt == PXL_Q8_0 ? sizeof(pxl_block_q8_0) : fmt == PXL_Q4_0 ? sizeof(pxl_block_q4_0) : sizeof(pxl_block_q4_1);
    char *w = malloc(N * nb * bs);
    for (size_t r = 0; r < N * nb; r++) {
        double *o = deq + r * PXL_QK;
        uint16_t d = to_f16(0.01f + 0.02f * (frand() + 1)), m = to_f16(frand() * 0.1f);
        if (fmt == PXL_Q8_0) {
            pxl_block_q8_0 *b = (pxl_block_q8_0 *)w + r;
            b->d = d;
            for (int j = 0; j < PXL_QK; j++) { b->qs[j] = (int8_t)(rand() % 255 - 127); o[j] = fp16(d) * b->qs[j]; }
        } else {
            uint8_t *qs = fmt == PXL_Q4_0 ? ((pxl_block_q4_0 *)w + r)->qs : ((pxl_block_q4_1 *)w + r)->qs;
            if (fmt == PXL_Q4_0) ((pxl_block_q4_0 *)w + r)->d = d;
            else ((pxl_block_q4_1 *)w + r)->d = d, ((pxl_block_q4_1 *)w + r)->m = m;
            double off = fmt == PXL_Q4_0 ? -8 * fp16(d) : fp16(m);
            for (int j = 0; j < 16; j++) {
                int lo = rand() % 16, hi = rand() % 16;
                qs[j] = (uint8_t)(lo | hi << 4);
                o[j] = fp16(d) * lo + off, o[j + 16] = fp16(d) * hi + off;
            }
        }
    }
    return w;
}

static const char *fmt_name[] = {"f32", "bf16", "q8_0", "q4_0", "q4_1", "bf16 packed",
                                  "f32 packed", "q8_0 x16", "q4_0 x16", "q4_1 x16", "q4_K", "q5_K",
                                  "q6_K", "q4_K x16", "q6_K x16", "f16", "q5_K x16"};
_Static_assert(sizeof fmt_name / sizeof fmt_name[0] == PXL_NFMT, "a name for every format");

/* repacked blocks times bf16 x with exact weights (PXL_QX_BF16: decode-sized T, or every T
 * when batch invariant) */
static int qr_bf16x(int fmt, size_t T) {
    const pxl_kernel_set *ks = pxl_kernels();
    return fmt >= PXL_Q8_0R && fmt <= PXL_Q4_1R && ks->qr_bf16p && ks->gemv_qr_bf16 &&
           pxl_quant_x() == PXL_QX_BF16 && (T < PXL_QR_PANEL_MIN_T || pxl_batch_invariant());
}

/* repacked blocks as bf16 panels (a prefill on sets with qr_bf16p_prefill, or on every set with
 * qr_bf16p under PXL_QX_INT16_DECODE; under PXL_QX_BF16 every T the above leaves), whatever x's
 * dtype */
static int qr_panels(int fmt, size_t T) {
    const pxl_kernel_set *ks = pxl_kernels();
    const int mode = pxl_quant_x(), prefill = T >= PXL_QR_PANEL_MIN_T && !pxl_batch_invariant();
    return fmt >= PXL_Q8_0R && fmt <= PXL_Q4_1R && ks->qr_bf16p && !qr_bf16x(fmt, T) &&
           (mode == PXL_QX_BF16 || (prefill && (mode == PXL_QX_INT16_DECODE ||
                                                 (mode == PXL_QX_AUTO && ks->qr_bf16p_prefill))));
}

/* Quantised weights with small T (or batch invariant) take int8 dot products on x quantised
 * per 32-block: the reference then uses the same quantised x (checked on its own in
 * test_quantize_x), so only the kernels' summation is under test. */
static int int8_path(int fmt, size_t T) {
    return PXL_IS_QUANT(fmt) &&
           (fmt >= PXL_Q8_0R ? !qr_panels(fmt, T) && !qr_bf16x(fmt, T) : T <= PXL_Q_DOT_MAX_T || pxl_batch_invariant());
}

/* packed formats are made from dense weights of this format */
static int dense_of(int fmt) { return fmt == PXL_BF16P ? PXL_BF16 : fmt == PXL_F32P ? PXL_F32 : PXL_QBASE(fmt); }
static size_t q_block_bytes(int fmt) {
    return fmt == PXL_Q8_0 ? sizeof(pxl_block_q8_0) : fmt == PXL_Q4_0 ? sizeof(pxl_block_q4_0) : sizeof(pxl_block_q4_1);
}
/* the packed copy of W (W freed), or W itself for unpacked formats. Repacked quantised
 * blocks are made for every set (those without their own kernel run the scalar one); where
 * the set packs them itself, pxl_packed_bytes must give the layout's size and the bytes match. */
static void *packed_copy(int fmt, size_t N, size_t K, void *W) {
    if (fmt >= PXL_Q8_0R) {
        int base = PXL_QBASE(fmt);
        size_t bytes = (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * PXL_QR_ROWS * (K / PXL_QK) * q_block_bytes(base);
        size_t own = pxl_packed_bytes(base, N, K);
        char *packed = malloc(bytes), *mine = own ? malloc(own) : NULL;
        pxl_repack_q(base, N, K, W, packed);
        if (own) {
            pxl_pack_weights(base, N, K, W, mine);
            if (own != bytes || memcmp(mine, packed, bytes)) printf("FAIL [%s] pxl_pack_weights %s N=%zu K=%zu\n", isa, fmt_name[fmt], N, K), failed++;
            free(mine);
        }
        free(W);
        return packed;
    }
    if (fmt != PXL_BF16P && fmt != PXL_F32P) return W;
    /* dense panels likewise: sets without the micro-kernel run the portable one */
    size_t bytes = (N + PXL_PANEL - 1) / PXL_PANEL * K * PXL_PANEL * (fmt == PXL_F32P ? 4 : 2);
    size_t own = pxl_packed_bytes(dense_of(fmt), N, K);
    if (own && own != bytes) printf("FAIL [%s] pxl_packed_bytes %s N=%zu K=%zu\n", isa, fmt_name[fmt], N, K), failed++;
    void *packed = malloc(bytes);
    pxl_pack_weights(dense_of(fmt), N, K, W, packed);
    free(W);
    return packed;
}

static void test_linear(int dt, int fmt, size_t T, size_t N, size_t K, int with_bias) {
    double *deq = malloc(N * K * 8), *ref = malloc(T * N * 8), *mag = malloc(T * N * 8), *xr = malloc(T * K * 8);
    void *W = make_weights(dense_of(fmt), N, K, deq), *x = alloc_rand(dt, T * K, 1);
    void *b = alloc_rand(dt, N, 1);
    void *y = malloc(T * N * 4 + 64);
    size_t nb = K / PXL_QK;
    int8_t *q = malloc(2 * T * K + 1); /* (PXL_QX_INT16: two planes a row) */
    float *xf = malloc(T * K * 4 + 4), *qd = malloc(2 * T * nb * 4 + 4), *qc = malloc(2 * T * nb * 4 + 4),
          *qe = malloc(2 * T * nb * 4 + 4);
    for (size_t i = 0; i < T * K; i++) xf[i] = get(dt, x, i);
    int qdot = int8_path(fmt, T);
    /* bf16 x on quantised weights past the int8 path: dequantised panels rounded to bf16 */
    int packed_q = PXL_IS_QUANT(fmt) && !qdot && pxl_packed_bytes(PXL_BF16, 1, 2) &&
                   (qr_panels(fmt, T) || (dt && T >= PXL_PACKED_Q_MIN_T));
    int planes = qdot && PXL_QX_IS_16(pxl_quant_x()) ? 2 : 1;
    if (qdot) (planes == 2 ? pxl_quantize_x16 : pxl_quantize_x)(fmt, T, K, xf, q, qd, qc, qe);
    if (packed_q)
        for (size_t i = 0; i < N * K; i++) deq[i] = rnd(1, (float)deq[i]);
    int bf16x = qr_bf16x(fmt, T); /* (exact weights) */
    for (size_t i = 0; i < T * K; i++) /* bf16 weights multiply bf16-rounded x (vdpbf16ps) */
        xr[i] = qdot && planes == 2 ? (double)qd[2 * (i / K) * nb + i % K / PXL_QK] * q[2 * (i / K) * K + i % K] +
                                          (double)qd[(2 * (i / K) + 1) * nb + i % K / PXL_QK] * q[(2 * (i / K) + 1) * K + i % K]
                : qdot ? (double)qd[i / PXL_QK] * q[i]
                : fmt == PXL_BF16 || fmt == PXL_BF16P || packed_q || bf16x ? rnd(1, xf[i]) : xf[i];
    for (size_t t = 0; t < T; t++)
        for (size_t n = 0; n < N; n++) {
            double s = with_bias ? get(dt, b, n) : 0, m = fabs(s);
            for (size_t k = 0; k < K; k++)
                s += deq[n * K + k] * xr[t * K + k], m += fabs(deq[n * K + k] * xf[t * K + k]);
            ref[t * N + n] = s, mag[t * N + n] = m;
        }
    W = packed_copy(fmt, N, K, W);
    pxl_linear(dt, fmt, T, N, K, x, W, with_bias ? b : NULL, y);
    char name[112];
    snprintf(name, sizeof name, "linear %s w=%s T=%zu N=%zu K=%zu%s%s", dt ? "bf16" : "f32", fmt_name[fmt], T, N, K,
             with_bias ? " +bias" : "", qdot ? (planes == 2 ? " (int16 x)" : " (int8 x)") : bf16x ? " (bf16 x)"
                                        : packed_q                         ? " (bf16 panels)"
                                                                           : "");
    check(name, dt, T * N, y, ref, mag, 2e-6 * sqrt((double)K) + 1e-6);
    free(deq); free(ref); free(mag); free(xr); free(W); free(x); free(b); free(y); free(q); free(xf); free(qd); free(qc); free(qe);
}

/* the set's dequantisation of repacked blocks into a bf16 panel: bit for bit the portable
 * dequantisation rounded to bf16, zeros past the last row (panel of rows [n0, N)) */
static void test_qr_bf16p(int fmt, size_t N, size_t K, size_t n0) {
    double *deq = malloc(N * K * 8);
    void *W = packed_copy(fmt, N, K, make_weights(PXL_QBASE(fmt), N, K, deq));
    size_t rows = N - n0 < PXL_PANEL ? N - n0 : PXL_PANEL;
    float *f = malloc(rows * K * 4);
    uint16_t *panel = malloc(K * PXL_PANEL * 2);
    pxl_dequant_rows_qr(fmt, W, n0, rows, K, f);
    pxl_kernels()->qr_bf16p(fmt, W, n0, rows, K, panel);
    int ok = 1;
    for (size_t k = 0; k < K; k++)
        for (size_t j = 0; j < PXL_PANEL; j++)
            ok &= panel[(k / 2 * PXL_PANEL + j) * 2 + k % 2] == (j < rows ? to_bf16(f[j * K + k]) : 0);
    if (ok) passed++;
    else printf("FAIL [%s] qr_bf16p %s N=%zu K=%zu n0=%zu\n", isa, fmt_name[fmt], N, K, n0), failed++;
    free(deq), free(W), free(f), free(panel);
}

/* q * d is within half a step of x, the scale is amax / 127, and c is each format's offset term */
/* 16-bit x: two planes whose sum gives x to half of 1/32512 of the block's largest |x| (and a
 * little: the high plane's scale 255 s is rounded to fp32) */
static void test_quantize_x16(size_t K) {
    size_t nb = K / PXL_QK;
    float *x = alloc_rand(0, K, 3), *d = malloc(2 * nb * 4), *c = malloc(2 * nb * 4), *e = malloc(2 * nb * 4);
    int8_t *q = malloc(2 * K);
    x[7] = 0;
    int ok = 1;
    for (int fmt = PXL_Q8_0; fmt < PXL_NFMT; fmt++) {
        if (!PXL_IS_QUANT(fmt)) continue;
        pxl_quantize_x16(fmt, 1, K, x, q, d, c, e);
        for (size_t b = 0; b < nb; b++) {
            double amax = 0, hsum = 0, lsum = 0;
            for (int j = 0; j < PXL_QK; j++) amax = fmax(amax, fabs(x[b * PXL_QK + j]));
            ok &= d[b] == (float)(255 * d[nb + b]) && fabs(d[nb + b] - amax / 32512) <= 1e-7 * amax;
            for (int j = 0; j < PXL_QK; j++) {
                int h = q[b * PXL_QK + j], l = q[K + b * PXL_QK + j];
                hsum += h, lsum += l;
                ok &= h >= -127 && h <= 127 && l >= -127 && l <= 127;
                ok &= fabs(x[b * PXL_QK + j] - ((double)d[b] * h + (double)d[nb + b] * l)) <= 0.51 * d[nb + b] + 1e-12;
            }
            int base = PXL_QBASE(fmt); /* each plane's terms, as one int8 token's */
            if (base == PXL_Q4_1) ok &= c[b] == (float)(d[b] * hsum) && c[nb + b] == (float)(d[nb + b] * lsum);
            if (fmt == PXL_Q8_0R) ok &= e[b] == -128 * hsum && e[nb + b] == -128 * lsum;
        }
    }
    char name[48];
    snprintf(name, sizeof name, "quantize_x16 K=%zu", K);
    if (ok) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(x); free(d); free(c); free(e); free(q);
}

static void test_quantize_x(size_t K) {
    size_t nb = K / PXL_QK;
    float *x = alloc_rand(0, K, 3), *d = malloc(nb * 4), *c = malloc(nb * 4), *e = malloc(nb * 4);
    int8_t *q = malloc(K);
    x[5] = 0; /* and an all-zero block: d = 0, q = 0 */
    for (size_t j = 0; j < PXL_QK && K >= 2 * PXL_QK; j++) x[PXL_QK + j] = 0;
    int ok = 1;
    for (int fmt = PXL_Q8_0; fmt < PXL_NFMT; fmt++) {
        if (!PXL_IS_QUANT(fmt)) continue;
        pxl_quantize_x(fmt, 1, K, x, q, d, c, e);
        for (size_t b = 0; b < nb; b++) {
            double amax = 0, sum = 0, qsum = 0;
            for (int j = 0; j < PXL_QK; j++) {
                double v = x[b * PXL_QK + j];
                amax = fabs(v) > amax ? fabs(v) : amax, sum += v, qsum += q[b * PXL_QK + j];
                ok &= fabs(v - (double)d[b] * q[b * PXL_QK + j]) <= 0.5001 * d[b] + 1e-12;
            }
            ok &= fabs(d[b] - amax / 127) <= 1e-7 * amax;
            int base = PXL_QBASE(fmt);
            double want_c = base == PXL_Q4_1 ? d[b] * qsum : 0; /* the rounded x's sum, as llama.cpp's Q8_1 s */
            double want_e = base == PXL_Q4_0 ? -8 * d[b] * qsum : 0;
            if (fmt == PXL_Q8_0R) ok &= e[b] == -128 * qsum; /* exact: it completes an integer dot */
            else ok &= fabs(e[b] - want_e) <= 1e-5 * (fabs(sum) + 1);
            ok &= fabs(c[b] - want_c) <= 1e-5 * (fabs(want_c) + 1);
        }
    }
    char name[48];
    snprintf(name, sizeof name, "quantize_x K=%zu", K);
    if (ok) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(x); free(d); free(c); free(e); free(q);
}

/* batch invariance: each row of a T-row Linear equals the same row computed alone, bitwise */
static void test_batch_invariant(int dt, int fmt, size_t T, size_t N, size_t K) {
    double *deq = malloc(N * K * 8);
    void *W = make_weights(dense_of(fmt), N, K, deq), *x = alloc_rand(dt, T * K, 1);
    W = packed_copy(fmt, N, K, W);
    size_t es = dt ? 2 : 4;
    char *y = malloc(T * N * es), *y1 = malloc(N * es);
    pxl_set_batch_invariant(1);
    pxl_linear(dt, fmt, T, N, K, x, W, NULL, y);
    int ok = 1;
    for (size_t t = 0; t < T; t++) {
        pxl_linear(dt, fmt, 1, N, K, (const char *)x + t * K * es, W, NULL, y1);
        ok &= !memcmp(y + t * N * es, y1, N * es);
    }
    pxl_set_batch_invariant(0);
    char name[80];
    snprintf(name, sizeof name, "batch invariant linear %s w=%s T=%zu N=%zu K=%zu", dt ? "bf16" : "f32", fmt_name[fmt], T, N, K);
    if (ok) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(deq); free(W); free(x); free(y); free(y1);
}

/* whether two threads can run an op: a build without OpenMP (the rv64 one) runs every op on
 * one, whatever pxl_set_num_threads asks */
static int has_two_threads(void) {
    int nth = pxl_num_threads();
    pxl_set_num_threads(2);
    int two = pxl_num_threads() == 2;
    pxl_set_num_threads(nth);
    return two;
}

/* a Linear's bits do not depend on how its columns went to the threads: two threads (past
 * PXL_T_PRIVATE and this big, chunks taken in turn, the last one short) = one thread, bitwise */
static void test_linear_threads(int dt, int fmt, size_t T, size_t N, size_t K) {
    double *deq = malloc(N * K * 8);
    void *W = make_weights(dense_of(fmt), N, K, deq), *x = alloc_rand(dt, T * K, 1);
    W = packed_copy(fmt, N, K, W);
    size_t es = dt ? 2 : 4;
    char *y1 = malloc(T * N * es), *y2 = malloc(T * N * es);
    int nth = pxl_num_threads();
    pxl_set_num_threads(1);
    pxl_linear(dt, fmt, T, N, K, x, W, NULL, y1);
    pxl_set_num_threads(2);
    pxl_linear(dt, fmt, T, N, K, x, W, NULL, y2);
    pxl_set_num_threads(nth);
    char name[80];
    snprintf(name, sizeof name, "linear 1 thread = 2 %s w=%s T=%zu N=%zu K=%zu", dt ? "bf16" : "f32", fmt_name[fmt],
             T, N, K);
    if (!memcmp(y1, y2, T * N * es)) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(deq); free(W); free(x); free(y1); free(y2);
}

/* pxl_linear_to(bf16 -> fp32): each value is pxl_linear's bf16 result widened, bitwise */
static void test_linear_to(int fmt, size_t T, size_t N, size_t K, int with_bias) {
    double *deq = malloc(N * K * 8);
    void *W = make_weights(dense_of(fmt), N, K, deq), *x = alloc_rand(PXL_BF16, T * K, 1);
    void *b = alloc_rand(PXL_BF16, N, 1);
    W = packed_copy(fmt, N, K, W);
    uint16_t *y16 = malloc(T * N * 2);
    float *y32 = aligned_alloc(64, (T * N * 4 + 63) / 64 * 64); /* (on lines, as the engine's logits: streamed when big) */
    pxl_linear(PXL_BF16, fmt, T, N, K, x, W, with_bias ? b : NULL, y16);
    pxl_linear_to(PXL_BF16, PXL_F32, fmt, T, N, K, x, W, with_bias ? b : NULL, y32);
    int ok = 1;
    for (size_t i = 0; i < T * N; i++) ok &= from_bf16(y16[i]) == y32[i];
    char name[96];
    snprintf(name, sizeof name, "linear_to f32 w=%s T=%zu N=%zu K=%zu%s", fmt_name[fmt], T, N, K,
             with_bias ? " +bias" : "");
    if (ok) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(deq); free(W); free(x); free(b); free(y16); free(y32);
}

/* pxl_linear_silu on gate and up packed together = pxl_linear on each, then pxl_silu_mul, bitwise */
static void test_linear_silu(int dt, int fmt, size_t T, size_t N, size_t K) {
    double *deq = malloc(N * K * 8);
    int src = dense_of(fmt);
    void *Wg = make_weights(src, N, K, deq), *Wu = make_weights(src, N, K, deq), *x = alloc_rand(dt, T * K, 1);
    size_t es = dt ? 2 : 4, slot = (size_t)K * PXL_PANEL * (fmt == PXL_F32P ? 4 : 2);
    void *Wgu = malloc(2 * (N + PXL_PANEL - 1) / PXL_PANEL * slot);
    pxl_pack_gated(src, N, K, Wg, Wu, Wgu);
    Wg = packed_copy(fmt, N, K, Wg), Wu = packed_copy(fmt, N, K, Wu);
    char *g = malloc(T * N * es), *u = malloc(T * N * es), *want = malloc(T * N * es), *got = malloc(T * N * es);
    pxl_linear(dt, fmt, T, N, K, x, Wg, NULL, g);
    pxl_linear(dt, fmt, T, N, K, x, Wu, NULL, u);
    pxl_silu_mul(dt, T * N, g, u, want);
    pxl_linear_silu(dt, fmt, T, N, K, x, Wgu, got);
    char name[80];
    snprintf(name, sizeof name, "linear_silu %s w=%s T=%zu N=%zu K=%zu", dt ? "bf16" : "f32", fmt_name[fmt], T, N, K);
    if (!memcmp(want, got, T * N * es)) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(deq); free(Wg); free(Wu); free(Wgu); free(x); free(g); free(u); free(want); free(got);
}

/* fp32 activations handed on as bf16 rows (PXL_YR, PXL_XR): an RMSNorm (and Add+RMSNorm) stores
 * its y rounded to bf16, PXL_LDXR apart; q/k/v, gate/up and down on packed bf16 weights read such
 * rows, and gate/up's Linear+SiluMul stores its y so. Each gives the bits of the fp32 chain, whose
 * Linears round x to bf16 themselves. */
static void test_bf16_rows(size_t T, size_t K, size_t F) {
    size_t lk = PXL_LDXR(K), lf = PXL_LDXR(F), n3[3] = {K, 64, 64}, nq = K + 128;
    double *deq = malloc((F > nq ? F : nq) * K * 8); /* (the largest weights made) */
    float *a = alloc_rand(PXL_F32, T * K, 4), *b = alloc_rand(PXL_F32, T * K, 1), *w = alloc_rand(PXL_F32, K, 1);
    float *s32 = malloc(T * K * 4), *x32 = malloc(T * K * 4), *s = malloc(T * K * 4), *h32 = malloc(T * F * 4);
    uint16_t *xb = malloc(T * lk * 2), *hb = malloc(T * lf * 2);
    int ok = 1;
    pxl_add_rmsnorm(PXL_F32, T, K, a, b, w, 1e-5f, s32, x32);
    pxl_add_rmsnorm(PXL_F32 | PXL_YR, T, K, a, b, w, 1e-5f, s, xb);
    ok &= !memcmp(s, s32, T * K * 4);
    for (size_t t = 0; t < T; t++)
        for (size_t d = 0; d < K; d++) ok &= xb[t * lk + d] == to_bf16(x32[t * K + d]);
    pxl_rmsnorm(PXL_F32, T, K, a, w, 1e-5f, x32);
    pxl_rmsnorm(PXL_F32 | PXL_YR, T, K, a, w, 1e-5f, xb);
    for (size_t t = 0; t < T; t++)
        for (size_t d = 0; d < K; d++) ok &= xb[t * lk + d] == to_bf16(x32[t * K + d]);
    /* gate/up: x in, y out as bf16 rows */
    void *Wg = make_weights(PXL_BF16, F, K, deq), *Wu = make_weights(PXL_BF16, F, K, deq);
    void *Wgu = malloc(2 * (F + PXL_PANEL - 1) / PXL_PANEL * K * PXL_PANEL * 2);
    pxl_pack_gated(PXL_BF16, F, K, Wg, Wu, Wgu);
    pxl_linear_silu(PXL_F32, PXL_BF16P, T, F, K, x32, Wgu, h32);
    pxl_linear_silu(PXL_F32 | PXL_XR | PXL_YR, PXL_BF16P, T, F, K, xb, Wgu, hb);
    for (size_t t = 0; t < T; t++)
        for (size_t j = 0; j < F; j++) ok &= hb[t * lf + j] == to_bf16(h32[t * F + j]);
    /* down: bf16 rows in, fp32 out with a bias */
    void *Wd = packed_copy(PXL_BF16P, K, F, make_weights(PXL_BF16, K, F, deq)), *bias = alloc_rand(PXL_F32, nq, 1);
    float *want = malloc(T * nq * 4), *got = malloc(T * nq * 4);
    pxl_linear(PXL_F32, PXL_BF16P, T, K, F, h32, Wd, bias, want);
    pxl_linear(PXL_F32 | PXL_XR, PXL_BF16P, T, K, F, hb, Wd, bias, got);
    ok &= !memcmp(want, got, T * K * 4);
    /* q/k/v: bf16 rows in, three parts out */
    void *Wq = packed_copy(PXL_BF16P, nq, K, make_weights(PXL_BF16, nq, K, deq));
    void *yw[3] = {want, want + T * K, want + T * (K + 64)}, *yg[3] = {got, got + T * K, got + T * (K + 64)};
    pxl_linear_parts(PXL_F32, PXL_BF16P, T, K, 3, n3, x32, Wq, NULL, yw);
    pxl_linear_parts(PXL_F32 | PXL_XR, PXL_BF16P, T, K, 3, n3, xb, Wq, NULL, yg);
    ok &= !memcmp(want, got, T * nq * 4);
    char name[64];
    snprintf(name, sizeof name, "bf16 rows T=%zu K=%zu F=%zu", T, K, F);
    if (ok) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(deq); free(a); free(b); free(w); free(s32); free(x32); free(s); free(h32); free(xb); free(hb);
    free(Wg); free(Wu); free(Wgu); free(Wd); free(bias); free(want); free(got); free(Wq);
}

/* pxl_linear_parts on the parts' weights stacked and packed as one = pxl_linear on each part's
 * own, bitwise (bias stacked likewise) */
static void test_linear_parts(int dt, int fmt, size_t T, size_t K, int count, const size_t *n, int with_bias) {
    size_t N = 0, es = dt ? 2 : 4, dense = dense_of(fmt);
    for (int i = 0; i < count; i++) N += n[i];
    size_t row = dense <= PXL_BF16 ? K * (dense ? 2 : 4) : K / PXL_QK * q_block_bytes(dense);
    double *deq = malloc(N * K * 8);
    char *stack = malloc(N * row), *b = alloc_rand(dt, N, 1), *x = alloc_rand(dt, T * K, 1);
    char *want = malloc(T * N * es), *got = malloc(T * N * es);
    void *y[3];
    for (int i = 0, r = 0; i < count; r += n[i++]) {
        void *W = make_weights(dense, n[i], K, deq);
        memcpy(stack + r * row, W, n[i] * row);
        W = packed_copy(fmt, n[i], K, W);
        pxl_linear(dt, fmt, T, n[i], K, x, W, with_bias ? b + r * es : NULL, want + T * r * es);
        y[i] = got + T * r * es;
        free(W);
    }
    void *Ws = packed_copy(fmt, N, K, stack);
    pxl_linear_parts(dt, fmt, T, K, count, n, x, Ws, with_bias ? b : NULL, y);
    char name[96];
    snprintf(name, sizeof name, "linear_parts %s w=%s T=%zu K=%zu N=%zu (%d parts)%s", dt ? "bf16" : "f32",
             fmt_name[fmt], T, K, N, count, with_bias ? " +bias" : "");
    if (!memcmp(want, got, T * N * es)) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(deq); free(Ws); free(b); free(x); free(want); free(got);
}

/* pxl_add_rmsnorm = pxl_add then pxl_rmsnorm, bitwise, also with y over a (the plan may reuse
 * a's buffer for y) */
static void test_add_rmsnorm(int dt, size_t T, size_t D) {
    size_t n = T * D, es = dt ? 2 : 4;
    void *a = alloc_rand(dt, n, 4), *b = alloc_rand(dt, n, 1), *w = alloc_rand(dt, D, 1);
    char *s1 = malloc(n * es), *y1 = malloc(n * es), *s2 = malloc(n * es), *y2 = malloc(n * es);
    pxl_add(dt, n, a, b, s1);
    pxl_rmsnorm(dt, T, D, s1, w, 1e-5f, y1);
    pxl_add_rmsnorm(dt, T, D, a, b, w, 1e-5f, s2, y2);
    int ok = !memcmp(s1, s2, n * es) && !memcmp(y1, y2, n * es);
    pxl_add_rmsnorm(dt, T, D, a, b, w, 1e-5f, s2, a); /* y in place of a */
    ok &= !memcmp(s1, s2, n * es) && !memcmp(y1, a, n * es);
    char name[64];
    snprintf(name, sizeof name, "add_rmsnorm %s T=%zu D=%zu", dt ? "bf16" : "f32", T, D);
    if (ok) passed++;
    else printf("FAIL [%s] %s\n", isa, name), failed++;
    free(a); free(b); free(w); free(s1); free(y1); free(s2); free(y2);
}

static void test_rowwise(int dt, size_t T, size_t D) {
    size_t n = T * D, cap = (T > 5 ? T : 5) * D; /* gather writes 5 rows */
    void *a = alloc_rand(dt, n, 4), *b = alloc_rand(dt, n, 1), *w = alloc_rand(dt, D, 1), *y = malloc(cap * 4);
    double *ref = malloc(cap * 8), *mag = malloc(cap * 8);
    char name[64];
    pxl_add(dt, n, a, b, y);
    for (size_t i = 0; i < n; i++) ref[i] = (double)get(dt, a, i) + get(dt, b, i), mag[i] = fabs(get(dt, a, i)) + fabs(get(dt, b, i));
    snprintf(name, sizeof name, "add %s n=%zu", dt ? "bf16" : "f32", n);
    check(name, dt, n, y, ref, mag, 1e-7);
    pxl_silu_mul(dt, n, a, b, y);
    for (size_t i = 0; i < n; i++) {
        double g = get(dt, a, i);
        ref[i] = g / (1 + exp(-g)) * get(dt, b, i);
    }
    snprintf(name, sizeof name, "silu_mul %s n=%zu", dt ? "bf16" : "f32", n);
    check(name, dt, n, y, ref, NULL, 1e-6);
    pxl_rmsnorm(dt, T, D, a, w, 1e-5f, y);
    for (size_t t = 0; t < T; t++) {
        double ss = 0;
        for (size_t d = 0; d < D; d++) ss += (double)get(dt, a, t * D + d) * get(dt, a, t * D + d);
        for (size_t d = 0; d < D; d++) ref[t * D + d] = get(dt, w, d) * get(dt, a, t * D + d) / sqrt(ss / D + 1e-5);
    }
    snprintf(name, sizeof name, "rmsnorm %s T=%zu D=%zu", dt ? "bf16" : "f32", T, D);
    check(name, dt, n, y, ref, NULL, 1e-5);
    int64_t idx[5] = {3 % T, 0, (int64_t)T - 1, 1 % T, 0};
    pxl_gather(dt, 5, D, a, idx, y);
    for (size_t t = 0; t < 5; t++)
        for (size_t d = 0; d < D; d++) ref[t * D + d] = get(dt, a, idx[t] * D + d);
    snprintf(name, sizeof name, "gather %s D=%zu", dt ? "bf16" : "f32", D);
    check(name, dt, 5 * D, y, ref, NULL, 0);
    free(a); free(b); free(w); free(y); free(ref); free(mag);
}

/* the ops of the newer families (#24): LayerNorm (with and without bias), GeLU-mul, the three
 * activations, Scale (its factor rounded to dt), Softcap (also stored widened to fp32), and
 * grouped RMSNorm, which is pxl_rmsnorm on T * D/g rows of g */
static void test_new_rowwise(int dt, size_t T, size_t D) {
    size_t n = T * D;
    void *a = alloc_rand(dt, n, 4), *b = alloc_rand(dt, n, 1), *w = alloc_rand(dt, D, 1), *bias = alloc_rand(dt, D, 1);
    void *y = malloc(n * 4);
    float *y32 = malloc(n * 4);
    double *ref = malloc(n * 8), *mag = malloc(n * 8);
    const char *dn = dt ? "bf16" : "f32";
    char name[80];
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        for (size_t i = 0; i < n; i++) ((float *)y)[i] = 0;
        pxl_layer_norm(dt, T, D, a, w, with_bias ? bias : NULL, 1e-5f, y);
        for (size_t t = 0; t < T; t++) {
            double m = 0, var = 0;
            for (size_t d = 0; d < D; d++) m += get(dt, a, t * D + d);
            m /= D;
            for (size_t d = 0; d < D; d++) var += (get(dt, a, t * D + d) - m) * (get(dt, a, t * D + d) - m);
            for (size_t d = 0; d < D; d++) {
                double norm = (get(dt, a, t * D + d) - m) / sqrt(var / D + 1e-5) * get(dt, w, d);
                double shift = with_bias ? get(dt, bias, d) : 0;
                ref[t * D + d] = norm + shift;
                /* the bias can cancel the normed term: the error scales with the terms, not the sum */
                mag[t * D + d] = fabs(norm) + fabs(shift);
            }
        }
        snprintf(name, sizeof name, "layer_norm %s T=%zu D=%zu bias=%d", dn, T, D, with_bias);
        check(name, dt, n, y, ref, mag, 1e-5);
    }
    pxl_gelu_mul(dt, n, a, b, y);
    for (size_t i = 0; i < n; i++) {
        double g = get(dt, a, i);
        ref[i] = 0.5 * g * (1 + tanh(sqrt(2 / M_PI) * (g + 0.044715 * g * g * g))) * get(dt, b, i);
    }
    snprintf(name, sizeof name, "gelu_mul %s n=%zu", dn, n);
    check(name, dt, n, y, ref, NULL, 1e-6);
    const char *kinds[] = {"relu", "gelu", "gelu_tanh"};
    for (int kind = PXL_ACT_RELU; kind <= PXL_ACT_GELU_TANH; kind++) {
        pxl_activation(dt, kind, n, a, y);
        for (size_t i = 0; i < n; i++) {
            double x = get(dt, a, i);
            ref[i] = kind == PXL_ACT_RELU ? (x > 0 ? x : 0)
                     : kind == PXL_ACT_GELU ? 0.5 * x * (1 + erf(x / sqrt(2)))
                                            : 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
        }
        snprintf(name, sizeof name, "activation %s %s n=%zu", kinds[kind], dn, n);
        check(name, dt, n, y, ref, NULL, 1e-6);
    }
    float factor = sqrtf(2048.0f);
    pxl_scale(dt, n, a, factor, y);
    for (size_t i = 0; i < n; i++) ref[i] = (double)get(dt, a, i) * rnd(dt, factor);
    snprintf(name, sizeof name, "scale %s n=%zu", dn, n);
    check(name, dt, n, y, ref, NULL, 1e-7);
    pxl_softcap(dt, n, a, 3.0f, y);
    for (size_t i = 0; i < n; i++) ref[i] = 3.0 * tanh(get(dt, a, i) / 3.0);
    snprintf(name, sizeof name, "softcap %s n=%zu", dn, n);
    check(name, dt, n, y, ref, NULL, 1e-6);
    pxl_softcap_to(dt, PXL_F32, n, a, 3.0f, y32); /* the logits: dt's values, widened */
    for (size_t i = 0; i < n; i++) ref[i] = rnd(dt, (float)(3.0 * tanh(get(dt, a, i) / 3.0)));
    snprintf(name, sizeof name, "softcap to f32 %s n=%zu", dn, n);
    check(name, PXL_F32, n, y32, ref, NULL, dt ? 1.0 / 256 : 1e-6);
    if (D % 4 == 0) { /* per-head norm: 4 groups of D/4, each its own mean of squares */
        size_t g = D / 4;
        pxl_rmsnorm(dt, T * 4, g, a, w, 1e-6f, y);
        for (size_t r = 0; r < T * 4; r++) {
            double ss = 0;
            for (size_t d = 0; d < g; d++) ss += (double)get(dt, a, r * g + d) * get(dt, a, r * g + d);
            for (size_t d = 0; d < g; d++) ref[r * g + d] = get(dt, w, d) * get(dt, a, r * g + d) / sqrt(ss / g + 1e-6);
        }
        snprintf(name, sizeof name, "rmsnorm groups %s T=%zu D=%zu", dn, T, D);
        check(name, dt, n, y, ref, NULL, 1e-5);
    }
    free(a); free(b); free(w); free(bias); free(y); free(y32); free(ref); free(mag);
}

static void test_rope(int dt, size_t T, size_t H, size_t hd) {
    size_t P = 64, half = hd / 2, n = T * H * hd;
    void *x = alloc_rand(dt, n, 1), *y = malloc(n * 4), *c = malloc(P * hd * 4), *s = malloc(P * hd * 4);
    double *ref = malloc(n * 8), *mag = malloc(n * 8);
    int64_t *pos = malloc(T * 8);
    for (size_t p = 0; p < P; p++)
        for (size_t i = 0; i < hd; i++) {
            double ang = p / pow(10000.0, (double)(2 * (i % half)) / hd);
            float cv = (float)cos(ang), sv = (float)sin(ang);
            if (dt) ((uint16_t *)c)[p * hd + i] = to_bf16(cv), ((uint16_t *)s)[p * hd + i] = to_bf16(sv);
            else ((float *)c)[p * hd + i] = cv, ((float *)s)[p * hd + i] = sv;
        }
    for (size_t t = 0; t < T; t++) pos[t] = rand() % P;
    for (size_t t = 0; t < T; t++)
        for (size_t h = 0; h < H; h++)
            for (size_t i = 0; i < hd; i++) {
                size_t o = (t * H + h) * hd;
                double rot = i < half ? -get(dt, x, o + i + half) : get(dt, x, o + i - half);
                ref[o + i] = get(dt, x, o + i) * get(dt, c, pos[t] * hd + i) + rot * get(dt, s, pos[t] * hd + i);
                mag[o + i] = fabs(get(dt, x, o + i)) + fabs(rot);
            }
    pxl_rope(dt, T, H, hd, x, pos, c, s, y);
    char name[64];
    snprintf(name, sizeof name, "rope %s T=%zu H=%zu hd=%zu", dt ? "bf16" : "f32", T, H, hd);
    check(name, dt, n, y, ref, mag, 1e-6);
    free(x); free(y); free(c); free(s); free(ref); free(mag); free(pos);
}

/* B sequences with the given query lengths and cached lengths, blocks shuffled; B = 3: a
 * decode and two prefill chunks; B = 12: decodes only (then each is one item for all KV heads).
 * causal 0 (an encoder's mask): every token sees all its sequence's keys, later ones included.
 * cdt: the caches' format (bf16 under fp32 q / k / v: this step's rows are rounded as stored) */
static void test_attention(int dt, int cdt, size_t H, size_t Hkv, size_t hd, size_t window, int B, float softcap, int causal) {
    enum { BS = 4, NBLK = 80 };
    int64_t qlen[12] = {1, 5, 9}, seq[12] = {13, 7, 9}, qsl[13] = {0}, tables[12 * 12], perm[NBLK];
    size_t MAXB = 6;
    if (B > 3)
        for (int b = 0; b < B; b++) qlen[b] = 1, seq[b] = 1 + (b * 7) % 23;
    if (B == 2) /* prefills over several 16-key blocks: a chunk after 8 cached keys, a whole prompt */
        qlen[0] = 37, seq[0] = 45, qlen[1] = 21, seq[1] = 21, MAXB = 12;
    for (int i = 0; i < NBLK; i++) perm[i] = i;
    for (int i = NBLK - 1; i > 0; i--) { int j = rand() % (i + 1); int64_t t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
    for (int i = 0; i < B * MAXB; i++) tables[i] = perm[i % NBLK];
    for (int b = 0; b < B; b++) qsl[b + 1] = qsl[b] + qlen[b];
    size_t T = qsl[B], row = Hkv * hd;
    void *q = alloc_rand(dt, T * H * hd, 1), *k = alloc_rand(dt, T * row, 1), *v = alloc_rand(dt, T * row, 1);
    void *kc = alloc_rand(cdt, NBLK * BS * row, 1), *vc = alloc_rand(cdt, NBLK * BS * row, 1), *y = malloc(T * H * hd * 4);
    int64_t slots[64];
    for (int b = 0; b < B; b++)
        for (int i = 0; i < qlen[b]; i++) {
            int64_t p = seq[b] - qlen[b] + i;
            slots[qsl[b] + i] = tables[b * MAXB + p / BS] * BS + p % BS;
        }
    slots[1] = -1; /* a padding token: its k/v must not be written (its own output is unused) */
    double *ref = malloc(T * H * hd * 8);
    float scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < qlen[b]; i++) {
            size_t t = qsl[b] + i, pos = seq[b] - qlen[b] + i, lo = window && pos + 1 > window ? pos + 1 - window : 0;
            size_t hi = causal ? pos + 1 : (size_t)seq[b]; /* keys [lo, hi) */
            for (size_t h = 0; h < H; h++) {
                size_t kvh = h / (H / Hkv);
                double sc[64], mx = -1e300, sum = 0;
                for (size_t j = lo; j < hi; j++) {
                    size_t slot = tables[b * MAXB + j / BS] * BS + j % BS, src = slot * row + kvh * hd;
                    int64_t own = -1; /* written this step? then the value comes from k, not the old cache */
                    for (size_t u = 0; u < T; u++) if (slots[u] == (int64_t)slot) own = u;
                    double s = 0;
                    for (size_t d = 0; d < hd; d++)
                        s += (double)get(dt, q, (t * H + h) * hd + d) *
                             (own >= 0 ? in_fmt(cdt, get(dt, k, own * row + kvh * hd + d)) : get(cdt, kc, src + d));
                    s *= scale;
                    if (softcap > 0) s = softcap * tanh(s / softcap);
                    sc[j - lo] = s, mx = sc[j - lo] > mx ? sc[j - lo] : mx;
                }
                for (size_t j = lo; j < hi; j++) sc[j - lo] = exp(sc[j - lo] - mx), sum += sc[j - lo];
                for (size_t d = 0; d < hd; d++) {
                    double o = 0;
                    for (size_t j = lo; j < hi; j++) {
                        size_t slot = tables[b * MAXB + j / BS] * BS + j % BS;
                        int64_t own = -1;
                        for (size_t u = 0; u < T; u++) if (slots[u] == (int64_t)slot) own = u;
                        o += sc[j - lo] / sum * (own >= 0 ? in_fmt(cdt, get(dt, v, own * row + kvh * hd + d))
                                                          : get(cdt, vc, slot * row + kvh * hd + d));
                    }
                    ref[(t * H + h) * hd + d] = o;
                }
            }
        }
    pxl_paged_attention_mask(dt, cdt, T, B, H, Hkv, hd, q, k, v, kc, vc, BS, slots, tables, MAXB, seq, qsl, scale, softcap,
                             window, causal, y);
    for (size_t d = 0; d < H * hd; d++) ref[1 * H * hd + d] = get(dt, y, 1 * H * hd + d); /* padding row: unchecked */
    char name[96];
    snprintf(name, sizeof name, "paged_attention %s cache %s B=%d H=%zu Hkv=%zu hd=%zu window=%zu softcap=%g causal=%d",
             fmt_label(dt), fmt_label(cdt), B, H, Hkv, hd, window, softcap, causal);
    check(name, dt, T * H * hd, y, ref, NULL, dt ? 2e-2 : 1e-5); /* bf16: q.k rounded to bf16 inputs */
    if (dt == PXL_F32) { /* y as o_proj's bf16 rows (PXL_YR): the same values, rounded (the cache
                          * rows written again are the same) */
        size_t ld = PXL_LDXR(H * hd);
        uint16_t *yb = malloc(T * ld * 2);
        pxl_paged_attention_mask(dt | PXL_YR, cdt, T, B, H, Hkv, hd, q, k, v, kc, vc, BS, slots, tables, MAXB, seq,
                                 qsl, scale, softcap, window, causal, yb);
        int ok = 1;
        for (size_t t = 0; t < T; t++)
            for (size_t d = 0; t != 1 && d < H * hd; d++) ok &= yb[t * ld + d] == to_bf16(((float *)y)[t * H * hd + d]);
        if (ok) passed++;
        else printf("FAIL [%s] %s, y as bf16 rows\n", isa, name), failed++;
        free(yb);
    }
    free(q); free(k); free(v); free(kc); free(vc); free(y); free(ref);
}

/* batch invariance of attention: one sequence's tokens computed in one prefill (tiles of
 * several tokens), then again token by token as decodes and as a chunk starting mid-tile,
 * must give the same bits (a token's result may not depend on how its step was made up).
 * Promised in batch-invariant mode, and without it where no tile kernel sums the values
 * (AMX runs a prefill's weighted sums on tiles and a decode's in fp32 loops). */
static void test_attention_invariant_in(int mode, int dt, int cdt, size_t H, size_t Hkv, size_t hd);
static void test_attention_invariant(int dt, int cdt, size_t H, size_t Hkv, size_t hd) {
    test_attention_invariant_in(1, dt, cdt, H, Hkv, hd);
    if (!pxl_kernels()->attn_pv || cdt != PXL_BF16) test_attention_invariant_in(0, dt, cdt, H, Hkv, hd);
}
static void test_attention_invariant_in(int mode, int dt, int cdt, size_t H, size_t Hkv, size_t hd) {
    pxl_set_batch_invariant(mode);
    enum { N = 29, BS = 4, MAXB = 8 };
    size_t es = fmt_bytes(dt), ces = fmt_bytes(cdt), row = Hkv * hd, qrow = H * hd;
    int64_t tables[MAXB] = {5, 2, 7, 0, 3, 6, 1, 4}, slots[N], qsl[2] = {0, N}, seq = N;
    for (size_t p = 0; p < N; p++) slots[p] = tables[p / BS] * BS + p % BS;
    void *q = alloc_rand(dt, N * qrow, 1), *k = alloc_rand(dt, N * row, 1), *v = alloc_rand(dt, N * row, 1);
    void *kc = calloc(MAXB * BS * row, ces), *vc = calloc(MAXB * BS * row, ces);
    char *all = malloc(N * qrow * es), *one = malloc(N * qrow * es);
    float scale = 1.0f / sqrtf((float)hd);
    pxl_paged_attention(dt, cdt, N, 1, H, Hkv, hd, q, k, v, kc, vc, BS, slots, tables, MAXB, &seq, qsl, scale, 0, 0, all);
    size_t bad = N;
    for (size_t p = 0; p < N && bad == N; p++) { /* a decode at each position, its row rewritten */
        int64_t len = (int64_t)p + 1, qs1[2] = {0, 1};
        pxl_paged_attention(dt, cdt, 1, 1, H, Hkv, hd, (char *)q + p * qrow * es, (char *)k + p * row * es,
                            (char *)v + p * row * es, kc, vc, BS, slots + p, tables, MAXB, &len, qs1, scale, 0, 0, one);
        if (memcmp(one, all + p * qrow * es, qrow * es)) bad = p;
    }
    int64_t len = 15, qs5[2] = {0, 5}; /* tokens 10 .. 14 as one chunk: tiles that start at 10 */
    pxl_paged_attention(dt, cdt, 5, 1, H, Hkv, hd, (char *)q + 10 * qrow * es, (char *)k + 10 * row * es,
                        (char *)v + 10 * row * es, kc, vc, BS, slots + 10, tables, MAXB, &len, qs5, scale, 0, 0, one);
    int chunk_ok = !memcmp(one, all + 10 * qrow * es, 5 * qrow * es);
    if (bad == N && chunk_ok) passed++;
    else {
        printf("FAIL [%s] attention invariance (mode %d) %s cache %s H=%zu Hkv=%zu hd=%zu: %s\n", isa, mode,
               fmt_label(dt), fmt_label(cdt), H, Hkv, hd,
               bad < N ? "a decode differs from its prefill row" : "a chunk differs from its prefill rows");
        failed++;
    }
    free(q); free(k); free(v); free(kc); free(vc); free(all); free(one);
    pxl_set_batch_invariant(0);
}

/* sampling by inverse CDF: the token drawn for u must be drawable (not -inf) and have u
 * between the double-precision CDF before it and through it; a row alone draws the same
 * token as inside the batch; rows with no finite max give -1 */
static void test_sample(size_t R, size_t V) {
    size_t ld = V + 3;
    float *x = malloc(R * ld * sizeof(float)), *u = malloc(R * sizeof(float));
    int64_t *out = malloc(R * sizeof(int64_t)), one;
    for (size_t r = 0; r < R; r++) {
        for (size_t i = 0; i < V; i++) x[r * ld + i] = frand() * (r % 3 ? 8.0f : 0.5f);
        for (size_t i = r % 5; i < V; i += 3 + r % 4) x[r * ld + i] = -INFINITY; /* masked tokens */
        x[r * ld + (r * 7919) % V] = 1.0f; /* at least one drawable token */
        u[r] = r % 11 == 0 ? 0.0f : r % 11 == 1 ? 0.99999994f : (frand() + 1.0f) / 2.0f * 0.999f;
    }
    size_t nan_row = R > 3 ? 3 : R, inf_row = R > 4 ? 4 : R, masked_row = R > 5 ? 5 : R; /* (R: none) */
    if (nan_row < R) x[nan_row * ld + V / 2] = NAN;
    if (inf_row < R) x[inf_row * ld] = INFINITY;
    if (masked_row < R)
        for (size_t i = 0; i < V; i++) x[masked_row * ld + i] = -INFINITY;
    pxl_sample_rows(R, V, x, ld, u, out);
    char name[96];
    snprintf(name, sizeof name, "sample_rows R=%zu V=%zu", R, V);
    for (size_t r = 0; r < R; r++) {
        const float *row = x + r * ld;
        const char *why = NULL;
        pxl_sample_rows(1, V, row, ld, u + r, &one);
        if (one != out[r]) why = "differs alone and in the batch";
        if (r == nan_row || r == inf_row || r == masked_row) {
            if (!why && out[r] != -1) why = "a row without a finite max must give -1";
        } else if (!why && (out[r] < 0 || out[r] >= (int64_t)V || row[out[r]] == -INFINITY)) {
            why = "not a drawable token";
        } else if (!why) {
            double m = -INFINITY, total = 0, before = 0;
            for (size_t i = 0; i < V; i++) m = row[i] > m ? row[i] : m;
            for (size_t i = 0; i < V; i++) total += exp((double)row[i] - m);
            for (int64_t i = 0; i < out[r]; i++) before += exp((double)row[i] - m) / total;
            double through = before + exp((double)row[out[r]] - m) / total;
            if (!(before <= u[r] + 1e-5 && through >= u[r] - 1e-5)) why = "u is not inside the token's CDF step";
        }
        if (why) {
            printf("FAIL [%s] %s: row %zu got %lld: %s\n", isa, name, r, (long long)out[r], why);
            failed++;
            free(x), free(u), free(out);
            return;
        }
    }
    passed++;
    free(x), free(u), free(out);
}

/* MoE: T tokens, E experts (the last gets no token: its logit is far below), top_k, weights in
 * fmt (dense F32 / BF16 in dt, packed panels or Q8_0 blocks, each expert on its own); vs a
 * double reference on the exact (dequantised) weights, errors relative to the output's scale */
static void test_moe(int dt, int fmt, size_t T, size_t D, size_t F, size_t E, size_t k, int shared) {
    int base = fmt == PXL_BF16P ? PXL_BF16 : fmt == PXL_F32P ? PXL_F32 : fmt;
    if (fmt != base && !pxl_packed_bytes(base, F, D)) return; /* the set does not pack it */
    size_t ebg = fmt != base ? pxl_packed_bytes(base, F, D) : F * pxl_row_bytes(base, D);
    size_t ebd = fmt != base ? pxl_packed_bytes(base, D, F) : D * pxl_row_bytes(base, F);
    double *dg = malloc(E * F * D * 8), *du = malloc(E * F * D * 8), *dd = malloc(E * D * F * 8);
    char *wg = malloc(E * ebg + 64), *wu = malloc(E * ebg + 64), *wd = malloc(E * ebd + 64);
    for (size_t e = 0; e < E; e++) {
        void *g = make_weights(base, F, D, dg + e * F * D), *u = make_weights(base, F, D, du + e * F * D);
        void *d = make_weights(base, D, F, dd + e * D * F);
        if (fmt != base) {
            pxl_pack_weights(base, F, D, g, wg + e * ebg), pxl_pack_weights(base, F, D, u, wu + e * ebg);
            pxl_pack_weights(base, D, F, d, wd + e * ebd);
        } else {
            memcpy(wg + e * ebg, g, ebg), memcpy(wu + e * ebg, u, ebg), memcpy(wd + e * ebd, d, ebd);
        }
        free(g), free(u), free(d);
    }
    void *x = alloc_rand(dt, T * D, 1), *logits = alloc_rand(dt, T * E, 2), *sh = alloc_rand(dt, T * D, 1);
    void *sg = alloc_rand(dt, T, 2), *y = malloc(T * D * 4);
    for (size_t t = 0; t < T; t++) {
        if (dt) ((uint16_t *)logits)[t * E + E - 1] = to_bf16(-30);
        else ((float *)logits)[t * E + E - 1] = -30;
    }
    pxl_moe(dt, fmt, fmt, fmt, T, D, F, E, k, !shared, x, logits, wg, wu, wd, shared ? sh : NULL, shared ? sg : NULL,
            y);
    double *ref = malloc(T * D * 8), *h = malloc(F * 8), scale = 0;
    for (size_t t = 0; t < T; t++) {
        double p[64], total = 0, sel = 0;
        int used[64] = {0};
        for (size_t e = 0; e < E; e++) total += p[e] = exp(get(dt, logits, t * E + e));
        for (size_t d = 0; d < D; d++) ref[t * D + d] = 0;
        size_t ids[64];
        for (size_t j = 0; j < k; j++) { /* top k by probability */
            size_t best = E;
            for (size_t e = 0; e < E; e++) if (!used[e] && (best == E || p[e] > p[best])) best = e;
            used[best] = 1, ids[j] = best, sel += p[best] / total;
        }
        for (size_t j = 0; j < k; j++) {
            size_t e = ids[j];
            double w = p[e] / total / (shared ? 1 : sel);
            for (size_t f = 0; f < F; f++) {
                double g = 0, u = 0;
                for (size_t d = 0; d < D; d++) {
                    g += get(dt, x, t * D + d) * dg[(e * F + f) * D + d];
                    u += get(dt, x, t * D + d) * du[(e * F + f) * D + d];
                }
                h[f] = g / (1 + exp(-g)) * u;
            }
            for (size_t d = 0; d < D; d++) {
                double o = 0;
                for (size_t f = 0; f < F; f++) o += h[f] * dd[(e * D + d) * F + f];
                ref[t * D + d] += w * o;
            }
        }
        if (shared)
            for (size_t d = 0; d < D; d++)
                ref[t * D + d] += get(dt, sh, t * D + d) / (1 + exp(-get(dt, sg, t)));
        for (size_t d = 0; d < D; d++) scale = fmax(scale, fabs(ref[t * D + d]));
    }
    double *mag = malloc(T * D * 8);
    for (size_t i = 0; i < T * D; i++) mag[i] = scale;
    char name[96];
    snprintf(name, sizeof name, "moe %s fmt=%d T=%zu D=%zu F=%zu E=%zu k=%zu shared=%d", dt ? "bf16" : "f32", fmt, T, D,
             F, E, k, shared);
    /* bf16: x, the gate / up / down products and the sums each rounded; int8 x for quantised weights */
    check(name, dt, T * D, y, ref, mag, dt || PXL_IS_QUANT(base) ? 3e-2 : 1e-5);
    free(dg), free(du), free(dd), free(wg), free(wu), free(wd), free(x), free(logits), free(sh), free(sg), free(y);
    free(ref), free(h), free(mag);
}

int main(void) {
    const char *sets[] = {"generic", "avx2", "avx512", "avx512bf16", "amx", "rvv"};
    for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
        if (pxl_set_isa(sets[s]) != 0) { printf("skip %s: not supported by this CPU or build\n", sets[s]); continue; }
        isa = pxl_isa();
        int before = passed + failed;
        srand(1234);
        size_t shapes[][3] = {{1, 1, 1}, {1, 7, 13}, {3, 33, 65}, {5, 576, 576}, {1, 1536, 576}, {2, 4, 1536},
                              {65, 31, 130}, {130, 67, 96}, {4, 17, 33}};
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
            for (int fmt = PXL_F32; fmt <= PXL_BF16; fmt++)
                test_linear(fmt, fmt, shapes[i][0], shapes[i][1], shapes[i][2], i % 2);
        test_linear(PXL_F32, PXL_BF16, 3, 9, 70, 0);
        size_t qshapes[][3] = {{1, 1, 32}, {1, 7, 64}, {1, 576, 576}, {2, 37, 96}, {3, 40, 64}, {17, 70, 576}, {70, 33, 160}};
        for (size_t i = 0; i < sizeof qshapes / sizeof qshapes[0]; i++)
            for (int fmt = PXL_Q8_0; fmt < PXL_NFMT; fmt++)
                if (PXL_IS_QUANT(fmt)) test_linear(PXL_F32, fmt, qshapes[i][0], qshapes[i][1], qshapes[i][2], i == 3);
        /* repacked blocks: 1-8 tokens share loads, row tails inside a 16-row block, bf16 x */
        size_t rshapes[][3] = {{4, 16, 64}, {2, 1, 32}, {3, 49, 576}, {1, 200, 1536}, {4, 576, 576}, {7, 33, 576}};
        for (size_t i = 0; i < sizeof rshapes / sizeof rshapes[0]; i++)
            for (int fmt = PXL_Q8_0R; fmt <= PXL_Q4_1R; fmt++)
                test_linear(i % 2, fmt, rshapes[i][0], rshapes[i][1], rshapes[i][2], i == 2);
        test_linear(PXL_BF16, PXL_Q4_1R, 70, 70, 576, 1); /* prefill: dequantised from the repacked blocks */
        test_linear(PXL_F32, PXL_Q8_0R, 33, 40, 64, 0);
        test_linear(PXL_BF16, PXL_Q4_1, 5, 19, 96, 1);
        test_linear(PXL_BF16, PXL_Q8_0, 2, 19, 96, 1);
        pxl_set_batch_invariant(1); /* every T takes the int8 path */
        for (int fmt = PXL_Q8_0; fmt < PXL_NFMT; fmt++)
            if (PXL_IS_QUANT(fmt)) test_linear(PXL_F32, fmt, 17, 70, 576, 0);
        pxl_set_batch_invariant(0);
        for (int fmt = PXL_BF16P; fmt <= PXL_F32P; fmt++) { /* packed panels (the set's micro-kernel, or
                                                               the portable one): M, N and K tails */
            size_t odd = fmt == PXL_F32P; /* fp32 panels take odd K too; bf16 pairs need it even */
            size_t pshapes[][3] = {{1, 32, 64}, {1, 33, 576}, {5, 31, 2 + odd}, {12, 64, 130}, {13, 100, 576 + odd},
                                   {37, 65, 1536}, {300, 40, 96}, {257, 70, 64}, /* (> 256: two token chunks) */
                                   {40, 64, 4192}};                               /* (K over 2048: in blocks) */
            for (size_t i = 0; i < sizeof pshapes / sizeof pshapes[0]; i++)
                for (int dt = 0; dt < 2; dt++)
                    test_linear(dt, fmt, pshapes[i][0], pshapes[i][1], pshapes[i][2], i % 2);
            test_batch_invariant(fmt == PXL_BF16P, fmt, 37, 83, 578 - odd);
            test_batch_invariant(fmt == PXL_BF16P, fmt, 37, 83, 576); /* (AMX: K a multiple of 32) */
        }
        /* fp32 out over a long K: a step's rows in K blocks (AMX), each token alone in one pass */
        test_batch_invariant(PXL_F32, PXL_BF16P, 37, 83, 4192);
        test_batch_invariant(PXL_F32, PXL_BF16P, 300, 64, 2080);
        if (pxl_kernels()->gemm_bf16p_acc) /* columns enough for chunks taken in turn, block by block */
            test_batch_invariant(PXL_F32, PXL_BF16P, 260, 1024, 2080);
        if (pxl_packed_bytes(PXL_BF16, 1, 2))
            test_linear(PXL_BF16, PXL_Q8_0, 70, 70, 576, 1); /* dequantised panels packed (T >= 64) */
        test_quantize_x(32);
        test_quantize_x(576);
        if (pxl_kernels()->qr_bf16p)
            for (int fmt = PXL_Q8_0R; fmt <= PXL_Q4_1R; fmt++) {
                test_qr_bf16p(fmt, 32, 64, 0);
                test_qr_bf16p(fmt, 48, 576, 32); /* the second panel: rows 32-47 and their zero tail */
                test_qr_bf16p(fmt, 7, 96, 0);
            }
        for (int fmt = PXL_BF16P; fmt <= PXL_F32P; fmt++) /* one token to two token chunks, N tails */
            for (int dt = 0; dt < 2; dt++) {
                test_linear_silu(dt, fmt, 1, 64, 576);
                test_linear_silu(dt, fmt, 3, 70, 64);
                test_linear_silu(dt, fmt, 64, 1536, 576);
                test_linear_silu(dt, fmt, 300, 40, 130);
            }
        for (size_t T = 1; T <= 300; T = T * 4 + 2) test_bf16_rows(T, 576, 1536); /* 1, 6, 26, 106 */
        test_bf16_rows(70, 64, 96);
        test_bf16_rows(30, 64, 40); /* a gated panel of 8 columns: the store's general width */
        /* q, k and v as one: decode and prefill sizes, every format, with and without biases */
        size_t qkv[3] = {576, 192, 192}, two[2] = {64, 32};
        for (int fmt = PXL_F32; fmt <= PXL_Q4_1R; fmt++)
            for (int dt = 0; dt < 2; dt++) {
                test_linear_parts(dt, fmt, 1, 576, 3, qkv, dt);
                test_linear_parts(dt, fmt, 3, 576, 3, qkv, !dt);
                test_linear_parts(dt, fmt, 70, 576, 3, qkv, dt);
                test_linear_parts(dt, fmt, 5, 64, 2, two, 1);
            }
        for (int fmt = PXL_BF16; fmt <= PXL_Q4_1R; fmt++) /* decode and prefill sizes, every path
                                                              (K-quants: test_kquants.c) */
            for (int bias = 0; bias < 2; bias++) {
                test_linear_to(fmt, 3, 70, 576, bias);
                test_linear_to(fmt, 70, 33, 576, bias);
#ifdef __x86_64__ /* >= 4 MiB of logits: stored non-temporally, which only x86 builds do (and
                  * which under qemu would cost a quarter of test-rvv's time) */
                test_linear_to(fmt, 64, 16400, 64, bias);
#endif
            }
        if (!has_two_threads()) printf("skip linear 1 thread = 2: this build runs one thread\n");
        else
            for (int fmt = PXL_F32; fmt <= PXL_Q4_1R; fmt++) /* 64 x 576 x 1040: 4 or 5 chunks, one short */
                for (int dt = 0; dt < 2; dt++) test_linear_threads(dt, fmt, 64, 1040, 576);
        for (int fmt = PXL_F32; fmt <= PXL_Q4_1R; fmt++) {
            if (fmt == PXL_BF16P || fmt == PXL_F32P) continue; /* above, where the set packs */
            test_batch_invariant(fmt == PXL_BF16, fmt, 37, 83, PXL_IS_QUANT(fmt) ? 576 : 577);
            test_batch_invariant(PXL_F32, fmt, 9, 1536, PXL_IS_QUANT(fmt) ? 576 : 100);
        }
        /* the activation modes: bf16 panels at every T (decode too, batch invariant too) where
         * the set has them, int8 at every T; refused, with nothing changed, where it has not */
        if (pxl_set_quant_x(PXL_QX_BF16) != 0) {
            if (pxl_kernels()->qr_bf16p || pxl_quant_x() != PXL_QX_AUTO)
                printf("FAIL [%s] pxl_set_quant_x(bf16) refused or half done\n", isa), failed++;
        } else if (!pxl_kernels()->qr_bf16p) {
            printf("FAIL [%s] pxl_set_quant_x(bf16) taken without a qr_bf16p kernel\n", isa), failed++;
        }
        for (int mode = PXL_QX_INT8; mode <= PXL_QX_INT16_DECODE; mode++) {
            if (pxl_set_quant_x(mode) != 0) continue;
            for (int fmt = PXL_Q8_0R; fmt <= PXL_Q4_1R; fmt++) {
                test_linear(PXL_F32, fmt, 1, 70, 576, 1);
                test_linear(PXL_BF16, fmt, 3, 49, 576, 0);
                test_linear(PXL_BF16, fmt, 9, 70, 1536, 1); /* a 6-row tail; int8 x: token groups 8 + 1,
                                                               int16 (two planes a token): 4 + 4 + 1 */
                test_linear(PXL_F32, fmt, 15, 49, 576, 0); /* 8 + 7 (int16: 4 + 4 + 4 + 3) */
                test_linear(PXL_F32, fmt, 70, 33, 576, 0);
                test_linear_to(fmt, 3, 70, 576, 1);
                test_batch_invariant(PXL_F32, fmt, 37, 83, 576);
            }
        }
        if (pxl_set_quant_x(PXL_QX_INT16) != 0) /* every set: the int8 kernels twice */
            printf("FAIL [%s] pxl_set_quant_x(int16) refused\n", isa), failed++;
        for (int fmt = PXL_Q8_0; fmt <= PXL_Q4_1; fmt++) /* GGUF's layout: token by token, two planes */
            test_linear(PXL_F32, fmt, 3, 70, 576, 1);
        test_quantize_x16(576);
        if (pxl_set_quant_x(PXL_QX_AUTO) != 0 || pxl_set_quant_x(5) == 0 || pxl_set_quant_x(-1) == 0)
            printf("FAIL [%s] pxl_set_quant_x: auto refused or a bad mode taken\n", isa), failed++;
        for (int dt = 0; dt < 2; dt++) {
            test_rowwise(dt, 1, 1);
            test_rowwise(dt, 13, 577);
            test_new_rowwise(dt, 1, 1);
            test_new_rowwise(dt, 13, 577);
            test_new_rowwise(dt, 5, 4100); /* n past 4 * CHUNK: the team splits it */
            test_add_rmsnorm(dt, 1, 576);
            test_add_rmsnorm(dt, 64, 576);
            test_add_rmsnorm(dt, 7, 33);
            test_rope(dt, 1, 1, 2);
            test_rope(dt, 7, 9, 64);
            test_attention(dt, dt, 6, 2, 8, 0, 3, 0, 1);
            test_attention(dt, dt, 9, 3, 64, 0, 3, 0, 1);
            test_attention(dt, dt, 4, 4, 16, 3, 3, 0, 1);
            test_attention(dt, dt, 9, 3, 64, 0, 12, 0, 1);
            test_attention(dt, dt, 6, 2, 16, 5, 12, 0, 1);
            test_attention(dt, dt, 6, 2, 16, 0, 3, 0.5f, 1); /* a cap below the logits' size: it bends them */
            test_attention(dt, dt, 9, 3, 64, 4, 12, 1.0f, 1);
            test_attention(dt, dt, 6, 2, 8, 0, 3, 0, 0); /* bidirectional (BERT): hd 8 (scalar), 64 (two tiles) */
            test_attention(dt, dt, 12, 12, 64, 0, 3, 0, 0);
            test_attention(dt, dt, 9, 3, 16, 0, 12, 0, 0);
            test_attention_invariant(dt, dt, 9, 3, 64);
            test_attention_invariant(dt, dt, 8, 2, 32);
            test_attention_invariant(dt, dt, 4, 4, 16);
            test_attention_invariant(dt, dt, 6, 3, 24);
        }
        /* a bf16 model's 16-bit caches under fp32 activations: bf16 (vLLM's), f16
         * (kv_cache_dtype="float16"); prefills over several 16-key blocks, whose later tiles
         * reuse the blocks the tile kernels (AMX) laid out */
        for (int c = 0; c < 2; c++) {
            int cdt = c ? PXL_F16 : PXL_BF16;
            test_attention(PXL_F32, cdt, 9, 3, 64, 0, 3, 0, 1);
            test_attention(PXL_F32, cdt, 9, 3, 64, 4, 12, 1.0f, 1);
            test_attention(PXL_F32, cdt, 6, 2, 8, 0, 3, 0, 0);
            test_attention(PXL_F32, cdt, 9, 3, 64, 0, 2, 0, 1);
            test_attention(PXL_F32, cdt, 8, 2, 32, 20, 2, 0, 1);
            test_attention(PXL_F32, cdt, 12, 12, 64, 0, 2, 0, 0);
            test_attention(PXL_BF16, cdt, 9, 3, 64, 0, 2, 0, 1);
            test_attention_invariant(PXL_F32, cdt, 9, 3, 64);
            test_attention_invariant(PXL_F32, cdt, 8, 2, 32);
            test_attention_invariant(PXL_F32, cdt, 6, 3, 24);
        }
        test_f16_conversions();
        test_attention(PXL_F32, PXL_F16, 9, 3, 64, 0, 12, 0, 1);
        test_attention(PXL_F32, PXL_F16, 6, 2, 16, 0, 3, 0, 1);
        test_attention(PXL_BF16, PXL_F16, 9, 3, 64, 0, 3, 0, 1);
        for (int dt = 0; dt < 2; dt++) {
            test_moe(dt, dt ? PXL_BF16 : PXL_F32, 1, 64, 96, 5, 2, 0);
            test_moe(dt, dt ? PXL_BF16 : PXL_F32, 9, 64, 40, 6, 3, 1);
            test_moe(dt, dt ? PXL_BF16P : PXL_F32P, 7, 64, 70, 4, 2, 0);
            test_moe(dt, PXL_Q8_0, 3, 64, 96, 5, 2, 1);
            test_moe(dt, dt ? PXL_BF16 : PXL_F32, 1100, 16, 24, 4, 2, 0); /* 2200 rows: two chunks */
        }
        test_sample(1, 1);
        test_sample(7, 300);
        test_sample(64, 4099);
        printf("kernel set %s: %d checks\n", isa, passed + failed - before);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
