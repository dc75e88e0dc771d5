/* Attention on AMX tiles over a bf16 KV cache: the scores q.k and the weighted sums p.v.
 *
 * Both multiply fp32 by bf16 exactly: the fp32 side (q's rows, the softmax's weights) comes as
 * three bf16 tiles, hi, mid and lo, each the next 8 bits of the 24-bit mantissa
 * (pxl_attention.c splits them), and the cache's values are bf16 already. So a sum differs
 * from the float32 one over the same cache only in its order. Each sum is its row's own,
 * whatever else shares the tile: a row's bits do not depend on the other rows.
 *
 * Scores: a block is 16 keys at scattered addresses. Per 32 dims each key row's 64 bytes are
 * one vector of 16 bf16 pairs, and a 16 x 16 transpose of those pairs is AMX's "VNNI" layout
 * of B (row i: dims 2i, 2i + 1 of every key); pxl_attn_kt_amx lays a block out once, and
 * pxl_attention.c keeps the blocks for a prefill's later query tiles. Three tdpbf16ps per 32
 * dims (hi, mid, lo) sum into one rows x 16 fp32 tile.
 *
 * Weighted sums: a block is 32 keys. The weights' tiles are rows x 32 keys; B is the values
 * with keys in pairs, per 16 dims (row i: dims d of keys 2i, 2i + 1 interleaved), laid out by
 * pxl_attn_vt_amx. Up to 64 dims a pass sum in four fp32 tiles over every block in increasing
 * order, hi, mid, lo within each; weights past a row's own keys are zero and add nothing. */
#include "pxl_amx.h"
#include "pxl_kernels.h"

/* tile registers, one configuration for both (pxl_attn_config_amx): up to four fp32 sums of
 * `rows` rows (the scores use the first), three bf16 parts of q or of the weights, and the
 * keys' or values' block of 16 rows */
#define C0 0
#define C1 1
#define C2 2
#define C3 3
#define PH 4
#define PM 5
#define PL 6
#define B 7

static pxl_tile_config configs[17]; /* per rows, built once (as the GEMM's) */
__attribute__((constructor)) static void build_configs(void) {
    for (int rows = 1; rows <= 16; rows++) {
        pxl_tile_config *c = &configs[rows];
        c->palette = 1;
        for (int t = C0; t <= PL; t++) c->rows[t] = (uint8_t)rows;
        c->rows[B] = 16;
        for (int t = C0; t <= B; t++) c->colsb[t] = 64;
    }
}
void pxl_attn_config_amx(int rows) { pxl_tile_configure(&configs[rows]); }

/* v[i] = the i-th 32-bit lane of every input v[j]: a 16 x 16 transpose of 32-bit pairs */
static inline void transpose16(__m512i *v) {
    __m512i t[16], x[8], y[8];
    for (int i = 0; i < 16; i += 2) { /* per 128-bit lane: a0 b0 a1 b1 | a2 b2 a3 b3 */
        t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* v[i + k], lane L: column 4L + k of rows i .. i + 3 */
        v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) { /* lanes 0-1 and 2-3 of rows 0-7 (x) and 8-15 (y) */
        x[k] = _mm512_shuffle_i32x4(v[k], v[4 + k], 0x44);
        x[k + 4] = _mm512_shuffle_i32x4(v[k], v[4 + k], 0xee);
        y[k] = _mm512_shuffle_i32x4(v[8 + k], v[12 + k], 0x44);
        y[k + 4] = _mm512_shuffle_i32x4(v[8 + k], v[12 + k], 0xee);
    }
    for (int k = 0; k < 4; k++) { /* column 4L + k: lane L of rows 0-3, 4-7, 8-11, 12-15 */
        v[k] = _mm512_shuffle_i32x4(x[k], y[k], 0x88);
        v[4 + k] = _mm512_shuffle_i32x4(x[k], y[k], 0xdd);
        v[8 + k] = _mm512_shuffle_i32x4(x[k + 4], y[k + 4], 0x88);
        v[12 + k] = _mm512_shuffle_i32x4(x[k + 4], y[k + 4], 0xdd);
    }
}

/* kt (hd / 32 tiles of 16 rows x 64 bytes) = the keys at kr[0 .. 16) (hd bf16 each) in the
 * tiles' layout: per 32 dims, row i holds dims 2i and 2i + 1 of every key */
