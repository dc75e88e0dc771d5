/* The row-wise ops: Gather, RMSNorm, RoPE, SiLU-mul, Add, LayerNorm, GeLU-mul, Activation,
 * Scale, Softcap, in float32 or bfloat16.
 * Portable C that the compiler vectorises; on x86 each hot loop is cloned for AVX-512
 * and AVX2 and picked at load time (target_clones), so one source serves every ISA. */
#include <math.h>

#include "pxl_kernels.h"

PXL_INLINE float ld(int dt, const void *p, size_t i) {
    return dt == PXL_F32 ? ((const float *)p)[i] : pxl_bf16_to_f32(((const uint16_t *)p)[i]);
}
PXL_INLINE void st(int dt, void *p, size_t i, float v) {
    if (dt == PXL_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = pxl_f32_to_bf16(v);
}

/* [i0, i1) of an n-long row-wise op in chunks the team shares (none when n is small) */
#define CHUNK 4096

PXL_CLONES static void gather_rows(int dt, size_t t0, size_t t1, size_t D, const void *table, const int64_t *idx,
                                   void *y) {
    size_t row = D * (dt == PXL_F32 ? 4 : 2);
    for (size_t t = t0; t < t1; t++) memcpy((char *)y + t * row, (const char *)table + (size_t)idx[t] * row, row);
}
void pxl_gather(int dt, size_t T, size_t D, const void *table, const int64_t *idx, void *y) {
    int nth = 1; /* a memcpy per row: one thread when standalone */
    PXL_ON_TEAM(nth, {
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        gather_rows(dt, t0, t1, D, table, idx, y);
    });
}

PXL_INLINE void add_n(int dt, size_t i0, size_t i1, const void *a, const void *b, void *y) {
    for (size_t i = i0; i < i1; i++) st(dt, y, i, ld(dt, a, i) + ld(dt, b, i));
}

/* y = rmsnorm(x) in ydt: dt, or with PXL_YR fp32 values as bf16 */
PXL_INLINE void rmsnorm_row(int dt, int ydt, size_t D, const void *x, const void *w, float eps, void *y) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (size_t d = 0; d < D; d++) ss += ld(dt, x, d) * ld(dt, x, d);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (size_t d = 0; d < D; d++) st(ydt, y, d, ld(dt, w, d) * (ld(dt, x, d) * r));
}
/* (dt: with PXL_YR, y's rows are PXL_LDXR(D) apart) */
PXL_CLONES static void rmsnorm_rows(int dt, size_t t0, size_t t1, size_t D, const void *x, const void *w, float eps,
                                    void *y) {
    const int yr = dt & PXL_YR;
    dt = PXL_DT(dt);
    size_t es = dt == PXL_F32 ? 4 : 2, ldy = yr ? PXL_LDXR(D) * 2 : D * es;
    for (size_t t = t0; t < t1; t++) {
        const char *xr = (const char *)x + t * D * es;
        char *yrow = (char *)y + t * ldy;
        if (dt == PXL_F32 && yr) rmsnorm_row(PXL_F32, PXL_BF16, D, xr, w, eps, yrow);
        else if (dt == PXL_F32) rmsnorm_row(PXL_F32, PXL_F32, D, xr, w, eps, yrow);
        else rmsnorm_row(PXL_BF16, PXL_BF16, D, xr, w, eps, yrow);
    }
}
void pxl_rmsnorm(int dt, size_t T, size_t D, const void *x, const void *w, float eps, void *y) {
    int nth = T < 8 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        rmsnorm_rows(dt, t0, t1, D, x, w, eps, y);
    });
}

/* s = a + b, then y = rmsnorm(s) from s as stored (rounded to dt): the residual add and the
 * next norm in one pass, each row's sum still in L1 when the norm reads it back; bitwise
 * pxl_add then pxl_rmsnorm (PXL_YR: y as pxl_rmsnorm stores it so, s as before) */
