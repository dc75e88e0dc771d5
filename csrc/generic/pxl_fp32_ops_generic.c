/* Portable C kernels: the fallback on every CPU and the base the ISA files beat. */
#include <math.h>
#include <string.h>

#include "perfxlm_ops.h"

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

void pxl_sgemv(size_t N, size_t K, const float *W, const float *x, float *y) {
    for (size_t n = 0; n < N; n++) {
        const float *w = W + n * K;
        float acc[4] = {0, 0, 0, 0}; /* four chains: lets the compiler vectorise the dot */
        size_t k = 0;
        for (; k + 4 <= K; k += 4)
            for (int j = 0; j < 4; j++) acc[j] += w[k + j] * x[k + j];
        float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (; k < K; k++) s += w[k] * x[k];
        y[n] = s;
    }
}

void pxl_sgemm(size_t T, size_t N, size_t K, const float *X, const float *W, float *Y) {
    /* 4 output features at a time share each pass over a row of X */
    for (size_t t = 0; t < T; t++) {
        const float *x = X + t * K;
        size_t n = 0;
        for (; n + 4 <= N; n += 4) {
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            const float *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
            for (size_t k = 0; k < K; k++) {
                s0 += w0[k] * x[k]; s1 += w1[k] * x[k]; s2 += w2[k] * x[k]; s3 += w3[k] * x[k];
            }
            Y[t * N + n] = s0; Y[t * N + n + 1] = s1; Y[t * N + n + 2] = s2; Y[t * N + n + 3] = s3;
        }
        for (; n < N; n++) pxl_sgemv(1, K, W + n * K, x, Y + t * N + n);
    }
}

void pxl_rmsnorm(size_t T, size_t D, const float *x, const float *w, float eps, float *y) {
    for (size_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        float ss = 0;
        for (size_t d = 0; d < D; d++) ss += xr[d] * xr[d];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (size_t d = 0; d < D; d++) y[t * D + d] = w[d] * (xr[d] * r);
    }
}

void pxl_rope(size_t T, size_t H, size_t hd, const float *x, const int64_t *pos, const float *cos,
              const float *sin, float *y) {
    size_t half = hd / 2;
    for (size_t t = 0; t < T; t++) {
        const float *c = cos + pos[t] * hd, *s = sin + pos[t] * hd;
        for (size_t h = 0; h < H; h++) {
            const float *xh = x + (t * H + h) * hd;
            float *yh = y + (t * H + h) * hd;
            for (size_t i = 0; i < half; i++) {
                yh[i] = xh[i] * c[i] - xh[i + half] * s[i];
                yh[i + half] = xh[i + half] * c[i + half] + xh[i] * s[i + half];
            }
        }
    }
}

void pxl_silu_mul(size_t n, const float *gate, const float *up, float *y) {
    for (size_t i = 0; i < n; i++) y[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void pxl_add(size_t n, const float *a, const float *b, float *y) {
    for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}
