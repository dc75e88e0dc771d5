/* The work of one decoded token and one prefill chunk of SmolLM2-135M, each piece between
 * instruction-count markers, for benchmarks/rvv_instruction_counts.sh: under qemu-riscv64 with
 * the insn_count plugin (riscv/qemu_plugin/insn_count.c) every region's retired instructions
 * are counted, so kernel sets compare by work where no RISC-V silicon can be timed.
 *
 *   count_driver SET [-f FMTS] [-p PHASES] [-l LIBOPENBLAS]
 *     SET      rvv | generic (our kernels, pxl_set_isa) | openblas (cblas_sgemv / cblas_sgemm)
 *     FMTS     weight formats, comma-separated: f32,bf16,q8_0,q4_1 (openblas: f32 only)
 *     PHASES   decode,prefill
 *
 * SmolLM2-135M: hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64, 30 layers, vocab
 * 49152. A layer's Linears are q and o (576 x 576), k and v (192 x 576), gate and up
 * (1536 x 576) and down (576 x 1536); same-shaped ones are measured once and counted per step
 * (per_step). Instruction counts do not depend on the weights' values, so one layer's
 * weights stand for all 30. Decode is T = 1; prefill is one chunk of T = 64 tokens, whose
 * logits come from the lm_head on its last token only (the decode lm_head region).
 * Attention (the same portable C in both of our kernel sets) runs a 512-token context for
 * decode and a 64-token prompt for prefill.
 *
 * Each region runs once, after a call of the same kind on 16 rows that leaves the scratch
 * buffers and OpenBLAS's work memory allocated, as in a running engine. One thread: the plugin's
 * counters are per process, and the count is the total work. Output, one line per region in
 * the order the plugin numbers them:
 *   region <i> set <SET> phase <decode|prefill> fmt <FMT> op <OP> T <T> N <N> K <K> per_step <m>
 * (for attention, N is the context length and K the head dim).
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "perfxlm_ops.h"

/* HINTs for custom use (no-ops on every RISC-V core) that the plugin recognises */
#if defined(__riscv)
#define COUNT_BEGIN() __asm__ volatile("slti zero, zero, 0x5b1" ::: "memory")
#define COUNT_END() __asm__ volatile("slti zero, zero, 0x5b2" ::: "memory")
#else /* (builds on the host too, to check it runs) */
#define COUNT_BEGIN() ((void)0)
#define COUNT_END() ((void)0)
#endif

enum { LAYERS = 30, HIDDEN = 576, INTER = 1536, VOCAB = 49152, HEADS = 9, KV_HEADS = 3, HEAD_DIM = 64 };
enum { PREFILL_T = 64, DECODE_CTX = 512, BLOCK = 16, WARM_N = 16 };

typedef struct {
    const char *op;
    size_t N, K;
    int per_step; /* how many of this Linear one forward step runs */
} linear_shape;

static const linear_shape layer_linears[] = {
    {"q_o", HIDDEN, HIDDEN, 2 * LAYERS},
    {"k_v", KV_HEADS * HEAD_DIM, HIDDEN, 2 * LAYERS},
    {"gate_up", INTER, HIDDEN, 2 * LAYERS},
    {"down", HIDDEN, INTER, LAYERS},
};
static const linear_shape lm_head = {"lm_head", VOCAB, HIDDEN, 1};

static const struct {
    const char *name;
    int wfmt;
} formats[] = {{"f32", PXL_F32}, {"bf16", PXL_BF16}, {"q8_0", PXL_Q8_0}, {"q4_1", PXL_Q4_1}};

/* OpenBLAS's CBLAS, resolved at run time (the library is the riscv64 sysroot's, not ours) */
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);
static sgemv_fn cblas_sgemv;
static sgemm_fn cblas_sgemm;

static const char *set;
static int region;

