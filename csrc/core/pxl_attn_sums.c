/* Paged attention's weighted sums for one work item's rows (pxl_attention.c): each (row, 16
 * dims) one float32 accumulator over the keys in increasing order; with tile kernels, a
 * prefill's on tiles, the weights split into three exact bf16 parts. */
#include "pxl_attention.h"

/* 32 bf16 values at p (one cache line) widened by a shift and a mask, no shuffle: out[0] gets
 * the even-indexed ones (0, 2 .. 30), out[1] the odd ones */
static inline void widen_pairs(const void *p, f32x16 *out) {
    i32x16 w;
    memcpy(&w, p, sizeof w);
    out[0] = (f32x16)(w << 16), out[1] = (f32x16)(w & (int32_t)0xffff0000);
}

/* out[r * hd + c .. + 16] += sum_j w[r * ldw + j] v_j[c .. + 16] for j in [j0, j1) in increasing
 * j, rows r0 .. r0 + CNT, continuing from out: each (row, 16 dims) is one accumulator, CNT of
 * them advance together so CNT independent FMA chains hide the latency, and each value
 * chunk is widened once for all of them. DT and CNT are constants in each instance. */
PXL_INLINE void wsum_group(const int DT, const int CNT, size_t hd, size_t c, const float *w, size_t ldw,
                           const char *const *vrows, size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv) {
    f32x16 acc[8];
    for (int i = 0; i < CNT; i++) acc[i] = ld16(PXL_F32, out + i * hd + c);
    size_t off = voff + c * (DT == PXL_F32 ? 4 : 2);
    for (size_t j = j0; j < j1; j++) {
        if ((j - j0) % 8 == 0) pf_take(pv, 8);
        f32x16 v = ld16(DT, vrows[j] + off);
        for (int i = 0; i < CNT; i++) acc[i] += pxl_splat16(w[i * ldw + j]) * v;
    }
    for (int i = 0; i < CNT; i++) memcpy(out + i * hd + c, &acc[i], sizeof acc[i]);
}

