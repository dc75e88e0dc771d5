/* Attention scores on AMX tiles: 16 keys of a bf16 KV cache against up to 16 query rows.
 *
 * The fp32 query rows come as three bf16 tiles per 32 dims, hi, mid and lo, each the next 8
 * bits of q's 24-bit mantissa (pxl_attention.c splits them once per item); the keys are bf16
 * already, so every product is exact and a score differs from the float32 dot product on the
 * same keys only in the order of its sums. A key block is 16 cache rows at scattered
 * addresses; per 32 dims each row's 64 bytes are one vector of 16 bf16 pairs, and a 16 x 16
 * transpose of those pairs is AMX's "VNNI" layout of B (row i: dims 2i, 2i + 1 of every key).
 * pxl_attn_kt_amx builds those tiles once; pxl_attention.c keeps them for the later query
 * tiles of a prefill, which read the same keys. Three tdpbf16ps per 32 dims (hi, mid, lo) sum
 * into one 16 x 16 fp32 tile. Each score is its row's and key's own sum, whatever else shares
 * the tile, so decode and prefill rows get the same bits. */
#include "pxl_amx.h"
#include "pxl_kernels.h"

#define S 0  /* the scores: rows x 16 keys, fp32 */
#define QH 1 /* q's hi, mid and lo parts: rows x 32 dims, bf16 */
#define QM 2
#define QL 4
#define KT 3 /* the keys' transposed block: 16 pairs of dims x 16 keys */

void pxl_attn_qk_config_amx(int rows) {
    pxl_tile_config want = {.palette = 1};
    want.rows[S] = want.rows[QH] = want.rows[QM] = want.rows[QL] = (uint8_t)rows, want.rows[KT] = 16;
    for (int t = S; t <= QL; t++) want.colsb[t] = 64;
    pxl_tile_configure(&want);
}

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
 * pxl_attn_kt_amx's tiles kt; the tiles configured for those rows by pxl_attn_qk_config_amx */
void pxl_attn_qk_amx(size_t hd, const uint16_t *qa, const uint16_t *kt, float *s, size_t lds) {
    PXL_TILE_WRITTEN(kt);
    _tile_zero(S);
    for (size_t c = 0; c < hd / 32; c++) {
        _tile_loadd(KT, kt + c * 512, 64);
        _tile_loadd(QH, qa + c * 3 * 16 * 32, 64);
        _tile_loadd(QM, qa + (c * 3 + 1) * 16 * 32, 64);
        _tile_loadd(QL, qa + (c * 3 + 2) * 16 * 32, 64);
        _tile_dpbf16ps(S, QH, KT);
        _tile_dpbf16ps(S, QM, KT);
        _tile_dpbf16ps(S, QL, KT);
    }
    _tile_stored(S, s, lds * sizeof(float));
}
