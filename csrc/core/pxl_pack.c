/* Weights in the kernel set's own layouts (perfxlm_ops.h: pxl_packed_bytes, pxl_pack_weights,
 * pxl_pack_gated): dense weights in 32-feature panels, bf16 with K in pairs or fp32, and GGUF
 * blocks repacked 16 rows at a time (pxl_qrepack.c). Done once at load. */
#include "pxl_kquants.h"
#include "pxl_linear.h"

size_t pxl_packed_bytes(int wfmt, size_t N, size_t K) {
    const pxl_kernel_set *ks = pxl_kernels();
    if (PXL_IS_KQUANT(wfmt) && !PXL_IS_KR(wfmt))
        return pxl_gemm_kr_for(ks) && K % PXL_QK_K == 0 && K / PXL_QK_K <= PXL_QK_K_MAX_BLOCKS
                   ? (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * PXL_QR_ROWS * pxl_row_bytes(pxl_kr_of(wfmt), K)
                   : 0;
    if (wfmt >= PXL_Q8_0 && wfmt <= PXL_Q4_1)
        return ks->gemv_qr[wfmt] && K % PXL_QK == 0
                   ? (N + PXL_QR_ROWS - 1) / PXL_QR_ROWS * PXL_QR_ROWS * pxl_row_bytes(wfmt, K)
                   : 0;
    if (wfmt == PXL_F32 && ks->gemm_f32p) return (N + PXL_PANEL - 1) / PXL_PANEL * K * PXL_PANEL * 4;
    if (wfmt != PXL_BF16 || K % 2 || !ks->gemm_bf16p) return 0;
    return (N + PXL_PANEL - 1) / PXL_PANEL * K * PXL_PANEL * 2;
}

/* one panel: rows [0, rows) of src (rows, K) in fp32 or bf16 -> [K/2][32][2] bf16, zero-padded */
void pxl_pack_panel(int src_fmt, size_t rows, size_t K, const void *src, uint16_t *out) {
    for (size_t p = 0; p < K / 2; p++)
        for (size_t j = 0; j < PXL_PANEL; j++)
            for (size_t h = 0; h < 2; h++) {
                uint16_t v = 0;
                if (j < rows)
                    v = src_fmt == PXL_BF16 ? ((const uint16_t *)src)[j * K + 2 * p + h]
                                            : pxl_f32_to_bf16(((const float *)src)[j * K + 2 * p + h]);
                out[(p * PXL_PANEL + j) * 2 + h] = v;
            }
}

/* fp32 rows [0, rows) of src (rows, K) -> [K][32] fp32, zero-padded */
static void pack_panel_f32(size_t rows, size_t K, const float *src, float *out) {
    for (size_t k = 0; k < K; k++)
        for (size_t j = 0; j < PXL_PANEL; j++) out[k * PXL_PANEL + j] = j < rows ? src[j * K + k] : 0.0f;
}

void pxl_pack_weights(int wfmt, size_t N, size_t K, const void *W, void *out) {
    if (PXL_IS_KQUANT(wfmt) && !PXL_IS_KR(wfmt)) {
        pxl_repack_qk(wfmt, N, K, W, out);
        return;
    }
    if (wfmt >= PXL_Q8_0 && wfmt <= PXL_Q4_1) {
        pxl_repack_q(wfmt, N, K, W, out);
        return;
    }
    if (wfmt == PXL_F32) {
        for (size_t n = 0; n < N; n += PXL_PANEL)
            pack_panel_f32(N - n < PXL_PANEL ? N - n : PXL_PANEL, K, (const float *)W + n * K, (float *)out + n * K);
        return;
    }
    for (size_t n = 0; n < N; n += PXL_PANEL)
        pxl_pack_panel(wfmt, N - n < PXL_PANEL ? N - n : PXL_PANEL, K, (const uint16_t *)W + n * K,
                   (uint16_t *)out + n * K);
}

/* panel j: features 0-15 are gate rows 16j .. 16j + 15, features 16-31 the same rows of up, so
 * one call's accumulators hold both factors of 16 outputs (the tail's missing rows are zeros) */
void pxl_pack_gated(int wfmt, size_t N, size_t K, const void *Wg, const void *Wu, void *out) {
    size_t es = wfmt == PXL_F32 ? 4 : 2, half = PXL_PANEL / 2, slot = (size_t)PXL_PANEL * K * es;
    for (size_t n = 0; n < N; n += half) {
        size_t rows = N - n < half ? N - n : half;
        char *dst = (char *)out + n / half * slot;
        memset(dst, 0, slot);
        for (int h = 0; h < 2; h++) { /* features h * 16 + j <- row n + j of gate (h = 0) or up */
            const char *src = (const char *)(h ? Wu : Wg) + n * K * es;
            for (size_t j = 0; j < rows; j++)
                for (size_t k = 0; k < K; k++) {
                    size_t f = h * half + j;
                    if (wfmt == PXL_F32)
                        ((float *)dst)[k * PXL_PANEL + f] = ((const float *)src)[j * K + k];
                    else /* [K/2][32][2] */
                        ((uint16_t *)dst)[(k / 2 * PXL_PANEL + f) * 2 + k % 2] = ((const uint16_t *)src)[j * K + k];
                }
        }
    }
}
