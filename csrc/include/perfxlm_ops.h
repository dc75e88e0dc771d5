/* perfxlm native kernels: the public C API, one entry point per graph op.
 *
 * Row-major everywhere. T = tokens, K = in features, N = out features, D = hidden size,
 * H / Hkv = query / KV heads, hd = head dim, B = sequences. Activations are float32 or
 * bfloat16 (`dt`); every op computes in float32 and rounds once on store. Linear weights
 * are (N, K), one output feature per row as in the ONNX graph and GGUF files, in one of
 * the formats below. Quantised weights keep GGUF's block layouts (32 weights a block):
 *   Q8_0: { fp16 d; int8  qs[32]; }            w = d * q
 *   Q4_0: { fp16 d; uint8 qs[16]; }            w = d * (nibble - 8)
 *   Q4_1: { fp16 d; fp16 m; uint8 qs[16]; }    w = d * nibble + m
 * where byte j holds weight j in its low nibble and weight j + 16 in its high one. Linear on
 * quantised weights quantises x to int8 per 32-block for its dot products (llama.cpp's
 * scheme) when T is small (decode), in batch-invariant mode, and at every T on repacked
 * blocks (PXL_Q*R below); otherwise larger T run on dequantised fp32 / bf16 panels.
 * Ops are multi-threaded inside (OpenMP) and pick their kernels from the CPU's features.
 */
#ifndef PERFXLM_OPS_H
#define PERFXLM_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "pxl_abi.h" /* the formats, PXL_QK, the compiled step (pxl_plan_run) */

#ifdef __cplusplus
extern "C" {
#endif

typedef struct { uint16_t d; int8_t qs[PXL_QK]; } pxl_block_q8_0;
typedef struct { uint16_t d; uint8_t qs[PXL_QK / 2]; } pxl_block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[PXL_QK / 2]; } pxl_block_q4_1;

/* runtime: which kernel set runs ("amx", "avx512bf16", "avx512", "avx2", "rvv", "generic") */
const char *pxl_isa(void);
/* force a kernel set (tests and benchmarks compare them); returns 0, or -1 if this CPU lacks it */
int pxl_set_isa(const char *isa);
int pxl_num_threads(void);
void pxl_set_num_threads(int n);
/* pin the kernel threads, thread i to cpus[i % n] (the calling thread to cpus[0] while a
 * compiled step runs); returns 0, the number of threads that could not be pinned, or -1 for
 * a bad list */
int pxl_bind_threads(const int *cpus, int n);
/* commit fresh zero-filled memory now, each kernel thread its share of the pages */
void pxl_commit(void *p, size_t bytes);
/* batch invariance: every op's result for a token is bitwise independent of the other
 * tokens in the call (Linear on quantised weights then always takes the int8 dot-product
 * path; everything else already is). Off by default. */
void pxl_set_batch_invariant(int on);
int pxl_batch_invariant(void);
/* the activations quantised Linear weights (Q8_0 / Q4_0 / Q4_1 blocks; the K-quants' where
 * pxl_abi.h says) multiply (PXL_QX_*, pxl_abi.h). Returns -1 (and changes nothing) for a mode
 * the active kernel set cannot run: bf16 needs its qr_bf16p kernel. Process-wide, like the
 * above. */
int pxl_set_quant_x(int mode);
int pxl_quant_x(void);

/* y (T, N) = x (T, K) @ W (N, K)^T (+ bias (N,)); wfmt: any format above (quantised formats
 * need K % 32 == 0); x, bias, y in dt */
void pxl_linear(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W,
                const void *bias, void *y);
/* pxl_linear with y stored as odt, dt or PXL_F32: each value is the one pxl_linear gives in
 * dt, widened if need be (a bf16 model's logits for the sampler, which reads fp32, without a
 * conversion pass over them) */
void pxl_linear_to(int dt, int odt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *W,
                   const void *bias, void *y);
/* Several Linears of one x in one pass: y[i] (T, n[i]) = x (T, K) @ W_i (n[i], K)^T (+ bias_i),
 * with W the count weights stacked ((sum n, K), packed as one: q, k and v, say), bias likewise
 * (or NULL). Bitwise what pxl_linear gives for each, with x converted or quantised once and one
 * team over all the features. Every n[i] must be a multiple of PXL_PANEL. */
