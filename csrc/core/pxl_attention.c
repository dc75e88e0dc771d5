/* Paged attention over a block-table KV cache, decode and (chunked) prefill alike.
 *
 * Work items are (sequence, KV head, tile of query tokens): a tile's query rows (its tokens
 * x the G heads of the KV head; one token for decode) read the key and value rows in place
 * from the cache, each key row once for all of them. Scores go 16 keys at a time: each
 * (row, key) is a 16-lane dot product along the head dim, and 16 of them fold together (a
 * transpose-add tree, no per-key horizontal sum). Softmax in float32 with a vectorised exp,
 * then each row's weighted sum of value rows in increasing key order. This file runs the step;
 * the scores and softmax are in pxl_attn_scores.c, the weighted sums in pxl_attn_sums.c.
 *
 * A decode step reads every sequence's keys and values from DRAM (the whole cache in use), so a
 * thread fetches its next item's rows while it computes this one's: the next keys during the
 * scores, the next values during the weighted sums (pf_queue).
 *
 * Every (row, key) score, softmax and weighted sum runs the same instructions whatever else
 * shares the tile or the step, so a token's result does not depend on the batch, on how
 * its prompt was chunked, or on whether it ran as a decode (batch invariance). One exception:
 * with tile kernels (AMX) a prefill's weighted sums run on tiles and a decode's in the fp32
 * loops, whose sums are in another order, unless batch-invariant mode sends both to the tiles.
 *
 * Not causal (an encoder's bidirectional attention): every token of a sequence sees all its
 * seq_lens[b] keys, so a tile's rows share one key range and take the tile's shared path.
 */
#include <math.h>

#include "pxl_attention.h"

/* query rows (tokens x heads of the group) per prefill tile: in the float32 loops, and on the
 * tile kernels (AMX), whose tiles hold 16 rows and whose row bits do not depend on the tile's
 * other rows (the loops' order does: there the number is fixed) */
#define TILE_ROWS 12
#define TILE_ROWS_TILES 16
#define CHUNK 16     /* items per scheduling chunk at most */
#define PF_KEYS 32   /* an unfetched item's own look-ahead in keys: covers DRAM latency (with none,
                        * the first keys wait on memory) */

/* A step's items: per sequence, Hkv x tiles of query tokens. Items per KV head rather than one
 * decode item for all heads reading each cache row whole: that one is the slower of the two,
 * and smaller items balance the threads better. */
typedef struct {
    size_t tq; /* query tokens per tile */
    size_t items;
} seq_items;
/* whether an item's weighted sums run on the set's tile kernels for every one of its tiles (a
 * prefill's; a decode's only when batch invariant): a bf16 cache, whole 32-dim tiles, no window */
static inline int sums_on_tiles(const pxl_kernel_set *ks, int cdt, size_t hd, size_t window) {
    return ks->attn_pv && cdt == PXL_BF16 && hd % 32 == 0 && !window;
}
static inline seq_items items_of(size_t qlen, size_t G, size_t Hkv, size_t rows) {
    size_t tq = qlen == 1 ? 1 : rows / G > 1 ? rows / G : 1;
    return (seq_items){tq, Hkv * ((qlen + tq - 1) / tq)};
}

/* n values of q in dt -> scale * q in fp32, and n fp32 results -> y in dt: loops of their own,
 * so each clone vectorises them (inside the unversioned team code they would run as SSE2) */
PXL_CLONES static void load_q(int dt, size_t n, float scale, const char *q, float *out) {
    if (dt == PXL_F32) for (size_t e = 0; e < n; e++) out[e] = scale * ((const float *)q)[e];
    else for (size_t e = 0; e < n; e++) out[e] = scale * pxl_bf16_to_f32(((const uint16_t *)q)[e]);
}
PXL_CLONES static void store_out(int dt, size_t n, const float *o, char *y) {
    if (dt == PXL_F32) memcpy(y, o, n * 4);
    else for (size_t e = 0; e < n; e++) ((uint16_t *)y)[e] = pxl_f32_to_bf16(o[e]);
}
/* n values of a token's k or v in dt -> a cache row in cdt (a bf16 cache under fp32 activations
 * rounds them to nearest even, as the model's bf16 Linear would have; an f16 one likewise, with
 * three more mantissa bits and a narrower range) */