#define WSUM_CASES(DT)                                                                                                \
    switch (cnt) {                                                                                                     \
    case 8: wsum_group(DT, 8, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 7: wsum_group(DT, 7, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 6: wsum_group(DT, 6, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 5: wsum_group(DT, 5, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 4: wsum_group(DT, 4, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 3: wsum_group(DT, 3, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    case 2: wsum_group(DT, 2, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    default: wsum_group(DT, 1, hd, c, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                               \
    }

/* The same sums for CNT <= 6 rows of a 64-dim head, keys outer: all CNT x 4 accumulators stay
 * in registers, so each value row is read once, whole, where the loop above walks the rows 4
 * times (a decode item's keys and values together can fill L1, so a later walk reloads them
 * from L2). Each accumulator still adds the same terms in increasing j, so the bits do not
 * change. */
PXL_INLINE void wsum_rows64(const int DT, const int CNT, const float *w, size_t ldw, const char *const *vrows,
                            size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv) {
    const size_t es = DT == PXL_F32 ? 4 : 2;
    f32x16 acc[6][4];
    if (DT == PXL_BF16) { /* accumulators in the order widen_pairs gives: dims 0, 2 .. 30 | 1, 3 .. 31 | ... */
        for (int i = 0; i < CNT; i++)
            for (int c = 0; c < 4; c += 2) {
                f32x16 a = ld16(PXL_F32, out + i * 64 + c * 16), b = ld16(PXL_F32, out + i * 64 + c * 16 + 16);
                acc[i][c] = SHUF(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                acc[i][c + 1] = SHUF(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            }
        for (size_t j = j0; j < j1; j++) {
            if ((j - j0) % 8 == 0) pf_take(pv, 8);
            const char *vr = vrows[j] + voff;
            f32x16 v[4];
            widen_pairs(vr, v), widen_pairs(vr + 64, v + 2);
            for (int i = 0; i < CNT; i++)
                for (int c = 0; c < 4; c++) acc[i][c] += pxl_splat16(w[i * ldw + j]) * v[c];
        }
        for (int i = 0; i < CNT; i++)
            for (int c = 0; c < 4; c += 2) {
                f32x16 a = SHUF(acc[i][c], acc[i][c + 1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                f32x16 b = SHUF(acc[i][c], acc[i][c + 1], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                memcpy(out + i * 64 + c * 16, &a, sizeof a), memcpy(out + i * 64 + c * 16 + 16, &b, sizeof b);
            }
        return;
    }
    for (int i = 0; i < CNT; i++)
        for (int c = 0; c < 4; c++) acc[i][c] = ld16(PXL_F32, out + i * 64 + c * 16);
    for (size_t j = j0; j < j1; j++) {
        if ((j - j0) % 8 == 0) pf_take(pv, 8);
        const char *vr = vrows[j] + voff;
        f32x16 v[4] = {ld16(DT, vr), ld16(DT, vr + 16 * es), ld16(DT, vr + 32 * es), ld16(DT, vr + 48 * es)};
        for (int i = 0; i < CNT; i++)
            for (int c = 0; c < 4; c++) acc[i][c] += pxl_splat16(w[i * ldw + j]) * v[c];
    }
    for (int i = 0; i < CNT; i++)
        for (int c = 0; c < 4; c++) memcpy(out + i * 64 + c * 16, &acc[i][c], sizeof acc[i][c]);
}

#define WSUM64_CASES(DT)                                                                                              \
    switch (cnt) {                                                                                                     \
    case 6: wsum_rows64(DT, 6, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 5: wsum_rows64(DT, 5, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 4: wsum_rows64(DT, 4, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 3: wsum_rows64(DT, 3, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    case 2: wsum_rows64(DT, 2, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                 \
    default: wsum_rows64(DT, 1, wr, ldw, vrows, voff, j0, j1, o, pv); break;                                                \
    }

/* out (R, hd) += the weighted sums of the values at vrows[j] + voff, j in [j0, j1), for R rows of
 * weights w (R, ldw); a row of pv prefetched per key */
PXL_CLONES void pxl_attn_weighted_sum(int dt, size_t R, size_t hd, const float *w, size_t ldw, const char *const *vrows,
                                    size_t voff, size_t j0, size_t j1, float *out, pf_queue *pv) {
    if (hd % 16) { /* a head dim that is not a multiple of 16: the same sums, one at a time */
        for (size_t r = 0; r < R; r++)
            for (size_t d = 0; d < hd; d++) {
                float acc = out[r * hd + d];
                for (size_t j = j0; j < j1; j++)
                    acc += w[r * ldw + j] * row_at(dt, vrows[j] + voff, d);
                out[r * hd + d] = acc;
            }
        return;
    }
    const size_t group = hd == 64 ? 6 : 8; /* rows at a time: keys outer for a 64-dim head, else 16 dims outer */
    for (size_t r0 = 0; r0 < R; r0 += group) {
        size_t cnt = R - r0 < group ? R - r0 : group;
        const float *wr = w + r0 * ldw;
        float *o = out + r0 * hd;
        if (hd == 64) {
            if (dt == PXL_F32) WSUM64_CASES(PXL_F32)
            else if (dt == PXL_BF16) WSUM64_CASES(PXL_BF16)
            else WSUM64_CASES(PXL_F16)
        } else {
            for (size_t c = 0; c < hd; c += 16)
                if (dt == PXL_F32) WSUM_CASES(PXL_F32)
                else if (dt == PXL_BF16) WSUM_CASES(PXL_BF16)
                else WSUM_CASES(PXL_F16)
        }
    }
}

/* out (R, hd) = the weighted sums of the n values at vrows[j] + off through the set's tile
 * kernel, the weights w (R, lds) zero outside each row's keys up to a whole 32-key block: every
 * row sums the same blocks in the same order, so a decode row's bits are its prefill row's
 * (the blocks past its own keys add zeros). zero: hd bf16 zeros for the values past n. */
void pxl_attn_sums_tiles(const pxl_kernel_set *ks, size_t R, size_t hd, const float *w, size_t lds,
                       const char *const *vrows, size_t off, size_t n, float *out, uint16_t *zero,
                       tile_cache *tc, pf_queue *pv) {
    size_t nb = (n + 31) / 32;
    memset(zero, 0, hd * 2);
    pxl_attn_split_tiles(R, nb, w, lds, tc->pa);
    if (!tc->keep) tc->b = SIZE_MAX, tc->vblocks = 0; /* a decode: vt is this item's, and forgotten */
    for (size_t b = tc->vblocks; b < nb; b++) {
        pf_take(pv, 32);
        const char *vr[32];
        for (size_t jj = 0; jj < 32; jj++) vr[jj] = b * 32 + jj < n ? vrows[b * 32 + jj] + off : (const char *)zero;
        ks->attn_vt(hd, vr, tc->vt + b * 32 * hd);
        if (tc->keep && b * 32 + 32 <= n) tc->vblocks = b + 1;
    }
    ks->attn_config((int)R);
    ks->attn_pv(hd, tc->pa, nb, tc->vt, out);
}