void pxl_linear_parts(int dt, int wfmt, size_t T, size_t K, int count, const size_t *n, const void *x, const void *W,
                      const void *bias, void *const *y);
/* Packed weights: a kernel set may run Linear fastest on a packed copy of W
 * (PXL_BF16P: 32-feature panels with K in pairs, [ceil(N/32)][K/2][32][2] bf16; PXL_F32P:
 * [ceil(N/32)][K][32] fp32; zero-padded). Quantised blocks repack 16 rows at a time,
 * [ceil(N/16)][K/32][16-row block] (PXL_Q*R, zero rows pad N): a 16-row block holds the 16
 * fp16 scales d, for Q4_1 the 16 fp16 mins m, then the quants as 64-byte vectors that each
 * hold 4 consecutive weights of all 16 rows (byte 4r + s: row r; Q4: low nibble weight
 * 8p + s, high nibble 8p + 4 + s of vector p; Q8_0: weight 4p + s stored + 128 as uint8),
 * so one int8 dot-product instruction serves 16 rows with x broadcast. Same bytes as GGUF.
 * pxl_packed_bytes(PXL_BF16 / PXL_F32 / PXL_Q8_0 / PXL_Q4_0 / PXL_Q4_1, N, K) is the size,
 * or 0 when the active set has no such kernel (or, for bf16, K is odd); pxl_pack_weights
 * fills it, then pass it to pxl_linear as PXL_BF16P / PXL_F32P / PXL_Q*R. */
size_t pxl_packed_bytes(int wfmt, size_t N, size_t K);
void pxl_pack_weights(int wfmt, size_t N, size_t K, const void *W, void *out);
/* The gated MLP's first half in one pass: y (T, N) = silu(x @ Wg^T) * (x @ Wu^T), each product
 * rounded to dt first, so bitwise what two pxl_linear calls and pxl_silu_mul give, without the
 * two (T, N) intermediates or a pass of their own. Wgu: gate and up packed by pxl_pack_gated
 * (wfmt PXL_BF16 or PXL_F32, where pxl_packed_bytes(wfmt, N, K) is not 0; it is twice that size):
 * panel j holds rows 16j .. 16j + 15 of gate, then the same rows of up; pass it as PXL_BF16P /
 * PXL_F32P. */
void pxl_pack_gated(int wfmt, size_t N, size_t K, const void *Wg, const void *Wu, void *out);
void pxl_linear_silu(int dt, int wfmt, size_t T, size_t N, size_t K, const void *x, const void *Wgu, void *y);
/* y (T, D) = table (V, D)[idx (T,)] */
void pxl_gather(int dt, size_t T, size_t D, const void *table, const int64_t *idx, void *y);
/* y (T, D) = w (D,) * x / sqrt(mean(x^2) + eps) */
void pxl_rmsnorm(int dt, size_t T, size_t D, const void *x, const void *w, float eps, void *y);
/* s (T, D) = a + b and y = rmsnorm(s) (from s in dt) in one pass: bitwise pxl_add, pxl_rmsnorm */
void pxl_add_rmsnorm(int dt, size_t T, size_t D, const void *a, const void *b, const void *w, float eps, void *s,
                     void *y);
/* y (T, H*hd) = x * cos[pos] + rotate_half(x) * sin[pos]; cos, sin (P, hd); halves layout */
void pxl_rope(int dt, size_t T, size_t H, size_t hd, const void *x, const int64_t *pos, const void *cos,
              const void *sin, void *y);
/* y (n,) = silu(gate) * up */
void pxl_silu_mul(int dt, size_t n, const void *gate, const void *up, void *y);
/* y (n,) = a + b */
void pxl_add(int dt, size_t n, const void *a, const void *b, void *y);
/* y (T, D) = (x - mean(x)) / sqrt(var(x) + eps) * w + b, w and b (D,), b may be NULL; the
 * statistics in float32 */