PXL_CLONES static void store_row(int dt, int cdt, size_t n, const char *x, char *row) {
    if (dt == cdt) memcpy(row, x, n * (dt == PXL_F32 ? 4 : 2));
    else if (cdt == PXL_BF16)
        for (size_t e = 0; e < n; e++) ((uint16_t *)row)[e] = pxl_f32_to_bf16(((const float *)x)[e]);
    else if (cdt == PXL_F16 && dt == PXL_F32)
        for (size_t e = 0; e < n; e++) ((uint16_t *)row)[e] = pxl_f32_to_f16(((const float *)x)[e]);
    else if (cdt == PXL_F16)
        for (size_t e = 0; e < n; e++)
            ((uint16_t *)row)[e] = pxl_f32_to_f16(pxl_bf16_to_f32(((const uint16_t *)x)[e]));
    else
        for (size_t e = 0; e < n; e++) ((float *)row)[e] = pxl_bf16_to_f32(((const uint16_t *)x)[e]);
}

/* s[j] = cap * tanh(s[j] / cap): Gemma 2's soft-capped attention logits (q is pre-scaled, so
 * s is already the scaled logit, as in HF's eager attention) */
PXL_CLONES static void capped(float *s, size_t n, float cap) {
    float inv = 1.0f / cap;
    for (size_t j = 0; j < n; j++) s[j] = cap * tanhf(s[j] * inv);
}

/* one KV head's part of an item: tn tokens from position pos0 (rows i * G + g), keys lo0 .. lo0 + n
 * at krows / vrows + off; q rows of token i at qrows + i * H * hd, its output (in ydt) at yrows +
 * i * ldy bytes. The scores take rows from the npf queues pf, the weighted sums from pv, to
 * prefetch. Causal: token i sees keys up to its own position; not causal: all n. */
static void tile_head(int dt, int cdt, size_t tn, size_t G, size_t H, size_t hd, size_t pos0, size_t lo0, size_t n,
                      size_t window, int causal, float scale, float softcap, const char *qrows,
                      const char *const *krows, const char *const *vrows, size_t off, int ydt, char *yrows,
                      size_t ldy, float *qf, float *of, float *s, size_t lds, float *kw, tile_cache *tc, pf_queue *pf,
                      int npf, pf_queue *pv) {
    size_t es = dt == PXL_F32 ? 4 : 2, R = tn * G;
    for (size_t i = 0; i < tn; i++) /* row r = i * G + g; q pre-scaled */
        load_q(dt, G * hd, scale, qrows + i * H * hd * es, qf + i * G * hd);
    pxl_attn_scores(cdt, R, hd, qf, krows, off, n, s, lds, kw, tc, pf, npf);
    /* token i sees keys [a_i, e_i) of the tile's n: causal (or all n), and a window's start */
    size_t a_last = 0, e_first = n;
    for (size_t i = 0; i < tn; i++) {
        size_t pos = pos0 + i, lo = window && pos + 1 > window ? pos + 1 - window : 0;
        size_t a = lo - lo0, e = causal ? pos + 1 - lo0 : n;
        for (size_t g = 0; g < G; g++) {
            if (softcap > 0) capped(s + (i * G + g) * lds + a, e - a, softcap);
            pxl_attn_softmax(s + (i * G + g) * lds + a, e - a);
        }
        a_last = a, e_first = i == 0 ? e : e_first;
    }
    /* the weighted sums on tiles: a prefill's, and decodes' too in batch-invariant mode (a
     * decode's few rows run faster in the loops below, whose sums are in another order). No
     * window: every item's keys start at 0, so the 32-key blocks of every row line up. */
    const pxl_kernel_set *ks = pxl_kernels();
    if (sums_on_tiles(ks, cdt, hd, window) && R <= 16 && (tc->keep || pxl_batch_invariant())) {
        size_t end = (n + 31) / 32 * 32;
        for (size_t i = 0; i < tn; i++) {
            size_t e = causal ? pos0 + i + 1 - lo0 : n;
            for (size_t g = 0; g < G; g++) memset(s + (i * G + g) * lds + e, 0, (end - e) * sizeof(float));
        }
        pxl_attn_sums_tiles(ks, R, hd, s, lds, vrows, off, n, of, (uint16_t *)kw + 48 * hd, tc, pv);
        for (size_t i = 0; i < tn; i++) store_out(ydt, G * hd, of + i * G * hd, yrows + i * ldy);
        return;
    }
    memset(of, 0, R * hd * sizeof(float));
    for (size_t i = 0; i < tn; i++) { /* each row's keys in increasing order: its own first ... */
        size_t pos = pos0 + i, lo = window && pos + 1 > window ? pos + 1 - window : 0;
        size_t end = a_last < e_first ? a_last : pos + 1 - lo0; /* (a window shorter than the tile: all) */
        pxl_attn_weighted_sum(cdt, G, hd, s + i * G * lds, lds, vrows, off, lo - lo0, end, of + i * G * hd, pv);
    }
    if (a_last < e_first) { /* ... then the keys every token sees, all rows together, then the rest */
        pxl_attn_weighted_sum(cdt, R, hd, s, lds, vrows, off, a_last, e_first, of, pv);
        for (size_t i = 1; i < tn && causal; i++)
            pxl_attn_weighted_sum(cdt, G, hd, s + i * G * lds, lds, vrows, off, e_first, pos0 + i + 1 - lo0, of + i * G * hd, pv);
    }
    for (size_t i = 0; i < tn; i++) store_out(ydt, G * hd, of + i * G * hd, yrows + i * ldy);
}