PXL_CLONES static void add_rmsnorm_rows(int dt, size_t t0, size_t t1, size_t D, const void *a, const void *b,
                                        const void *w, float eps, void *s, void *y) {
    const int yr = dt & PXL_YR;
    dt = PXL_DT(dt);
    size_t es = dt == PXL_F32 ? 4 : 2, ldy = yr ? PXL_LDXR(D) * 2 : D * es;
    for (size_t t = t0; t < t1; t++) {
        const char *ar = (const char *)a + t * D * es, *br = (const char *)b + t * D * es;
        char *sr = (char *)s + t * D * es, *yrow = (char *)y + t * ldy;
        if (dt == PXL_F32 && yr) add_n(PXL_F32, 0, D, ar, br, sr), rmsnorm_row(PXL_F32, PXL_BF16, D, sr, w, eps, yrow);
        else if (dt == PXL_F32) add_n(PXL_F32, 0, D, ar, br, sr), rmsnorm_row(PXL_F32, PXL_F32, D, sr, w, eps, yrow);
        else add_n(PXL_BF16, 0, D, ar, br, sr), rmsnorm_row(PXL_BF16, PXL_BF16, D, sr, w, eps, yrow);
    }
}
void pxl_add_rmsnorm(int dt, size_t T, size_t D, const void *a, const void *b, const void *w, float eps, void *s,
                     void *y) {
    int nth = T < 8 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        add_rmsnorm_rows(dt, t0, t1, D, a, b, w, eps, s, y);
    });
}

PXL_INLINE void rope_rows(int dt, size_t t0, size_t t1, size_t H, size_t hd, const void *x, const int64_t *pos,
                          const void *cos, const void *sin, void *y) {
    size_t half = hd / 2;
    float r[hd]; /* a head's result, then stored: y may be x, and with the loads and stores of
                    both halves in one loop the compiler cannot vectorise it */
    for (size_t t = t0; t < t1; t++) {
        size_t c = (size_t)pos[t] * hd;
        for (size_t h = 0; h < H; h++) {
            size_t o = (t * H + h) * hd;
            for (size_t i = 0; i < half; i++)
                r[i] = ld(dt, x, o + i) * ld(dt, cos, c + i) - ld(dt, x, o + i + half) * ld(dt, sin, c + i);
            for (size_t i = half; i < hd; i++)
                r[i] = ld(dt, x, o + i) * ld(dt, cos, c + i) + ld(dt, x, o + i - half) * ld(dt, sin, c + i);
            for (size_t i = 0; i < hd; i++) st(dt, y, o + i, r[i]);
        }
    }
}
PXL_CLONES static void rope_range(int dt, size_t t0, size_t t1, size_t H, size_t hd, const void *x,
                                  const int64_t *pos, const void *cos, const void *sin, void *y) {
    if (dt == PXL_F32) rope_rows(PXL_F32, t0, t1, H, hd, x, pos, cos, sin, y);
    else rope_rows(PXL_BF16, t0, t1, H, hd, x, pos, cos, sin, y);
}
void pxl_rope(int dt, size_t T, size_t H, size_t hd, const void *x, const int64_t *pos, const void *cos,
              const void *sin, void *y) {
    int nth = T < 8 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        rope_range(dt, t0, t1, H, hd, x, pos, cos, sin, y);
    });
}

PXL_INLINE void silu_mul_n(int dt, size_t i0, size_t i1, const void *g, const void *u, void *y) {
    for (size_t i = i0; i < i1; i++) {
        st(dt, y, i, pxl_silu_mul1(ld(dt, g, i), ld(dt, u, i)));
    }
}
PXL_CLONES static void silu_mul_range(int dt, size_t i0, size_t i1, const void *gate, const void *up, void *y) {
    if (dt == PXL_F32) silu_mul_n(PXL_F32, i0, i1, gate, up, y);
    else silu_mul_n(PXL_BF16, i0, i1, gate, up, y);
}
/* bf16 through the kernel set's SiLU-mul (the one pxl_linear_silu's epilogue runs, so the fused
 * and unfused ops give the same bits), 32 values widened at a time */
