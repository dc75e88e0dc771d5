/* The binary contract between libperfxlm_kernels.so and its callers: the codes, struct
 * layouts and constants that the C files and the Python side (hw_plugins/cpu/library.py,
 * which binds the library with ctypes and mirrors them) must agree on. Everything here is
 * defined once; the C files include it through perfxlm_ops.h, the GPU sources through
 * cuda/pxl_gpu.h.
 *
 * pxl_abi() reports the values a caller can check at load time (library.py refuses a library
 * built for another ABI). Bump PXL_ABI_VERSION whenever a change here is not visible in those
 * values: a code renumbered, a field's meaning or type changed, a flag bit moved.
 */
#ifndef PXL_ABI_H
#define PXL_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PXL_ABI_VERSION 6

/* element / weight formats (activations are PXL_F32 or PXL_BF16; PXL_F16, IEEE binary16, is a
 * KV cache's format only) */
enum {
    PXL_F32 = 0, PXL_BF16 = 1, PXL_Q8_0 = 2, PXL_Q4_0 = 3, PXL_Q4_1 = 4, PXL_BF16P = 5, PXL_F32P = 6,
    PXL_Q8_0R = 7, PXL_Q4_0R = 8, PXL_Q4_1R = 9, /* Q8_0 / Q4_0 / Q4_1 repacked 16 rows a block */
    PXL_Q4_K = 10, PXL_Q5_K = 11, PXL_Q6_K = 12, /* GGUF K-quants: 256-value super-blocks, as stored */
    PXL_Q4_KR = 13, PXL_Q6_KR = 14, /* Q4_K / Q6_K repacked 16 rows a block (pxl_kquants.h) */
    PXL_F16 = 15,
    PXL_Q5_KR = 16, /* Q5_K repacked as Q4_KR, with the fifth bits apart (pxl_kquants.h); after F16,
                     * so that the codes before keep their values */
    PXL_NFMT = 17
};
/* Flags or'd into an fp32 op's activation format (an op's dt, a plan record's dt) for the rows a
 * Linear on packed bf16 weights (PXL_BF16P) reads: it rounds x to bf16 anyway, so the op before
 * can store x so, and the Linear skips a pass over it. PXL_XR: a Linear's (Linear parts',
 * Linear+SiluMul's) x comes as such rows; PXL_YR: an RMSNorm's (Add+RMSNorm's normed y,
 * Linear+SiluMul's, an attention's) y is stored as such rows. Such rows hold the fp32 values
 * rounded to bf16, PXL_LDXR(width) apart: an odd number of cache lines, so the rows a kernel
 * reads at once do not all fall in one L1 set. */
#define PXL_XR 256
#define PXL_YR 512
#define PXL_DT(dt) ((dt) & 0xff) /* the format without the flags */
#define PXL_LDXR(width) ((((size_t)(width) * 2 + 63) / 64 | 1) * 32)

/* the 32-value block formats (Q8_0 / Q4_0 / Q4_1, as stored or repacked); K-quants are apart:
 * their x is quantised per 256 (Q8_K) rather than per 32 */
#define PXL_IS_QUANT(f) (((f) >= PXL_Q8_0 && (f) <= PXL_Q4_1) || ((f) >= PXL_Q8_0R && (f) <= PXL_Q4_1R))
/* the repacked K-quants */
#define PXL_IS_KR(f) ((f) == PXL_Q4_KR || (f) == PXL_Q5_KR || (f) == PXL_Q6_KR)
#define PXL_IS_KQUANT(f) (((f) >= PXL_Q4_K && (f) <= PXL_Q6_K) || PXL_IS_KR(f))
/* the GGUF format of a repacked one */
#define PXL_QBASE(f) ((f) >= PXL_Q8_0R && (f) <= PXL_Q4_1R ? (f) - (PXL_Q8_0R - PXL_Q8_0) : (f))

/* the activations quantised weights multiply (pxl_set_quant_x): PXL_QX_AUTO, the kernel set's
 * faster path (int8 dot products; a prefill on AMX rounds x to bf16 against dequantised bf16
 * panels); PXL_QX_INT8, int8 per 32-block at every T; PXL_QX_BF16, bf16 x at every T, decode
 * included; PXL_QX_INT16, x quantised to 16 bits per 32-block where int8 would be (two int8
 * planes, twice the dot products); PXL_QX_INT16_DECODE, PXL_QX_INT16 for decode-sized T and
 * a prefill as bf16 panels on every set that has them (AVX512-BF16 too: there vdpbf16ps
 * outruns the two int8 planes). K-quants take int8 per 256 (Q8_K) but for the panels of an
 * AMX prefill (PXL_QX_AUTO) or any prefill (PXL_QX_BF16, PXL_QX_INT16_DECODE) and x's 16 bits
 * (PXL_QX_INT16, PXL_QX_INT16_DECODE) */