/* where item `it` sits: its sequence, KV head, query tokens and key range; *b / *first carry a
 * thread's scan from one item to the next (its items only ever increase). Inlined: when returned
 * through memory, its fields were read back wider than they were written, and each item's
 * first use of them waited on store forwarding. */
typedef struct {
    size_t b, qs, kvh, tok0, tn, pos0, lo0, n;
    int prefill; /* the sequence has more than one query token this step */
} item_pos;
PXL_INLINE item_pos locate(size_t it, size_t *b, size_t *first, const int64_t *query_start_loc,
                           const int64_t *seq_lens, size_t G, size_t Hkv, size_t rows, size_t window, int causal) {
    size_t qs, qlen;
    seq_items si;
    for (;; *first += si.items, (*b)++) {
        qs = query_start_loc[*b], qlen = query_start_loc[*b + 1] - qs, si = items_of(qlen, G, Hkv, rows);
        if (it < *first + si.items) break;
    }
    item_pos p = {.b = *b, .qs = qs, .prefill = qlen > 1};
    size_t ntiles = si.items / Hkv, tile = (it - *first) % ntiles;
    p.kvh = (it - *first) / ntiles;
    p.tok0 = tile * si.tq, p.tn = qlen - p.tok0 < si.tq ? qlen - p.tok0 : si.tq;
    p.pos0 = seq_lens[*b] - qlen + p.tok0; /* the tile's first position; its tokens follow */
    p.lo0 = window && p.pos0 + 1 > window ? p.pos0 + 1 - window : 0, p.n = p.pos0 + p.tn - p.lo0;
    if (!causal) p.n = seq_lens[*b] - p.lo0; /* every key of the sequence, the later tokens' too */
    return p;
}

/* tn query rows of `bytes` each, `stride` apart. (Not through prefetch_row: with a third
 * caller GCC no longer specialises its 128-byte case inside the score and value loops.) */
static void prefetch_q(size_t tn, const char *q, size_t stride, size_t bytes) {
    for (size_t i = 0; i < tn; i++)
        for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(q + i * stride + o);
}

/* Key and value row addresses of keys lo0 .. lo0 + filled of sequence b: the next item of the
 * same sequence (another KV head, a later tile) reuses them and adds only its new keys */
typedef struct {
    size_t b, lo0, filled;
    const char **k, **v;
} row_set;
typedef struct { /* where the rows live */
    const int64_t *block_tables;
    size_t max_blocks, block_size, row_bytes;
    const char *k_cache, *v_cache;
} row_src;
static inline int row_set_has(const row_set *r, size_t b, size_t lo0) { return r->b == b && r->lo0 == lo0; }
static void row_set_fill(row_set *r, const row_src *c, size_t b, size_t lo0, size_t n) {
    if (!row_set_has(r, b, lo0)) r->b = b, r->lo0 = lo0, r->filled = 0;
    const int64_t *table = c->block_tables + b * c->max_blocks;
    for (size_t j = r->filled, blk = (lo0 + j) / c->block_size, in = (lo0 + j) % c->block_size; j < n; j++) {
        size_t off = ((size_t)table[blk] * c->block_size + in) * c->row_bytes; /* (no division per key) */
        r->k[j] = c->k_cache + off, r->v[j] = c->v_cache + off;
        if (++in == c->block_size) in = 0, blk++;
    }
    r->filled = n > r->filled ? n : r->filled;
}