static uint32_t rng = 2463534242u;
static float uniform(void) { /* xorshift32 -> [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 17, rng ^= rng << 5;
    return (float)((int32_t)(rng >> 8) - (1 << 23)) / (float)(1 << 23);
}

static void *xmalloc(size_t bytes) {
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "count_driver: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

static float *random_f32(size_t n) {
    float *p = xmalloc(n * 4);
    for (size_t i = 0; i < n; i++) p[i] = uniform();
    return p;
}

/* N x K weights in wfmt with values of a trained model's magnitude; blocks per perfxlm_ops.h */
static void *random_weights(int wfmt, size_t N, size_t K) {
    size_t n = N * K;
    if (wfmt == PXL_F32) return random_f32(n);
    if (wfmt == PXL_BF16) {
        uint16_t *w = xmalloc(n * 2);
        for (size_t i = 0; i < n; i++) {
            float f = 0.05f * uniform();
            uint32_t bits;
            memcpy(&bits, &f, 4);
            w[i] = (uint16_t)(bits >> 16);
        }
        return w;
    }
    size_t nb = n / PXL_QK;
    if (wfmt == PXL_Q8_0) {
        pxl_block_q8_0 *b = xmalloc(nb * sizeof *b);
        for (size_t i = 0; i < nb; i++) {
            b[i].d = 0x211f; /* fp16 0.01 */
            for (int j = 0; j < PXL_QK; j++) b[i].qs[j] = (int8_t)(127 * uniform());
        }
        return b;
    }
    pxl_block_q4_1 *b = xmalloc(nb * sizeof *b);
    for (size_t i = 0; i < nb; i++) {
        b[i].d = 0x211f, b[i].m = 0xad1f; /* fp16 0.01, -0.08 */
        for (int j = 0; j < PXL_QK / 2; j++) uniform(), b[i].qs[j] = (uint8_t)(rng >> 24);
    }
    return b;
}

static void linear(int wfmt, size_t T, size_t N, size_t K, const float *x, const void *W, float *y) {
    if (!cblas_sgemv) pxl_linear(PXL_F32, wfmt, T, N, K, x, W, NULL, y);
    else if (T == 1) cblas_sgemv(ROW_MAJOR, NO_TRANS, (int)N, (int)K, 1.0f, W, (int)K, x, 1, 0.0f, y, 1);
    else cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)T, (int)N, (int)K, 1.0f, x, (int)K, W, (int)K, 0.0f, y, (int)N);
}

static void describe(const char *phase, const char *fmt, const char *op, size_t T, size_t N, size_t K, int per_step) {
    printf("region %d set %s phase %s fmt %s op %s T %zu N %zu K %zu per_step %d\n", region++, set, phase, fmt, op, T,
           N, K, per_step);
    fflush(stdout);
}

/* one Linear of the step, counted; first the same call on WARM_N rows (uncounted) */
static void count_linear(const char *phase, const char *fmt, int wfmt, size_t T, const linear_shape *s) {
    void *W = random_weights(wfmt, s->N, s->K);
    float *x = random_f32(T * s->K), *y = xmalloc(T * s->N * 4);
    linear(wfmt, T, WARM_N, s->K, x, W, y);
    COUNT_BEGIN();
    linear(wfmt, T, s->N, s->K, x, W, y);
    COUNT_END();
    describe(phase, fmt, s->op, T, s->N, s->K, s->per_step);
    free(W), free(x), free(y);
}

/* one layer's attention for a sequence of `ctx` tokens whose last T are this step's: their
 * keys and values are written into the cache, then each attends causally to its prefix */
