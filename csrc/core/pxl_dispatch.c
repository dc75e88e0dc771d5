/* Runtime kernel selection from the CPU's features (cpuid on x86, hwcap on RISC-V) and
 * per-thread scratch memory (the thread team: pxl_threads.c). The generic C set is always there;
 * $PXL_ISA or pxl_set_isa() forces another set (tests compare them all). */
#include <stdlib.h>
#include <string.h>
#if defined(__riscv) && defined(__linux__)
#include <sys/auxv.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#include "pxl_kernels.h"

#if defined(__x86_64__)
const pxl_kernel_set pxl_kernels_avx2 = {
    .isa = "avx2", .rm = 4, .rn = 2, .gemv_rn = 4, .tile_f32 = pxl_tile_f32_avx2, .tile_bf16 = pxl_tile_bf16_avx2};
const pxl_kernel_set pxl_kernels_avx512 = {
    .isa = "avx512", .rm = 4, .rn = 4, .gemv_rn = 8, .tile_f32 = pxl_tile_f32_avx512, .tile_bf16 = pxl_tile_bf16_avx512,
    .gemm_f32p = pxl_gemm_f32p_avx512};
const pxl_kernel_set pxl_kernels_avx512bf16 = {
    .isa = "avx512bf16", .vnni = 1, .rm = 4, .rn = 4, .gemv_rn = 8, .tile_f32 = pxl_tile_f32_avx512,
    .tile_bf16 = pxl_tile_bf16_avx512bf16, .gemm_bf16p = pxl_gemm_bf16p_avx512bf16,
    .gemm_bf16p_bf16 = pxl_gemm_bf16p_bf16_avx512bf16, .gemm_bf16p_silu = pxl_gemm_bf16p_silu_avx512bf16,
    .gemm_bf16p_wide_nt = pxl_gemm_bf16p_wide_avx512bf16,
    .gemm_f32p = pxl_gemm_f32p_avx512, .silu_bf16 = pxl_silu_mul_bf16_avx512bf16,
    .qr_bf16p = pxl_qr_bf16p_avx512bf16, .gemv_qr_bf16 = pxl_gemv_qr_bf16_avx512bf16};
/* the AVX512-BF16 set with the packed bf16 GEMM on AMX tiles, which a prefill on repacked
 * blocks takes too (6 TFLOP/s of bf16 tiles against 1.6 TOP/s of vpdpbusd) */
const pxl_kernel_set pxl_kernels_amx = {
    .isa = "amx", .vnni = 1, .rm = 4, .rn = 4, .gemv_rn = 8, .tile_f32 = pxl_tile_f32_avx512,
    .tile_bf16 = pxl_tile_bf16_avx512bf16, .gemm_bf16p = pxl_gemm_bf16p_amx,
    .gemm_bf16p_bf16 = pxl_gemm_bf16p_bf16_amx, .gemm_bf16p_silu = pxl_gemm_bf16p_silu_amx,
    .gemm_bf16p_wide_nt = pxl_gemm_bf16p_wide_amx, .gemm_bf16p_acc = pxl_gemm_bf16p_acc_amx,
    .gemm_f32p = pxl_gemm_f32p_avx512, .silu_bf16 = pxl_silu_mul_bf16_avx512bf16, .bf16p_rm = PXL_AMX_RM,
    .qr_bf16p = pxl_qr_bf16p_avx512bf16, .qr_bf16p_prefill = 1, .gemv_qr_bf16 = pxl_gemv_qr_bf16_avx512bf16,
    .attn_config = pxl_attn_config_amx, .attn_kt = pxl_attn_kt_amx, .attn_qk = pxl_attn_qk_amx,
    .attn_vt = pxl_attn_vt_amx, .attn_pv = pxl_attn_pv_amx};

/* AMX-TILE and AMX-BF16 (cpuid leaf 7 edx bits 24, 22), and Linux's leave to use the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once per process; without it the first tile
 * instruction faults) */
static int amx_usable(void) {
    static int usable = -1;
    if (usable < 0) {
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        usable = (d >> 24 & 1) && (d >> 22 & 1);
#if defined(__linux__)
        if (usable) usable = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
        usable = 0;
#endif
    }
    return usable;
}
#endif

static const pxl_kernel_set *const all_sets[] = {
#if defined(__x86_64__)
    &pxl_kernels_amx, &pxl_kernels_avx512bf16, &pxl_kernels_avx512, &pxl_kernels_avx2,
#endif
#if defined(PXL_HAVE_RVV)
    &pxl_kernels_rvv,
#endif
    &pxl_kernels_generic,
};