static void attention_team(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                           const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                           const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                           const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                           size_t window, int causal, void *y) {
    /* y: dt's rows, or with PXL_YR fp32 values as bf16 rows PXL_LDXR apart (for o_proj) */
    const int ydt = dt & PXL_YR ? PXL_BF16 : PXL_DT(dt);
    const size_t yes = ydt == PXL_F32 ? 4 : 2, ldy = dt & PXL_YR ? PXL_LDXR(H * hd) * 2 : H * hd * yes;
    dt = PXL_DT(dt);
    size_t es = dt == PXL_F32 ? 4 : 2, ces = cdt == PXL_F32 ? 4 : 2, row_bytes = Hkv * hd * ces, G = H / Hkv;
    size_t t0, t1;
    pxl_split(T, 1, &t0, &t1);
    for (size_t t = t0; t < t1; t++) { /* write this step's keys and values; slot < 0 marks padding */
        if (slot_mapping[t] < 0) continue;
        size_t at = (size_t)slot_mapping[t] * row_bytes;
        store_row(dt, cdt, Hkv * hd, (const char *)k + t * Hkv * hd * es, (char *)k_cache + at);
        store_row(dt, cdt, Hkv * hd, (const char *)v + t * Hkv * hd * es, (char *)v_cache + at);
    }
    const pxl_kernel_set *ks = pxl_kernels();
    size_t tile_rows = sums_on_tiles(ks, cdt, hd, window) ? TILE_ROWS_TILES : TILE_ROWS; /* a prefill tile's */
    size_t max_len = 0, items = 0;
    for (size_t b = 0; b < B; b++) {
        max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
        items += items_of(query_start_loc[b + 1] - query_start_loc[b], G, Hkv, tile_rows).items;
    }
    size_t R_max = tile_rows > G ? tile_rows : G, lds = (max_len + 31) / 32 * 32;
    /* per thread: two row sets' key / value row addresses (n each); q, out (R, hd); scores (R,
     * lds); 17 widened key rows, or the tile kernel's split q (48 hd bf16) and a zero row; with
     * tile kernels, their keys (lds + 16 rows of hd bf16), values (lds rows) and weights (lds / 32
     * blocks of 3 x 16 x 32 bf16), each from a whole line */
    size_t kt_n = (lds + 16) * hd, vt_n = ks->attn_pv ? lds * hd : 0, pa_n = ks->attn_pv ? lds * 48 : 0;
    size_t tile_bytes = ks->attn_kt && cdt == PXL_BF16 ? (kt_n + vt_n + pa_n) * 2 + 64 : 0;
    const char **rows =
        pxl_scratch(3, 4 * max_len * sizeof(char *) + (2 * R_max * hd + R_max * lds + 25 * hd) * 4 + tile_bytes);
    float *qf = (float *)(rows + 4 * max_len), *of = qf + R_max * hd, *s = of + R_max * hd, *kw = s + R_max * lds;
    uint16_t *kt = (uint16_t *)(((uintptr_t)(kw + 25 * hd) + 63) & ~(uintptr_t)63); /* whole lines a tile row */
    tile_cache tc = {.b = SIZE_MAX, .kt = kt, .one = kt + lds * hd, .vt = kt + kt_n, .pa = kt + kt_n + vt_n};
    row_set rs[2] = {{SIZE_MAX, 0, 0, rows, rows + max_len}, {SIZE_MAX, 0, 0, rows + 2 * max_len, rows + 3 * max_len}};
    const row_src src = {block_tables, max_blocks, block_size, row_bytes, (const char *)k_cache, (const char *)v_cache};
    size_t chunk = items / (8 * PXL_NTH()) + 1;
    chunk = chunk < CHUNK ? chunk : CHUNK;
    size_t nchunks = (items + chunk - 1) / chunk, b = 0, first = 0; /* the last item's sequence, its first item */
    int cur = 0;
#pragma omp barrier /* every row of this step is in the cache before anyone reads it */
#pragma omp for schedule(dynamic, 1) nowait
    for (size_t c = 0; c < nchunks; c++) { /* chunks of items in (sequence, KV head, tile) order */
        size_t end = (c + 1) * chunk < items ? (c + 1) * chunk : items, unfetched = SIZE_MAX;
        for (size_t it = c * chunk; it < end; it++) {
            if (it < first) b = 0, first = 0; /* (a thread's items only ever increase; kept safe anyway) */
            item_pos p = locate(it, &b, &first, query_start_loc, seq_lens, G, Hkv, tile_rows, window, causal);
            if (!row_set_has(&rs[cur], p.b, p.lo0) && row_set_has(&rs[cur ^ 1], p.b, p.lo0)) cur ^= 1;
            row_set_fill(&rs[cur], &src, p.b, p.lo0, p.n);
            size_t off = p.kvh * hd * ces;
            /* queues: the scores' own look-ahead over the rows the item before did not fetch
             * (all of them for a chunk's first item, whose chunk may follow another thread's;
             * a later tile's older keys, which may have left L1), then the next item's keys
             * during the scores and its values during the weighted sums */
            pf_queue pf[3], pv = {0};
            int npf = 0;
            unfetched = unfetched < p.n ? unfetched : p.n;
            if (unfetched) {
                size_t kn = unfetched < PF_KEYS ? unfetched : PF_KEYS;
                pf[0] = (pf_queue){rs[cur].k, off, hd * ces, 0, unfetched};
                pf[1] = (pf_queue){rs[cur].v, off, hd * ces, 0, unfetched};
                pf_take(&pf[0], kn), pf_take(&pf[1], kn), npf = 2;
            }
            if (it + 1 < end) {
                size_t nb = b, nf = first;
                item_pos x = locate(it + 1, &nb, &nf, query_start_loc, seq_lens, G, Hkv, tile_rows, window, causal);
                int nx = row_set_has(&rs[cur], x.b, x.lo0) ? cur : cur ^ 1;
                row_set_fill(&rs[nx], &src, x.b, x.lo0, x.n);
                /* a later tile of this one's head reads the rows this one has just read, and more */
                size_t from = x.b == p.b && x.kvh == p.kvh && x.lo0 == p.lo0 ? p.n : 0;
                unfetched = from;
                pf[npf++] = (pf_queue){rs[nx].k, x.kvh * hd * ces, hd * ces, from, x.n};
                pv = (pf_queue){rs[nx].v, x.kvh * hd * ces, hd * ces, from, x.n};
                /* and a prefill tile's query rows: they come from L3 (a step's q is megabytes),
                 * and the next item would otherwise start by waiting on them */
                if (x.tn > 1) prefetch_q(x.tn, (const char *)q + ((x.qs + x.tok0) * H + x.kvh * G) * hd * es,
                                         H * hd * es, G * hd * es);
            }
            tc.keep = p.prefill; /* the next tile of a prefill's head reads its rows again */
            if (tc.keep && (tc.b != p.b || tc.kvh != p.kvh || tc.lo0 != p.lo0))
                tc.b = p.b, tc.kvh = p.kvh, tc.lo0 = p.lo0, tc.kblocks = tc.vblocks = 0;
            size_t head = (p.qs + p.tok0) * H + p.kvh * G; /* the first row's (token, head) */
            tile_head(dt, cdt, p.tn, G, H, hd, p.pos0, p.lo0, p.n, window, causal, scale, softcap,
                      (const char *)q + head * hd * es, rs[cur].k, rs[cur].v, off, ydt,
                      (char *)y + (p.qs + p.tok0) * ldy + p.kvh * G * hd * yes, ldy, qf, of,
                      s, lds, kw, &tc, pf, npf, &pv);
            for (int i = 0; i < npf; i++) pf_take(&pf[i], SIZE_MAX); /* (rows the loops did not reach) */
            pf_take(&pv, SIZE_MAX);
        }
    }
}