static void count_attention(const char *phase, size_t T, size_t ctx) {
    const size_t q_dim = HEADS * HEAD_DIM, kv_dim = KV_HEADS * HEAD_DIM, blocks = (ctx + BLOCK - 1) / BLOCK;
    float *q = random_f32(T * q_dim), *k = random_f32(T * kv_dim), *v = random_f32(T * kv_dim);
    float *k_cache = random_f32(blocks * BLOCK * kv_dim), *v_cache = random_f32(blocks * BLOCK * kv_dim);
    float *y = xmalloc(T * q_dim * 4);
    int64_t *slots = xmalloc(T * 8), *table = xmalloc(blocks * 8), seq_len = (int64_t)ctx, qloc[2] = {0, (int64_t)T};
    for (size_t i = 0; i < T; i++) slots[i] = (int64_t)(ctx - T + i);
    for (size_t b = 0; b < blocks; b++) table[b] = (int64_t)b;
    const float scale = 0.125f; /* 1 / sqrt(HEAD_DIM) */
    for (int counted = 0; counted < 2; counted++) { /* the first call warms up */
        if (counted) COUNT_BEGIN();
        pxl_paged_attention(PXL_F32, PXL_F32, T, 1, HEADS, KV_HEADS, HEAD_DIM, q, k, v, k_cache, v_cache, BLOCK, slots,
                            table, blocks, &seq_len, qloc, scale, 0.0f, 0, y);
        if (counted) COUNT_END();
    }
    describe(phase, "f32", "attention", T, ctx, HEAD_DIM, LAYERS);
    free(q), free(k), free(v), free(k_cache), free(v_cache), free(y), free(slots), free(table);
}

static int listed(const char *list, const char *name) { /* name is one of list's comma-separated items */
    size_t n = strlen(name);
    for (const char *p = list; (p = strstr(p, name)); p += n)
        if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == 0)) return 1;
    return 0;
}

static void load_openblas(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "count_driver: cannot load OpenBLAS: %s\n", dlerror());
        exit(1);
    }
    cblas_sgemv = (sgemv_fn)dlsym(lib, "cblas_sgemv");
    cblas_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
    char *(*corename)(void) = (char *(*)(void))dlsym(lib, "openblas_get_corename");
    char *(*config)(void) = (char *(*)(void))dlsym(lib, "openblas_get_config");
    void (*set_threads)(int) = (void (*)(int))dlsym(lib, "openblas_set_num_threads");
    if (!cblas_sgemv || !cblas_sgemm) {
        fprintf(stderr, "count_driver: %s has no cblas_sgemv / cblas_sgemm\n", path);
        exit(1);
    }
    if (set_threads) set_threads(1);
    printf("openblas core %s config %s\n", corename ? corename() : "?", config ? config() : "?");
}

int main(int argc, char **argv) {
    const char *fmts = "f32,bf16,q8_0,q4_1", *phases = "decode,prefill", *lib = "libopenblas.so.0";
    for (int c; (c = getopt(argc, argv, "f:p:l:")) != -1;) {
        if (c == 'f') fmts = optarg;
        else if (c == 'p') phases = optarg;
        else if (c == 'l') lib = optarg;
        else return 2;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: %s rvv|generic|openblas [-f f32,bf16,q8_0,q4_1] [-p decode,prefill] [-l LIB]\n",
                argv[0]);
        return 2;
    }
    set = argv[optind];
    if (!strcmp(set, "openblas")) {
        load_openblas(lib);
        fmts = "f32"; /* (no quantised or bf16 GEMV in BLAS) */
    } else if (pxl_set_isa(set) != 0) {
        fprintf(stderr, "count_driver: kernel set %s is not available here (%s is)\n", set, pxl_isa());
        return 1;
    }
    pxl_set_num_threads(1);
    printf("kernel set %s\n", cblas_sgemv ? "openblas" : pxl_isa());
    for (size_t f = 0; f < sizeof formats / sizeof formats[0]; f++) {
        if (!listed(fmts, formats[f].name)) continue;
        if (listed(phases, "decode")) {
            for (size_t i = 0; i < sizeof layer_linears / sizeof layer_linears[0]; i++)
                count_linear("decode", formats[f].name, formats[f].wfmt, 1, &layer_linears[i]);
            count_linear("decode", formats[f].name, formats[f].wfmt, 1, &lm_head);
        }
        if (listed(phases, "prefill"))
            for (size_t i = 0; i < sizeof layer_linears / sizeof layer_linears[0]; i++)
                count_linear("prefill", formats[f].name, formats[f].wfmt, PREFILL_T, &layer_linears[i]);
    }
    if (!cblas_sgemv && listed(fmts, "f32")) {
        if (listed(phases, "decode")) count_attention("decode", 1, DECODE_CTX);
        if (listed(phases, "prefill")) count_attention("prefill", PREFILL_T, PREFILL_T);
    }
    return 0;
}
