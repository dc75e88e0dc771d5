/* A whole graph step in one call: the plugin compiles the node list once into records
 * holding every pointer (weights, KV caches, planned activation buffers, staged graph
 * inputs); a step then only says how many tokens (T), logits rows (N) and sequences (B)
 * it has. This removes the per-node Python and ctypes cost, and the per-op thread
 * fork/join, from decode. The records' layout and codes are pxl_abi.h's; pxl_abi() reports
 * them so the plugin can refuse a library built for another layout. */
#include <time.h>

#include "pxl_kernels.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* per phase: steps with prompt tokens (0), decode steps, one query token a sequence (1) */
static int op_profile_on;
static double op_seconds[2][PXL_NOPS];
static int64_t op_calls[2][PXL_NOPS];

static void run_node(const pxl_plan_node *x, size_t T, size_t N, size_t B, size_t max_blocks) {
    size_t rows = x->rows & PXL_ROWS_N ? N : T;
    void *const *p = (void *const *)x->p;
    switch (x->op) {
    case PXL_OP_GATHER: pxl_gather(x->dt, rows, x->a, p[0], p[1], p[2]); break;
    case PXL_OP_RMSNORM: /* b > 1: b groups of a features a row (per-head q/k norm) */
        pxl_rmsnorm(x->dt, rows * (x->b > 1 ? (size_t)x->b : 1), x->a, p[0], p[1], x->f0, p[2]);
        break;
    case PXL_OP_LINEAR:
        pxl_linear_to(x->dt, x->rows & PXL_OUT_F32 ? PXL_F32 : x->dt, x->wfmt, rows, x->a, x->b, p[0], p[1], p[2],
                      p[3]);
        break;
    case PXL_OP_LINEAR_PARTS: { /* a = parts (up to 3), b = K; c, d, e = their features */
        const size_t n[3] = {(size_t)x->c, (size_t)x->d, (size_t)x->e};
        pxl_linear_parts(x->dt, x->wfmt, rows, x->b, (int)x->a, n, p[0], p[1], p[2], (void *const *)&p[3]);
        break;
    }
    case PXL_OP_ROPE: pxl_rope(x->dt, rows, x->a, x->b, p[0], p[1], p[2], p[3], p[4]); break;
    case PXL_OP_ATTENTION:
        pxl_paged_attention_mask(x->dt, x->wfmt, T, B, x->a, x->b, x->c, p[0], p[1], p[2], p[3], p[4], x->d, p[5],
                                 p[6], max_blocks, p[7], p[8], x->f0, x->f1, x->e, !(x->rows & PXL_NONCAUSAL), p[9]);
        break;
    case PXL_OP_SILU_MUL: pxl_silu_mul(x->dt, rows * x->a, p[0], p[1], p[2]); break;
    case PXL_OP_ADD: pxl_add(x->dt, rows * x->a, p[0], p[1], p[2]); break;
    case PXL_OP_LINEAR_SILU: pxl_linear_silu(x->dt, x->wfmt, rows, x->a, x->b, p[0], p[1], p[2]); break;
    case PXL_OP_ADD_RMSNORM: pxl_add_rmsnorm(x->dt, rows, x->a, p[0], p[1], p[2], x->f0, p[3], p[4]); break;
    case PXL_OP_LAYER_NORM: pxl_layer_norm(x->dt, rows, x->a, p[0], p[1], p[2], x->f0, p[3]); break;
    case PXL_OP_GELU_MUL: pxl_gelu_mul(x->dt, rows * x->a, p[0], p[1], p[2]); break;
    case PXL_OP_ACTIVATION: pxl_activation(x->dt, (int)x->b, rows * x->a, p[0], p[1]); break;
    case PXL_OP_SCALE: pxl_scale(x->dt, rows * x->a, p[0], x->f0, p[1]); break;
    case PXL_OP_MOE: /* a = D, b = F, c = E, d = top_k, e = norm_topk_prob */
        pxl_moe(x->dt, x->wfmt & 0xff, (x->wfmt >> 8) & 0xff, (x->wfmt >> 16) & 0xff, rows, x->a, x->b, x->c, x->d,
                (int)x->e, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
        break;
    case PXL_OP_LORA: /* a = N, b = K, c = R, d = L */
        pxl_lora(x->dt, rows, x->a, x->b, x->c, x->d, p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
        break;
    case PXL_OP_SOFTCAP:
        pxl_softcap_to(x->dt, x->rows & PXL_OUT_F32 ? PXL_F32 : x->dt, rows * x->a, p[0], x->f0, p[1]);
        break;
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
    pxl_enter();
#pragma omp parallel num_threads(pxl_num_threads())
    {
        double t0 = prof ? now() : 0;
        for (size_t i = 0; i < n; i++) {
            run_node(&nodes[i], T, N, B, max_blocks);
            int32_t flags = nodes[i].rows;
            if ((flags & PXL_NO_WAIT) && (flags & PXL_ROWS_N ? N : T) <= PXL_T_PRIVATE && !prof) continue;
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

void pxl_plan_profile(int on, double *seconds, int64_t *calls) {
    for (int ph = 0; ph < 2; ph++)
        for (int i = 0; i < PXL_NOPS; i++) {
            if (seconds) seconds[ph * PXL_NOPS + i] = op_seconds[ph][i];
            if (calls) calls[ph * PXL_NOPS + i] = op_calls[ph][i];
            op_seconds[ph][i] = 0, op_calls[ph][i] = 0;
        }
    op_profile_on = on;
}

void pxl_abi(pxl_abi_info *out, size_t size) {
    const pxl_abi_info info = {
        .version = PXL_ABI_VERSION,
        .node_size = sizeof(pxl_plan_node),
        .node_rows = offsetof(pxl_plan_node, rows),
        .node_a = offsetof(pxl_plan_node, a),
        .node_f0 = offsetof(pxl_plan_node, f0),
        .node_p = offsetof(pxl_plan_node, p),
        .node_ptrs = PXL_PLAN_MAX_PTRS,
        .n_ops = PXL_NOPS,
        .n_formats = PXL_NFMT,
    };
    memcpy(out, &info, size < sizeof info ? size : sizeof info);
}