static int cpu_has(const pxl_kernel_set *ks) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    if (ks == &pxl_kernels_avx2) return avx2;
    if (ks == &pxl_kernels_avx512) return avx512;
    /* every AVX512-BF16 CPU (Cooper Lake, Sapphire Rapids, Zen 4) has VNNI */
    int bf16 = avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
    if (ks == &pxl_kernels_avx512bf16) return bf16;
    if (ks == &pxl_kernels_amx) return bf16 && amx_usable();
#endif
#if defined(PXL_HAVE_RVV)
    if (ks == &pxl_kernels_rvv) {
#if defined(__linux__)
        return (getauxval(AT_HWCAP) >> ('V' - 'A')) & 1;
#else
        return 1;
#endif
    }
#endif
    return ks == &pxl_kernels_generic;
}

static const pxl_kernel_set *active;

/* the kernel sets' quantised GEMVs fall back to the generic ones where a set has none */
static pxl_kernel_set merged;

static void activate(const pxl_kernel_set *ks) {
    merged = *ks;
#if defined(__x86_64__)
    /* int8 dot products: vpdpbusd where the set implies VNNI, else vpmaddubsw (AVX2 and AVX-512F) */
    const pxl_gemv_q_fn *q = ks->vnni ? pxl_gemv_q_avx512vnni
                             : ks == &pxl_kernels_generic   ? NULL
                                                            : pxl_gemv_q_avx2;
    for (int f = 0; q && f < PXL_NFMT; f++) merged.gemv_q[f] = q[f];
    /* 16-row repacked blocks: 512-bit vectors only (AVX2 keeps GGUF's layout) */
    const pxl_gemv_qr_fn *qr = ks->vnni ? pxl_gemv_qr_avx512vnni
                               : ks == &pxl_kernels_avx512   ? pxl_gemv_qr_avx512
                                                             : NULL;
    for (int f = 0; qr && f < PXL_NFMT; f++) merged.gemv_qr[f] = qr[f];
    for (int f = 0; ks->vnni && f < PXL_NFMT; f++) merged.gemm_qr[f] = pxl_gemm_qr_avx512vnni[f];
#endif
    for (int f = 0; f < PXL_NFMT; f++)
        if (!merged.gemv_q[f]) merged.gemv_q[f] = pxl_kernels_generic.gemv_q[f];
    if (!merged.tile_bf16) merged.tile_bf16 = pxl_kernels_generic.tile_bf16;
    active = &merged;
}

int pxl_set_isa(const char *isa) {
    for (size_t i = 0; i < sizeof all_sets / sizeof all_sets[0]; i++)
        if (!strcmp(all_sets[i]->isa, isa)) {
            if (!cpu_has(all_sets[i])) return -1;
            activate(all_sets[i]);
            return 0;
        }
    return -1;
}

const pxl_kernel_set *pxl_kernels(void) {
    if (!active) {
        const char *want = getenv("PXL_ISA");
        if (!want || pxl_set_isa(want) != 0)
            for (size_t i = 0; i < sizeof all_sets / sizeof all_sets[0]; i++)
                if (cpu_has(all_sets[i])) { activate(all_sets[i]); break; }
    }
    return active;
}

const char *pxl_isa(void) { return pxl_kernels()->isa; }

static int batch_invariant;
void pxl_set_batch_invariant(int on) { batch_invariant = on != 0; }
int pxl_batch_invariant(void) { return batch_invariant; }

static int quant_x = PXL_QX_AUTO;
int pxl_set_quant_x(int mode) {
    if (mode < PXL_QX_AUTO || mode > PXL_QX_INT16_DECODE || (mode == PXL_QX_BF16 && !pxl_kernels()->qr_bf16p)) return -1;
    quant_x = mode;
    return 0;
}
int pxl_quant_x(void) { return quant_x; }

void *pxl_scratch(int slot, size_t bytes) {
    static __thread void *buf[PXL_SCRATCH_SLOTS];
    static __thread size_t cap[PXL_SCRATCH_SLOTS];
    if (cap[slot] < bytes) {
        free(buf[slot]);
        cap[slot] = (bytes + (bytes >> 2) + 4096 + 63) & ~(size_t)63;
        buf[slot] = aligned_alloc(64, cap[slot]);
    }
    return buf[slot];
}
