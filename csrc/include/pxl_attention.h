/* The parts of paged attention (private to the library): pxl_attention.c runs a step, its work
 * items, cache rows and prefetching, and per item calls the scores and softmax
 * (pxl_attn_scores.c) and the weighted sums (pxl_attn_sums.c); on a set with tile kernels (AMX)
 * both products also run on tiles. Here: the prefetch queues they share, the vector helpers
 * both files inline, and the tile kernels' per-thread rows. */
#ifndef PXL_ATTENTION_H
#define PXL_ATTENTION_H

#include <stdint.h>

#include "pxl_kernels.h"

#pragma GCC diagnostic ignored "-Wpsabi" /* vector values in the non-AVX-512 clones: all inlined */

/* Rows are fetched into L2 (locality 2: prefetcht1), not L1: an item's keys and values (tens
 * of KB, more than L1 holds) arrive a whole item ahead, and fetched into L1 they evicted each
 * other and the rows in use before they were read. */
static inline void prefetch_row(const char *p, size_t bytes) {
    if (bytes == 128) { /* a bf16 row of a 64-dim head, the common case: no loop in the key loops */
        __builtin_prefetch(p, 0, 2), __builtin_prefetch(p + 64, 0, 2);
        return;
    }
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

/* Cache rows still to prefetch: rows[at .. n) + off, `bytes` each. The key and value loops
 * take rows from these as they go, so fetching the next item's rows overlaps this item's
 * arithmetic (a decode item's rows come from DRAM, and it would otherwise wait on them). */
typedef struct {
    const char *const *rows;
    size_t off, bytes, at, n;
} pf_queue;
static inline void pf_take(pf_queue *q, size_t k) {
    size_t e = q->n - q->at < k ? q->n : q->at + k;
    for (; q->at < e; q->at++) prefetch_row(q->rows[q->at] + q->off, q->bytes);
}

/* GCC/Clang vector types (f32x16, i32x16: pxl_kernels.h): explicit registers (a widened row
 * in a stack array would cost a failed store-to-load forward per use), one source for AVX-512,
 * AVX2 and RVV */
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));

PXL_INLINE f32x16 ld16(int dt, const void *p) { /* 16 values at p (float32, bf16 or f16), widened */
    f32x16 v;
    if (dt == PXL_F32) {
        memcpy(&v, p, sizeof v);
    } else if (dt == PXL_F16) {
        v = pxl_f16x16_to_f32(p);
    } else { /* bf16 -> fp32: each value into the high half of a 32-bit lane (one vpermi2w) */
        u16x16 h, z = {0};
        memcpy(&h, p, sizeof h);
        u16x32 w = __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9, 25,
                                           10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        memcpy(&v, &w, sizeof v);
    }
    return v;
}
#define SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)

/* element d of a cache row in dt, as fp32 */
static inline float row_at(int dt, const void *row, size_t d) {
    if (dt == PXL_F32) return ((const float *)row)[d];
    uint16_t h = ((const uint16_t *)row)[d];
    return dt == PXL_F16 ? pxl_fp16_to_fp32(h) : pxl_bf16_to_f32(h);
}

/* A thread's keys and values in the tile kernels' layouts (attn_kt, attn_vt) for one (sequence,
 * KV head, first key): the query tiles of a prefill after the first read the same rows and
 * more, so each block is laid out once rather than once per tile (128 times over a 512-token
 * prompt). kblocks / vblocks count the whole blocks held (16 keys, 32 values); a part-filled
 * last block is laid out again by whoever reads it. Decode items (no later tile to share with)
 * lay each key block out in `one`, and their values from the start of vt. pa: the weights'
 * tiles. */
typedef struct {
    size_t b, kvh, lo0, kblocks, vblocks;
    uint16_t *kt, *one, *vt, *pa;
    int keep; /* a prefill's item: its blocks are kept for the next tile */
} tile_cache;

/* x (R, 32 chunks, ld apart) fp32 -> per 32 columns, its hi, mid and lo bf16 tiles */
void pxl_attn_split_tiles(size_t R, size_t chunks, const float *x, size_t ld, uint16_t *out);
/* s (R, lds) = the R query rows q (R, hd, pre-scaled fp32) . the n keys at krows[j] + off */
void pxl_attn_scores(int dt, size_t R, size_t hd, const float *q, const char *const *krows, size_t off, size_t n,
                     float *s, size_t lds, float *kw, tile_cache *tc, pf_queue *pf, int npf);
/* s[0 .. n) -> its softmax, in place */
void pxl_attn_softmax(float *s, size_t n);
/* out (R, hd) += w (R, ldw) . the values at vrows[j] + voff, j in [j0, j1), in the float32 loops */
void pxl_attn_weighted_sum(int dt, size_t R, size_t hd, const float *w, size_t ldw, const char *const *vrows,
                           size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv);
/* out (R, hd) = the same sums of all n values on the set's tile kernels (bf16 cache) */
void pxl_attn_sums_tiles(const pxl_kernel_set *ks, size_t R, size_t hd, const float *w, size_t lds,
                         const char *const *vrows, size_t off, size_t n, float *out, uint16_t *zero, tile_cache *tc,
                         pf_queue *pv);

#endif
