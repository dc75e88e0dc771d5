/* Roofline probes for `perfxlm bench roofline`: this machine's memory read bandwidth and
 * its peak arithmetic rates, measured with the same threads the kernels use, the caller
 * pinned as in a plan run (else a floating caller can share a core with a pinned worker).
 *
 * Peaks run register-resident chains of one instruction (fp32 FMA, bf16 pair-dot, int8
 * quad-dot) on every thread: 12 independent accumulators cover the latency x throughput
 * of every x86 core we target; on the AMX kernel set the bf16 peak is that of tdpbf16ps, what its
 * GEMM runs on. On CPUs or builds without an ISA the probe returns 0. */
#include <string.h>

#include "pxl_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PXL_CLONES_READ __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PXL_CLONES_READ
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CHAINS 12
static volatile double sink; /* keeps the chains live */

__attribute__((target("avx512f"))) static double fma_f32(size_t iters) {
    __m512 a[CHAINS], x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm512_set1_ps((float)i);
    for (size_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_fmadd_ps(a[i], x, y);
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(a[i]);
    sink = s;
    return (double)iters * CHAINS * 16 * 2;
}
__attribute__((target("avx512f,avx512bf16"))) static double dot_bf16(size_t iters) {
    __m512 a[CHAINS];
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3f80);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm512_setzero_ps();
    for (size_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_dpbf16_ps(a[i], x, y);
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(a[i]);
    sink = s;
    return (double)iters * CHAINS * 32 * 2;
}
__attribute__((target("avx512f,avx512vnni"))) static double dot_int8(size_t iters) {
    __m512i a[CHAINS], x = _mm512_set1_epi8(1), y = _mm512_set1_epi8(1);
    for (int i = 0; i < CHAINS; i++) a[i] = _mm512_setzero_si512();
    for (size_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) a[i] = _mm512_dpbusd_epi32(a[i], x, y);
    long long s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_epi32(a[i]);
    sink = (double)s;
    return (double)iters * CHAINS * 64 * 2;
}
#endif

/* ops (2 per multiply-add) done by all threads: kind 0 fp32, 1 bf16, 2 int8; 0 if unsupported */
double pxl_roofline_peak(int kind, size_t iters) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    int ok = kind == 0   ? __builtin_cpu_supports("avx512f")
             : kind == 1 ? __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16")
                         : __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
    if (!ok) return 0;
    double total = 0;
    const int amx = kind == 1 && !strcmp(pxl_kernels()->isa, "amx");
    pxl_cpu_mask saved;
    int pinned = pxl_pin_caller(&saved);
#pragma omp parallel num_threads(pxl_num_threads()) reduction(+ : total)
    total += kind == 0 ? fma_f32(iters)
             : amx     ? pxl_amx_peak_bf16(iters)
             : kind == 1 ? dot_bf16(iters)
                         : dot_int8(iters);
    if (pinned) pxl_unpin_caller(&saved);
    return total;
#else
    (void)kind, (void)iters;
    return 0;
#endif
}

/* reads `bytes` of p on all threads (each its own contiguous share), as a GEMV streams its
 * weights; returns a checksum so nothing is optimised away */
PXL_CLONES_READ uint64_t pxl_roofline_read(const void *p, size_t bytes) {
    uint64_t total = 0;
    pxl_cpu_mask saved;
    int pinned = pxl_pin_caller(&saved);
#pragma omp parallel num_threads(pxl_num_threads()) reduction(^ : total)
    {
        size_t n0, n1, n = bytes / 64;
        pxl_split(n, 1, &n0, &n1);
        const uint64_t *q = p;
        uint64_t acc[8] = {0};
        for (size_t i = n0; i < n1; i++)
            for (int j = 0; j < 8; j++) acc[j] ^= q[i * 8 + j];
        for (int j = 0; j < 8; j++) total ^= acc[j];
    }
    if (pinned) pxl_unpin_caller(&saved);
    return total;
}
