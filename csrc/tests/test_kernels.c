/* Host kernel tests: every kernel against a double-precision scalar reference, on odd
 * shapes and tails. Ends with the line "N passed, N failed". */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "perfxlm_ops.h"

static int passed, failed;

static float frand(void) { return (float)rand() / (float)RAND_MAX * 2.0f - 1.0f; }

static void check(const char *what, size_t n, const float *got, const double *ref, const double *mag) {
    for (size_t i = 0; i < n; i++) {
        double tol = 1e-5 * (mag ? mag[i] : fabs(ref[i])) + 1e-6;
        if (!(fabs(got[i] - ref[i]) <= tol)) {
            printf("FAIL %s: [%zu] got %.9g want %.9g (tol %.3g)\n", what, i, got[i], ref[i], tol);
            failed++;
            return;
        }
    }
    passed++;
}

static uint16_t fp32_to_fp16(float f) { /* test-side encoder, round to nearest (normal range) */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000;
    int exp = (int)((b >> 23) & 0xff) - 127 + 15;
    uint32_t man = b & 0x7fffff;
    if (exp <= 0) return (uint16_t)sign;
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13);
    if (man & 0x1000) h++;
    return (uint16_t)h;
}

static void test_fp16(void) {
    struct { uint16_t h; float f; } cases[] = {{0x3c00, 1.0f}, {0xc000, -2.0f}, {0x7bff, 65504.0f},
                                               {0x0001, 5.9604645e-8f}, {0x3555, 0.33325195f}, {0, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (pxl_fp16_to_fp32(cases[i].h) != cases[i].f) {
            printf("FAIL fp16 0x%04x -> %g\n", cases[i].h, pxl_fp16_to_fp32(cases[i].h));
            failed++;
            return;
        }
    }
    if (!isinf(pxl_fp16_to_fp32(0x7c00))) { printf("FAIL fp16 inf\n"); failed++; return; }
    passed++;
}

static void test_gemv_gemm(size_t T, size_t N, size_t K) {
    float *W = malloc(N * K * 4), *X = malloc(T * K * 4), *Y = malloc(T * N * 4);
    double *ref = malloc(T * N * 8), *mag = malloc(T * N * 8);
    for (size_t i = 0; i < N * K; i++) W[i] = frand();
    for (size_t i = 0; i < T * K; i++) X[i] = frand();
    for (size_t t = 0; t < T; t++)
        for (size_t n = 0; n < N; n++) {
            double s = 0, m = 0;
            for (size_t k = 0; k < K; k++) { s += (double)W[n * K + k] * X[t * K + k]; m += fabs(W[n * K + k] * X[t * K + k]); }
            ref[t * N + n] = s; mag[t * N + n] = m;
        }
    char name[64];
    pxl_sgemv(N, K, W, X, Y);
    snprintf(name, sizeof name, "sgemv N=%zu K=%zu", N, K);
    check(name, N, Y, ref, mag);
    pxl_sgemm(T, N, K, X, W, Y);
    snprintf(name, sizeof name, "sgemm T=%zu N=%zu K=%zu", T, N, K);
    check(name, T * N, Y, ref, mag);
    free(W); free(X); free(Y); free(ref); free(mag);
}

/* quantise random weights into each block format, then compare the GEMV with a double
 * dot over the dequantised weights */
static void test_gemv_q(size_t N, size_t K) {
    size_t nb = K / PXL_QK;
    pxl_block_q8_0 *q8 = malloc(N * nb * sizeof *q8);
    pxl_block_q4_0 *q40 = malloc(N * nb * sizeof *q40);
    pxl_block_q4_1 *q41 = malloc(N * nb * sizeof *q41);
    float *x = malloc(K * 4), *y = malloc(N * 4);
    double *r8 = malloc(N * 8), *r40 = malloc(N * 8), *r41 = malloc(N * 8), *m8 = malloc(N * 8);
    for (size_t k = 0; k < K; k++) x[k] = frand();
    for (size_t n = 0; n < N; n++) {
        r8[n] = r40[n] = r41[n] = m8[n] = 0;
        for (size_t b = 0; b < nb; b++) {
            pxl_block_q8_0 *a = &q8[n * nb + b];
            pxl_block_q4_0 *c = &q40[n * nb + b];
            pxl_block_q4_1 *e = &q41[n * nb + b];
            a->d = fp32_to_fp16(0.01f + 0.02f * (frand() + 1));
            c->d = a->d;
            e->d = a->d;
            e->m = fp32_to_fp16(frand() * 0.1f);
            float d = pxl_fp16_to_fp32(a->d), m = pxl_fp16_to_fp32(e->m);
            for (int j = 0; j < PXL_QK; j++) {
                a->qs[j] = (int8_t)(rand() % 255 - 127);
                const float *xb = x + b * PXL_QK;
                r8[n] += (double)d * a->qs[j] * xb[j];
                m8[n] += fabs(d * a->qs[j] * xb[j]) + fabs(m * xb[j]) + 8 * fabs(d * xb[j]);
            }
            for (int j = 0; j < PXL_QK / 2; j++) {
                int lo = rand() % 16, hi = rand() % 16;
                c->qs[j] = e->qs[j] = (uint8_t)(lo | (hi << 4));
                const float *xb = x + b * PXL_QK;
                r40[n] += (double)d * (lo - 8) * xb[j] + (double)d * (hi - 8) * xb[j + 16];
                r41[n] += ((double)d * lo + m) * xb[j] + ((double)d * hi + m) * xb[j + 16];
            }
        }
    }
    char name[64];
    pxl_gemv_q8_0(N, K, q8, x, y);
    snprintf(name, sizeof name, "gemv_q8_0 N=%zu K=%zu", N, K);
    check(name, N, y, r8, m8);
    pxl_gemv_q4_0(N, K, q40, x, y);
    snprintf(name, sizeof name, "gemv_q4_0 N=%zu K=%zu", N, K);
    check(name, N, y, r40, m8);
    pxl_gemv_q4_1(N, K, q41, x, y);
    snprintf(name, sizeof name, "gemv_q4_1 N=%zu K=%zu", N, K);
    check(name, N, y, r41, m8);
    free(q8); free(q40); free(q41); free(x); free(y); free(r8); free(r40); free(r41); free(m8);
}

static void test_elementwise(size_t T, size_t D) {
    size_t n = T * D;
    float *a = malloc(n * 4), *b = malloc(n * 4), *w = malloc(D * 4), *y = malloc(n * 4);
    double *ref = malloc(n * 8);
    for (size_t i = 0; i < n; i++) { a[i] = frand() * 4; b[i] = frand(); }
    for (size_t d = 0; d < D; d++) w[d] = frand();
    pxl_add(n, a, b, y);
    for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
    check("add", n, y, ref, NULL);
    pxl_silu_mul(n, a, b, y);
    for (size_t i = 0; i < n; i++) ref[i] = a[i] / (1.0 + exp(-(double)a[i])) * b[i];
    check("silu_mul", n, y, ref, NULL);
    pxl_rmsnorm(T, D, a, w, 1e-5f, y);
    for (size_t t = 0; t < T; t++) {
        double ss = 0;
        for (size_t d = 0; d < D; d++) ss += (double)a[t * D + d] * a[t * D + d];
        for (size_t d = 0; d < D; d++) ref[t * D + d] = w[d] * a[t * D + d] / sqrt(ss / D + 1e-5);
    }
    check("rmsnorm", n, y, ref, NULL);
    free(a); free(b); free(w); free(y); free(ref);
}

static void test_rope(size_t T, size_t H, size_t hd) {
    size_t P = 64, half = hd / 2;
    float *x = malloc(T * H * hd * 4), *y = malloc(T * H * hd * 4), *c = malloc(P * hd * 4), *s = malloc(P * hd * 4);
    double *ref = malloc(T * H * hd * 8), *mag = malloc(T * H * hd * 8);
    int64_t *pos = malloc(T * 8);
    for (size_t p = 0; p < P; p++)
        for (size_t i = 0; i < hd; i++) {
            double ang = p / pow(10000.0, (double)(2 * (i % half)) / hd);
            c[p * hd + i] = (float)cos(ang); s[p * hd + i] = (float)sin(ang);
        }
    for (size_t i = 0; i < T * H * hd; i++) x[i] = frand();
    for (size_t t = 0; t < T; t++) pos[t] = rand() % P;
    for (size_t t = 0; t < T; t++)
        for (size_t h = 0; h < H; h++)
            for (size_t i = 0; i < hd; i++) {
                size_t o = (t * H + h) * hd;
                double rot = i < half ? -x[o + i + half] : x[o + i - half];
                ref[o + i] = x[o + i] * (double)c[pos[t] * hd + i] + rot * s[pos[t] * hd + i];
                mag[o + i] = fabs(x[o + i]) + fabs(rot);
            }
    pxl_rope(T, H, hd, x, pos, c, s, y);
    check("rope", T * H * hd, y, ref, mag);
    free(x); free(y); free(c); free(s); free(ref); free(mag); free(pos);
}

int main(void) {
    srand(1234);
    test_fp16();
    size_t shapes[][3] = {{1, 1, 1}, {1, 7, 13}, {3, 33, 65}, {5, 576, 576}, {2, 1536, 576}, {1, 4, 1536}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) test_gemv_gemm(shapes[i][0], shapes[i][1], shapes[i][2]);
    size_t qshapes[][2] = {{1, 32}, {7, 64}, {576, 576}, {1536, 576}, {3, 1536}};
    for (size_t i = 0; i < sizeof qshapes / sizeof qshapes[0]; i++) test_gemv_q(qshapes[i][0], qshapes[i][1]);
    test_elementwise(1, 1);
    test_elementwise(5, 577);
    test_rope(1, 1, 2);
    test_rope(7, 9, 64);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