void pxl_paged_attention_mask(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                              const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                              const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                              const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                              size_t window, int causal, void *y) {
    size_t max_len = 0;
    for (size_t b = 0; b < B; b++) max_len = (size_t)seq_lens[b] > max_len ? (size_t)seq_lens[b] : max_len;
    int nth = T * Hkv * max_len < 4096 ? 1 : pxl_num_threads();
    window = causal ? window : 0; /* (no window on a bidirectional mask) */
    PXL_ON_TEAM(nth, attention_team(dt, cdt, T, B, H, Hkv, hd, q, k, v, k_cache, v_cache, block_size, slot_mapping,
                                    block_tables, max_blocks, seq_lens, query_start_loc, scale, softcap, window,
                                    causal, y));
}

void pxl_paged_attention(int dt, int cdt, size_t T, size_t B, size_t H, size_t Hkv, size_t hd, const void *q,
                         const void *k, const void *v, void *k_cache, void *v_cache, size_t block_size,
                         const int64_t *slot_mapping, const int64_t *block_tables, size_t max_blocks,
                         const int64_t *seq_lens, const int64_t *query_start_loc, float scale, float softcap,
                         size_t window, void *y) {
    pxl_paged_attention_mask(dt, cdt, T, B, H, Hkv, hd, q, k, v, k_cache, v_cache, block_size, slot_mapping,
                             block_tables, max_blocks, seq_lens, query_start_loc, scale, softcap, window, 1, y);
}