void pxl_layer_norm(int dt, size_t T, size_t D, const void *x, const void *w, const void *b, float eps, void *y);
/* y (n,) = gelu_tanh(gate) * up (GeGLU) */
void pxl_gelu_mul(int dt, size_t n, const void *gate, const void *up, void *y);
/* y (n,) = kind(x), kind PXL_ACT_RELU / PXL_ACT_GELU (erf) / PXL_ACT_GELU_TANH */
void pxl_activation(int dt, int kind, size_t n, const void *x, void *y);
/* y (n,) = x * factor, the factor rounded to dt first (HF's Gemma embedding normalizer) */
void pxl_scale(int dt, size_t n, const void *x, float factor, void *y);
/* y (n,) = cap * tanh(x / cap); _to stores in ydt: dt, or PXL_F32 holding dt's values */
void pxl_softcap(int dt, size_t n, const void *x, float cap, void *y);
void pxl_softcap_to(int dt, int ydt, size_t n, const void *x, float cap, void *y);
/* Sparse mixture of experts (SwiGLU experts): p = softmax(logits (T, E)) in float32; token t's
 * top_k experts e (ties: the lower index) with weights p_e, renormalised to sum 1 when
 * norm_topk_prob, give y[t] = sum_e p_e * (silu(x Wg[e]^T) * (x Wu[e]^T)) Wd[e]^T, summed in
 * ascending e, rounded to dt after each product and sum (torch's index_add_ in dt); with shared
 * (T, D) and shared_gate (T, 1) not NULL, y += sigmoid(shared_gate) * shared. Wg, Wu: E experts'
 * (F, D) weights back to back, Wd: (D, F) ones, each in its format (any pxl_linear format; a
 * packed one holds each expert packed on its own). Each expert's weights are read once a call for
 * all its tokens. 1 <= top_k <= min(E, 64). */
void pxl_moe(int dt, int fmt_gate, int fmt_up, int fmt_down, size_t T, size_t D, size_t F, size_t E, size_t top_k,
             int norm_topk_prob, const void *x, const void *logits, const void *Wg, const void *Wu, const void *Wd,
             const void *shared, const void *shared_gate, void *y);
/* LoRA on a Linear's output y_in (T, N) of x (T, K): y[t] = y_in[t] + scale[l] * (x[t] A[l]^T) B[l]^T
 * with l = ids[t] (-1 or >= L: y_in[t] as is); A (L, R, K), B (L, N, R), scale (L,) float32, the
 * product in float32 added once, rounded to dt. Tokens are grouped by slot, so each adapter's
 * weights are read once a call. y may be y_in. L <= 256. */
void pxl_lora(int dt, size_t T, size_t N, size_t K, size_t R, size_t L, const void *x, const void *y_in,
              const float *A, const float *B, const float *scale, const int64_t *ids, void *y);
/* Paged attention for a step of B sequences with T tokens in all (decode and prefill alike):
 * writes k, v (T, Hkv*hd) in dt into the caches (blocks, block_size, Hkv, hd) in cdt (PXL_F32,
 * PXL_BF16 or PXL_F16: a bf16 model's cache under fp32 activations) at slot_mapping (T,), then each
 * query token of sequence b (rows query_start_loc[b] .. [b+1]) attends causally to
 * that sequence's seq_lens[b] cached tokens through block_tables (B, max_blocks), keeping the
 * last `window` keys when window > 0; softcap > 0 caps the scaled logits s to
 * softcap * tanh(s / softcap) before the softmax (Gemma 2).  y (T, H*hd). */
void pxl_paged_attention(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                         const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                         const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                         const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                         size_t window, void *y);
/* The same with the mask chosen: causal 1 as above; causal 0 (an encoder's bidirectional attention)
 * has each query token of sequence b attend to all seq_lens[b] cached tokens (no window) */
void pxl_paged_attention_mask(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                              const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                              const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                              const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                              size_t window, int causal, void *y);
/* Sampling: out[r] = the first token i of logits row r (R, V; rows ld apart, float32) where the
 * running sum of softmax(row) passes u[r] in [0, 1); never a -inf token; -1 for a row whose max
 * is not finite (NaN, +inf, all -inf) */
void pxl_sample_rows(size_t R, size_t V, const float *logits, size_t ld, const float *u, int64_t *out);

/* Roofline probes (`perfxlm bench roofline`), on the kernel threads: the arithmetic done (2 per
 * multiply-add) by `iters` steps of every thread's register-resident chains, kind 0 fp32 FMA,
 * 1 bf16 pair-dot, 2 int8 quad-dot (0 where the CPU or build lacks the instruction); and a read
 * of `bytes` at p, each thread its share, returning a checksum of it */
double pxl_roofline_peak(int kind, size_t iters);
uint64_t pxl_roofline_read(const void *p, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
