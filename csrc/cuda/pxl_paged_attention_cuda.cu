// Paged attention, decode and prefill: one block per (query token, query head); keys are
// visited in tiles of blockDim.x with an online softmax (running max and sum), so any
// sequence length fits in registers. hd <= 256 (one output element per thread).
#include "pxl_gpu.h"

namespace {
__global__ void write_kv_kernel(int dt, int T, int row, const void *k, const void *v, void *kc, void *vc,
                                const int64_t *slots) {
    const int t = blockIdx.x;
    if (slots[t] < 0) return;
    const size_t es = dt == PXL_F32 ? 4 : 2, dst = (size_t)slots[t] * row * es, src = (size_t)t * row * es;
    for (int i = threadIdx.x; i < row * (int)es; i += blockDim.x) {
        ((char *)kc)[dst + i] = ((const char *)k)[src + i];
        ((char *)vc)[dst + i] = ((const char *)v)[src + i];
    }
}

__global__ void attention_kernel(int dt, int B, int H, int Hkv, int hd, const void *q, const void *kc, const void *vc,
                                 int block_size, const int64_t *tables, int max_blocks, const int64_t *seq_lens,
                                 const int64_t *qsl, float scale, int window, void *y) {
    const int t = blockIdx.x, h = blockIdx.y, kvh = h / (H / Hkv), tid = threadIdx.x;
    int b = 0;
    while (qsl[b + 1] <= t) b++;
    const int64_t qlen = qsl[b + 1] - qsl[b], pos = seq_lens[b] - qlen + (t - qsl[b]);
    const int64_t lo = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
    extern __shared__ float smem[];
    float *qs = smem, *p = smem + hd;  // q (hd), probabilities of the current key tile (blockDim.x)
    for (int d = tid; d < hd; d += blockDim.x) qs[d] = pxl_ld(dt, q, ((size_t)t * H + h) * hd + d) * scale;
    __syncthreads();
    float m = -INFINITY, l = 0.f, acc = 0.f;  // running max, sum, and this thread's output element
    const size_t row = (size_t)Hkv * hd;
    for (int64_t j0 = lo; j0 <= pos; j0 += blockDim.x) {
        const int64_t j = j0 + tid;
        float s = -INFINITY;
        if (j <= pos) {
            const size_t base = ((size_t)tables[b * max_blocks + j / block_size] * block_size + j % block_size) * row +
                                (size_t)kvh * hd;
            s = 0.f;
            for (int d = 0; d < hd; d++) s += qs[d] * pxl_ld(dt, kc, base + d);
        }
        p[tid] = s;
        __syncthreads();
        float tile_max = -INFINITY;
        const int n = (int)min((int64_t)blockDim.x, pos + 1 - j0);
        for (int i = 0; i < n; i++) tile_max = fmaxf(tile_max, p[i]);
        const float m_new = fmaxf(m, tile_max), corr = __expf(m - m_new);
        l *= corr, acc *= corr;
        for (int i = 0; i < n; i++) {
            const float e = __expf(p[i] - m_new);
            l += e;
            if (tid < hd) {
                const int64_t jj = j0 + i;
                const size_t base = ((size_t)tables[b * max_blocks + jj / block_size] * block_size + jj % block_size) *
                                    row + (size_t)kvh * hd;
                acc += e * pxl_ld(dt, vc, base + tid);
            }
        }
        m = m_new;
        __syncthreads();
    }
    if (tid < hd) pxl_st(dt, y, ((size_t)t * H + h) * hd + tid, acc / l);
}
}  // namespace

extern "C" int pxl_gpu_paged_attention(int dt, int T, int B, int H, int Hkv, int hd, const void *q, const void *k,
                                       const void *v, void *k_cache, void *v_cache, int block_size,
                                       const int64_t *slot_mapping, const int64_t *block_tables, int max_blocks,
                                       const int64_t *seq_lens, const int64_t *query_start_loc, float scale,
                                       int window, void *y, pxl_stream_t stream) {
    if (hd > 256) return -1;
    write_kv_kernel<<<T, 256, 0, stream>>>(dt, T, Hkv * hd, k, v, k_cache, v_cache, slot_mapping);
    const int threads = hd <= 64 ? 64 : hd <= 128 ? 128 : 256;
    dim3 grid(T, H);
    attention_kernel<<<grid, threads, (hd + threads) * sizeof(float), stream>>>(
        dt, B, H, Hkv, hd, q, k_cache, v_cache, block_size, block_tables, max_blocks, seq_lens, query_start_loc,
        scale, window, y);
    return (int)cudaGetLastError();
}