void pxl_attn_kt_amx(size_t hd, const char *const *kr, uint16_t *kt) {
    for (size_t c = 0; c < hd / 32; c++) {
        __m512i v[16];
        for (int j = 0; j < 16; j++) v[j] = _mm512_loadu_si512(kr[j] + c * 64);
        transpose16(v);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512(kt + c * 512 + i * 32, v[i]);
    }
}

/* s[r * lds + j] (r < rows, j < 16) = sum over d of q[r][d] k_j[d], q as qa's tiles (hd / 32
 * chunks of [hi, mid, lo], each 16 rows x 32 bf16, 64 bytes a row), the keys as
 * pxl_attn_kt_amx's tiles kt */
void pxl_attn_qk_amx(size_t hd, const uint16_t *qa, const uint16_t *kt, float *s, size_t lds) {
    PXL_TILE_WRITTEN(kt);
    _tile_zero(C0);
    for (size_t c = 0; c < hd / 32; c++) {
        _tile_loadd(B, kt + c * 512, 64);
        _tile_loadd(PH, qa + c * 3 * 16 * 32, 64);
        _tile_loadd(PM, qa + (c * 3 + 1) * 16 * 32, 64);
        _tile_loadd(PL, qa + (c * 3 + 2) * 16 * 32, 64);
        _tile_dpbf16ps(C0, PH, B);
        _tile_dpbf16ps(C0, PM, B);
        _tile_dpbf16ps(C0, PL, B);
    }
    _tile_stored(C0, s, lds * sizeof(float));
}

/* vt (hd / 16 tiles of 16 rows x 64 bytes) = the 32 value rows at vr[0 .. 32) (hd bf16 each)
 * in the tiles' layout: per 16 dims, row i holds those dims of values 2i and 2i + 1, pairwise */
void pxl_attn_vt_amx(size_t hd, const char *const *vr, uint16_t *vt) {
    __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                  36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int i = 0; i < 16; i++)
        for (size_t c = 0; c < hd / 32; c++) {
            __m512i a = _mm512_loadu_si512(vr[2 * i] + c * 64), b = _mm512_loadu_si512(vr[2 * i + 1] + c * 64);
            _mm512_storeu_si512(vt + 2 * c * 512 + i * 32, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vt + (2 * c + 1) * 512 + i * 32, _mm512_permutex2var_epi16(a, hi, b));
        }
}

/* sum C += the weights' three parts (in PH, PM, PL) times the values' tile of 16 dims at v */
#define PV3(C, v)                      \
    do {                               \
        _tile_loadd(B, v, 64);         \
        _tile_dpbf16ps(C, PH, B);      \
        _tile_dpbf16ps(C, PM, B);      \
        _tile_dpbf16ps(C, PL, B);      \
    } while (0)

/* out (rows x hd fp32, hd apart) = sum over nb blocks of 32 keys of the weights' tiles pa
 * (per block [hi, mid, lo], each 16 rows x 32 bf16) times the values' tiles vt (per block
 * pxl_attn_vt_amx's hd / 16 tiles, 32 hd bf16 apart) */
void pxl_attn_pv_amx(size_t hd, const uint16_t *pa, size_t nb, const uint16_t *vt, float *out) {
    PXL_TILE_WRITTEN(pa);
    PXL_TILE_WRITTEN(vt);
    const size_t chunks = hd / 16, ld = hd * sizeof(float);
    for (size_t c0 = 0; c0 < chunks; c0 += 4) { /* 64 dims a pass: four sums, each a tile */
        const size_t nc = chunks - c0 < 4 ? chunks - c0 : 4;
        _tile_zero(C0);
        _tile_zero(C1);
        if (nc > 2) {
            _tile_zero(C2);
            _tile_zero(C3);
        }
        for (size_t b = 0; b < nb; b++) {
            const uint16_t *p = pa + b * 3 * 512, *v = vt + b * 32 * hd + c0 * 512;
            _tile_loadd(PH, p, 64);
            _tile_loadd(PM, p + 512, 64);
            _tile_loadd(PL, p + 1024, 64);
            PV3(C0, v);
            PV3(C1, v + 512);
            if (nc > 2) {
                PV3(C2, v + 1024);
                PV3(C3, v + 1536);
            }
        }
        _tile_stored(C0, out + c0 * 16, ld);
        _tile_stored(C1, out + c0 * 16 + 16, ld);
        if (nc > 2) {
            _tile_stored(C2, out + c0 * 16 + 32, ld);
            _tile_stored(C3, out + c0 * 16 + 48, ld);
        }
    }
}