PXL_CLONES static void silu_mul_bf16_range(pxl_silu_bf16_fn silu, size_t i0, size_t i1, const uint16_t *g,
                                           const uint16_t *u, uint16_t *y) {
    float gf[32], uf[32];
    for (size_t i = i0; i < i1; i += 32) {
        size_t m = i1 - i < 32 ? i1 - i : 32;
        for (size_t j = 0; j < m; j++) gf[j] = pxl_bf16_to_f32(g[i + j]), uf[j] = pxl_bf16_to_f32(u[i + j]);
        silu(m, gf, uf, y + i);
    }
}
void pxl_silu_mul(int dt, size_t n, const void *gate, const void *up, void *y) {
    int nth = n < 4 * CHUNK ? 1 : pxl_num_threads();
    pxl_silu_bf16_fn silu = dt == PXL_BF16 ? pxl_kernels()->silu_bf16 : NULL;
    PXL_ON_TEAM(nth, {
        size_t i0, i1;
        pxl_split(n, CHUNK, &i0, &i1);
        if (silu) silu_mul_bf16_range(silu, i0, i1, gate, up, y);
        else silu_mul_range(dt, i0, i1, gate, up, y);
    });
}

PXL_CLONES static void add_range(int dt, size_t i0, size_t i1, const void *a, const void *b, void *y) {
    if (dt == PXL_F32) add_n(PXL_F32, i0, i1, a, b, y);
    else add_n(PXL_BF16, i0, i1, a, b, y);
}
void pxl_add(int dt, size_t n, const void *a, const void *b, void *y) {
    int nth = n < 4 * CHUNK ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t i0, i1;
        pxl_split(n, CHUNK, &i0, &i1);
        add_range(dt, i0, i1, a, b, y);
    });
}

/* LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b (b may be NULL), the statistics in float32
 * over the row as stored (two passes: the centred variance, as torch computes it) */
PXL_INLINE void layer_norm_row(int dt, size_t D, const void *x, const void *w, const void *b, float eps, void *y) {
    float sum = 0, ss = 0;
#pragma omp simd reduction(+ : sum)
    for (size_t d = 0; d < D; d++) sum += ld(dt, x, d);
    float mean = sum / (float)D;
#pragma omp simd reduction(+ : ss)
    for (size_t d = 0; d < D; d++) ss += (ld(dt, x, d) - mean) * (ld(dt, x, d) - mean);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    if (b) for (size_t d = 0; d < D; d++) st(dt, y, d, (ld(dt, x, d) - mean) * r * ld(dt, w, d) + ld(dt, b, d));
    else for (size_t d = 0; d < D; d++) st(dt, y, d, (ld(dt, x, d) - mean) * r * ld(dt, w, d));
}
PXL_CLONES static void layer_norm_rows(int dt, size_t t0, size_t t1, size_t D, const void *x, const void *w,
                                       const void *b, float eps, void *y) {
    size_t es = dt == PXL_F32 ? 4 : 2;
    for (size_t t = t0; t < t1; t++) {
        const char *xr = (const char *)x + t * D * es;
        char *yr = (char *)y + t * D * es;
        if (dt == PXL_F32) layer_norm_row(PXL_F32, D, xr, w, b, eps, yr);
        else layer_norm_row(PXL_BF16, D, xr, w, b, eps, yr);
    }
}
void pxl_layer_norm(int dt, size_t T, size_t D, const void *x, const void *w, const void *b, float eps, void *y) {
    int nth = T < 8 ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t t0, t1;
        pxl_split(T, 1, &t0, &t1);
        layer_norm_rows(dt, t0, t1, D, x, w, b, eps, y);
    });
}

/* gelu_tanh(x) = x/2 (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the
 * sigmoid form has no cancellation near 0 and runs on pxl_exp, so its loops vectorise */
PXL_INLINE float gelu_tanh1(float x) {
    float u = 0.7978845608f * (x + 0.044715f * x * x * x);
    return x / (1.0f + pxl_exp(-2.0f * u));
}
PXL_INLINE float act1(int kind, float x) {
    switch (kind) {
    case PXL_ACT_RELU: return x > 0 ? x : 0.0f;
    case PXL_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678f));
    default: return gelu_tanh1(x);
    }
}

PXL_INLINE void gelu_mul_n(int dt, size_t i0, size_t i1, const void *g, const void *u, void *y) {
    for (size_t i = i0; i < i1; i++) st(dt, y, i, gelu_tanh1(ld(dt, g, i)) * ld(dt, u, i));
}
PXL_CLONES static void gelu_mul_range(int dt, size_t i0, size_t i1, const void *gate, const void *up, void *y) {
    if (dt == PXL_F32) gelu_mul_n(PXL_F32, i0, i1, gate, up, y);
    else gelu_mul_n(PXL_BF16, i0, i1, gate, up, y);
}
void pxl_gelu_mul(int dt, size_t n, const void *gate, const void *up, void *y) {
    int nth = n < 4 * CHUNK ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t i0, i1;
        pxl_split(n, CHUNK, &i0, &i1);
        gelu_mul_range(dt, i0, i1, gate, up, y);
    });
}

