/* A whole graph step in one call: the plugin compiles the node list once into records
 * holding every pointer (weights, KV caches, planned activation buffers, staged graph
 * inputs); a step then only says how many tokens (T), logits rows (N) and sequences (B)
 * it has. This removes the per-node Python and ctypes cost, and the per-op thread
 * fork/join, from decode. */
#include <time.h>

#include "pxl_kernels.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct {
    int32_t op, dt, wfmt, rows; /* rows bit 0: the step's N rows (else T); bits 1, 2: NO_WAIT, OUT_F32 */
    int64_t a, b, c, d, e;      /* sizes, per op (see pxl_plan_run) */
    float f0, f1;
    const void *p[10];
} pxl_plan_node;

enum { OP_GATHER, OP_RMSNORM, OP_LINEAR, OP_ROPE, OP_ATTENTION, OP_SILU_MUL, OP_ADD, OP_LINEAR_SILU, OP_ADD_RMSNORM,
       N_OPS };

/* per phase: steps with prompt tokens (0), decode steps, one query token a sequence (1) */
static int op_profile_on;
static double op_seconds[2][N_OPS];
static int64_t op_calls[2][N_OPS];

/* rows bit 1: this Linear and the next share no buffer but their input (q / k / v, gate / up),
 * so in a decode step, where each thread prepares its own copy of x, no thread need wait for
 * the others between them (a longer step shares prepared rows across the team: it waits) */
#define NO_WAIT 2
#define NO_WAIT_MAX_T 4 /* pxl_linear.c's T_PRIVATE */
/* rows bit 2 (a Linear): y is fp32 holding dt's values (the logits: no conversion pass) */
#define OUT_F32 4

static void run_node(const pxl_plan_node *x, size_t T, size_t N, size_t B, size_t max_blocks) {
    size_t rows = x->rows & 1 ? N : T;
    void *const *p = (void *const *)x->p;
    switch (x->op) {
    case OP_GATHER: pxl_gather(x->dt, rows, x->a, p[0], p[1], p[2]); break;
    case OP_RMSNORM: pxl_rmsnorm(x->dt, rows, x->a, p[0], p[1], x->f0, p[2]); break;
    case OP_LINEAR:
        pxl_linear_to(x->dt, x->rows & OUT_F32 ? PXL_F32 : x->dt, x->wfmt, rows, x->a, x->b, p[0], p[1], p[2], p[3]);
        break;
    case OP_ROPE: pxl_rope(x->dt, rows, x->a, x->b, p[0], p[1], p[2], p[3], p[4]); break;
    case OP_ATTENTION:
        pxl_paged_attention(x->dt, T, B, x->a, x->b, x->c, p[0], p[1], p[2], p[3], p[4], x->d, p[5], p[6],
                            max_blocks, p[7], p[8], x->f0, x->e, p[9]);
        break;
    case OP_SILU_MUL: pxl_silu_mul(x->dt, rows * x->a, p[0], p[1], p[2]); break;
    case OP_ADD: pxl_add(x->dt, rows * x->a, p[0], p[1], p[2]); break;
    case OP_LINEAR_SILU: pxl_linear_silu(x->dt, x->wfmt, rows, x->a, x->b, p[0], p[1], p[2]); break;
    case OP_ADD_RMSNORM: pxl_add_rmsnorm(x->dt, rows, x->a, p[0], p[1], p[2], x->f0, p[3], p[4]); break;
    }
}

/* One team for the whole step: every op is team code (pxl_kernels.h), nodes are separated
 * by a barrier (a consumer may read any row its producer wrote), and no thread is forked
 * or joined between nodes. */
void pxl_plan_run(const pxl_plan_node *nodes, size_t n, size_t T, size_t N, size_t B, size_t max_blocks) {
    pxl_kernels(); /* resolve the kernel set before the team starts */
    int prof = op_profile_on, phase = T == B;
    pxl_cpu_mask saved;
    int pinned = pxl_pin_caller(&saved);
#pragma omp parallel num_threads(pxl_num_threads())
    {
        double t0 = prof ? now() : 0;
        for (size_t i = 0; i < n; i++) {
            run_node(&nodes[i], T, N, B, max_blocks);
            if ((nodes[i].rows & NO_WAIT) && (nodes[i].rows & 1 ? N : T) <= NO_WAIT_MAX_T && !prof) continue;
#pragma omp barrier
            if (prof && PXL_ITH() == 0) { /* the barrier makes this the node's team time */
                double t1 = now();
                op_seconds[phase][nodes[i].op] += t1 - t0;
                op_calls[phase][nodes[i].op]++;
                t0 = t1;
            }
        }
    }
    if (pinned) pxl_unpin_caller(&saved);
}

/* Per-op time across steps (`perfxlm bench ... --profile-ops`): seconds[phase * N_OPS + op] and
 * calls[...] for the N_OPS op kinds above in enum order, phase 0 for steps with prompt tokens and
 * 1 for decode steps; reading resets them, `on` starts or stops timing. */
void pxl_plan_profile(int on, double *seconds, int64_t *calls) {
    for (int ph = 0; ph < 2; ph++)
        for (int i = 0; i < N_OPS; i++) {
            if (seconds) seconds[ph * N_OPS + i] = op_seconds[ph][i];
            if (calls) calls[ph * N_OPS + i] = op_calls[ph][i];
            op_seconds[ph][i] = 0, op_calls[ph][i] = 0;
        }
    op_profile_on = on;
}