enum { PXL_QX_AUTO = 0, PXL_QX_INT8 = 1, PXL_QX_BF16 = 2, PXL_QX_INT16 = 3, PXL_QX_INT16_DECODE = 4 };
/* x at 16 bits where the int8 dot products run */
#define PXL_QX_IS_16(mode) ((mode) == PXL_QX_INT16 || (mode) == PXL_QX_INT16_DECODE)

/* weight layouts (perfxlm_ops.h describes them) */
#define PXL_QK 32       /* weights per quantisation block */
#define PXL_QK_K 256    /* weights per K-quant super-block */
#define PXL_QR_ROWS 16  /* rows per repacked block (PXL_Q*R) */
#define PXL_PANEL 32    /* features per PXL_BF16P / PXL_F32P panel */

/* A compiled step (pxl_plan_run): one record per node, every pointer fixed at compile time */
#define PXL_PLAN_MAX_PTRS 10
typedef struct {
    /* PXL_OP_*, activation format, weight format (Linears; MoE: gate | up << 8 | down << 16;
     * attention: the KV caches' format) */
    int32_t op, dt, wfmt;
    int32_t rows;         /* PXL_ROWS_N | PXL_NO_WAIT | PXL_OUT_F32 | PXL_NONCAUSAL */
    int64_t a, b, c, d, e; /* sizes, per op (pxl_plan.c's run_node) */
    float f0, f1;
    const void *p[PXL_PLAN_MAX_PTRS]; /* inputs, weights, caches, outputs, per op */
} pxl_plan_node;

/* plan op codes, in the order of library.py's PLAN_OPS (pxl_plan_profile reports them so) */
enum {
    PXL_OP_GATHER, PXL_OP_RMSNORM, PXL_OP_LINEAR, PXL_OP_ROPE, PXL_OP_ATTENTION, PXL_OP_SILU_MUL, PXL_OP_ADD,
    PXL_OP_LINEAR_SILU, PXL_OP_ADD_RMSNORM, PXL_OP_LAYER_NORM, PXL_OP_GELU_MUL, PXL_OP_ACTIVATION, PXL_OP_SCALE,
    PXL_OP_SOFTCAP, PXL_OP_MOE, PXL_OP_LORA, PXL_OP_LINEAR_PARTS,
    PXL_NOPS
};

/* Activation kinds (pxl_activation; the plan record's b), in the order of library.py's ACT_KINDS */
enum { PXL_ACT_RELU, PXL_ACT_GELU, PXL_ACT_GELU_TANH }; /* 0, 1, 2 */

/* pxl_plan_node.rows bits */
#define PXL_ROWS_N 1  /* the op runs on the step's N rows (the logits rows), else on its T tokens */
/* this Linear and the next share no buffer but their input (q / k / v, gate / up): in a step of
 * at most PXL_T_PRIVATE tokens, where each thread prepares its own copy of x, no thread waits for
 * the others between them */
#define PXL_NO_WAIT 2
#define PXL_OUT_F32 4 /* a Linear's (or Softcap's) y is fp32 holding dt's values (the logits: no conversion pass) */
#define PXL_NONCAUSAL 8 /* an attention's tokens see all their sequence's keys (an encoder's; PagedAttention causal 0) */

/* Up to this many tokens, Linear has every thread prepare (convert, quantise) x for itself, so
 * the team needs no barrier before the product; PXL_NO_WAIT relies on it */
#define PXL_T_PRIVATE 4

/* one step: T tokens, N logits rows, B sequences, block tables max_blocks wide */
void pxl_plan_run(const pxl_plan_node *nodes, size_t n, size_t T, size_t N, size_t B, size_t max_blocks);
/* Per-op time across steps (`perfxlm bench ... --profile-ops`): seconds[phase * PXL_NOPS + op] and
 * calls[...] for the op codes above, phase 0 for steps with prompt tokens and 1 for decode steps;
 * reading resets them, `on` starts or stops timing. */
void pxl_plan_profile(int on, double *seconds, int64_t *calls);

/* What this build of the library was compiled for */
typedef struct {
    int64_t version;   /* PXL_ABI_VERSION */
    int64_t node_size; /* sizeof(pxl_plan_node) */
    int64_t node_rows; /* offsetof(pxl_plan_node, rows) */
    int64_t node_a;    /* offsetof(pxl_plan_node, a) */
    int64_t node_f0;   /* offsetof(pxl_plan_node, f0) */
    int64_t node_p;    /* offsetof(pxl_plan_node, p) */
    int64_t node_ptrs; /* PXL_PLAN_MAX_PTRS */
    int64_t n_ops;     /* PXL_NOPS */
    int64_t n_formats; /* PXL_NFMT */
} pxl_abi_info;
/* fills the first `size` bytes of *out (at most sizeof(pxl_abi_info)): a caller built against an
 * older, shorter pxl_abi_info still gets the fields it knows */
void pxl_abi(pxl_abi_info *out, size_t size);

#ifdef __cplusplus
}
#endif
#endif