/* each kind an instance of its own, so the loop has no switch inside */
PXL_INLINE void act_n(int dt, int kind, size_t i0, size_t i1, const void *x, void *y) {
    for (size_t i = i0; i < i1; i++) st(dt, y, i, act1(kind, ld(dt, x, i)));
}
PXL_CLONES static void act_range(int dt, int kind, size_t i0, size_t i1, const void *x, void *y) {
#define PXL_ACT_DT(K)                                                                                                  \
    if (dt == PXL_F32) act_n(PXL_F32, K, i0, i1, x, y);                                                               \
    else act_n(PXL_BF16, K, i0, i1, x, y);
    if (kind == PXL_ACT_RELU) { PXL_ACT_DT(PXL_ACT_RELU) }
    else if (kind == PXL_ACT_GELU) { PXL_ACT_DT(PXL_ACT_GELU) }
    else { PXL_ACT_DT(PXL_ACT_GELU_TANH) }
#undef PXL_ACT_DT
}
void pxl_activation(int dt, int kind, size_t n, const void *x, void *y) {
    int nth = n < 4 * CHUNK ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t i0, i1;
        pxl_split(n, CHUNK, &i0, &i1);
        act_range(dt, kind, i0, i1, x, y);
    });
}

PXL_INLINE void scale_n(int dt, size_t i0, size_t i1, const void *x, float f, void *y) {
    for (size_t i = i0; i < i1; i++) st(dt, y, i, ld(dt, x, i) * f);
}
PXL_CLONES static void scale_range(int dt, size_t i0, size_t i1, const void *x, float f, void *y) {
    if (dt == PXL_F32) scale_n(PXL_F32, i0, i1, x, f, y);
    else scale_n(PXL_BF16, i0, i1, x, f, y);
}
void pxl_scale(int dt, size_t n, const void *x, float factor, void *y) {
    int nth = n < 4 * CHUNK ? 1 : pxl_num_threads();
    float f = dt == PXL_BF16 ? pxl_round_bf16(factor) : factor; /* HF's normalizer: a tensor in x's dtype */
    PXL_ON_TEAM(nth, {
        size_t i0, i1;
        pxl_split(n, CHUNK, &i0, &i1);
        scale_range(dt, i0, i1, x, f, y);
    });
}

/* y = cap * tanh(x / cap), stored in ydt: dt, or PXL_F32 holding dt's values (the logits) */
PXL_INLINE void softcap_n(int dt, int ydt, size_t i0, size_t i1, const void *x, float cap, void *y) {
    float inv = 1.0f / cap;
    for (size_t i = i0; i < i1; i++) {
        float v = cap * tanhf(ld(dt, x, i) * inv);
        st(ydt, y, i, ydt == dt ? v : pxl_round_bf16(v));
    }
}
PXL_CLONES static void softcap_range(int dt, int ydt, size_t i0, size_t i1, const void *x, float cap, void *y) {
    if (dt == PXL_F32) softcap_n(PXL_F32, PXL_F32, i0, i1, x, cap, y);
    else if (ydt == PXL_BF16) softcap_n(PXL_BF16, PXL_BF16, i0, i1, x, cap, y);
    else softcap_n(PXL_BF16, PXL_F32, i0, i1, x, cap, y);
}
void pxl_softcap_to(int dt, int ydt, size_t n, const void *x, float cap, void *y) {
    int nth = n < 4 * CHUNK ? 1 : pxl_num_threads();
    PXL_ON_TEAM(nth, {
        size_t i0, i1;
        pxl_split(n, CHUNK, &i0, &i1);
        softcap_range(dt, ydt, i0, i1, x, cap, y);
    });
}
void pxl_softcap(int dt, size_t n, const void *x, float cap, void *y) { pxl_softcap_to(dt, dt, n, x, cap, y); }
