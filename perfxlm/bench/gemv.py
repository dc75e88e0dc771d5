"""Linear y (rows, N) = x (rows, K) @ W^T: ours vs OpenBLAS vs torch, side by side in one run.

rows = 1 is the decode GEMV; rows > 1 (e.g. 512, a prefill) the GEMM. Shapes are SmolLM2-135M's
(K -> N: 576->1536 gate/up, 1536->576 down, 576->49152 lm_head) and 4096x4096. Each cell is
the median time of one call; GB/s counts the weight bytes read (the roofline of a
bandwidth-bound GEMV), GFLOP/s the 2*rows*N*K of a GEMM. Ours runs as the cpu engine does:
float32 x and y whatever the weights (bf16 ones multiply x rounded to bf16). Quantised weights
are compared with OpenBLAS and torch on their dequantised fp32 copy: what one would run without
our kernels; bf16 with torch's bf16 mm.
"""

import ctypes
import statistics
import time

import numpy as np

# (K, N): every SmolLM2 Linear shape (k/v, q/o, gate/up, down, lm_head), and a 7B-class square one
SHAPES = [(576, 192), (576, 576), (576, 1536), (1536, 576), (576, 49152), (4096, 4096)]
# gate/up also runs as the engine runs it: one fused pass, y = silu(x Wg^T) * (x Wu^T), over panels
# of 16 gate and 16 up rows each ("gated": N = 1536 outputs from 2 x 1536 weight rows; torch: two mms,
# silu, mul)
GATED = (576, 1536)
FORMATS = ("fp32", "bf16", "q8_0", "q4_0", "q4_1")


def _time(fn, min_time: float = 0.2) -> float:
    # On a 2-core machine the libraries' idle worker threads compete: OpenBLAS and both
    # OpenMP runtimes (ours, torch's bundled one) spin for milliseconds after a call. Let
    # the previous library's threads go to sleep first, so each is timed on quiet cores.
    time.sleep(0.3)
    fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time / 4:
        fn()
        reps += 1
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(max(reps, 1)):
            fn()
        samples.append((time.perf_counter() - t) / max(reps, 1))
    return statistics.median(samples)


def run(threads: int, formats: list[str], rows: int = 1) -> list[dict]:
    import ml_dtypes
    import torch

    from graph_export.quant import dequantize, quantize
    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import host_zeros
    from perfxlm.bench import openblas

    lib = library.load()
    lib.pxl_set_num_threads(threads)
    openblas.set_threads(threads)
    torch.set_num_threads(threads)
    blas = openblas.load()
    table = []
    rng = np.random.default_rng(0)
    for K, N in SHAPES:
        w32 = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
        x32 = rng.standard_normal((rows, K)).astype(np.float32)
        for fmt in formats:
            y = np.empty((rows, N), np.float32)
            if fmt == "fp32":
                w, x, code, nbytes = w32, x32, library.F32, w32.nbytes
                tw, tx = torch.from_numpy(w32), torch.from_numpy(x32)
            elif fmt == "bf16":  # as the cpu engine runs bf16 models: float32 x and y, bf16 weights
                w, x = w32.astype(ml_dtypes.bfloat16), x32
                code, nbytes = library.BF16, w.nbytes
                tw = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16)
                tx = torch.from_numpy(x32).to(torch.bfloat16)  # torch: its bf16 mm on bf16 x, as vLLM's CPU path
            else:  # q4_1 / q4_0 / q8_0: torch and OpenBLAS get the dequantised fp32 weights
                w = quantize(w32, fmt)
                x, code, nbytes = x32, {"q8_0": library.Q8_0, "q4_0": library.Q4_0, "q4_1": library.Q4_1}[fmt], w.nbytes
                tw, tx = torch.from_numpy(dequantize(w, fmt)), torch.from_numpy(x32)
            if lib.pxl_packed_bytes(code, N, K):  # what the engine runs: the kernel set's packed copy
                packed = host_zeros((lib.pxl_packed_bytes(code, N, K),), np.uint8)
                lib.pxl_pack_weights(code, N, K, w.__array_interface__["data"][0],
                                     packed.__array_interface__["data"][0])
                w, code = packed, library.PACKED[code]
            # x and y on cache lines too, as the engine's activation buffers are
            xa, y = host_zeros(x.shape, x.dtype), host_zeros(y.shape, y.dtype)
            xa[...] = x
            x = xa
            pw, px, py = (a.__array_interface__["data"][0] for a in (w, x, y))
            ours = _time(lambda: lib.pxl_linear(library.F32, code, rows, N, K, px, pw, None, py))
            ty = torch.empty((rows, N), dtype=tx.dtype)
            ref = _time(lambda: torch.mm(tx, tw.t(), out=ty))
            row = {"rows": rows, "K": K, "N": N, "format": fmt, "ours_us": ours * 1e6, "torch_us": ref * 1e6,
                   "ours_GBs": nbytes / ours / 1e9, "ours_GFLOPs": 2 * rows * N * K / ours / 1e9,
                   "weight_MB": nbytes / 1e6}
            if fmt != "bf16":  # scipy-openblas32 has no bf16 routines
                wb = w32 if fmt == "fp32" else np.ascontiguousarray(tw.numpy())
                yb = np.empty((rows, N), np.float32)
                pwb, pxb, pyb = (a.__array_interface__["data"][0] for a in (wb, x32, yb))
                if rows == 1:
                    args = [openblas.ROW_MAJOR, openblas.NO_TRANS, N, K, ctypes.c_float(1.0), pwb, K, pxb, 1,
                            ctypes.c_float(0.0), pyb, 1]
                    row["openblas_us"] = _time(lambda: blas.scipy_cblas_sgemv(*args)) * 1e6
                else:
                    args = [openblas.ROW_MAJOR, openblas.NO_TRANS, openblas.TRANS, rows, N, K, ctypes.c_float(1.0), pxb,
                            K, pwb, K, ctypes.c_float(0.0), pyb, N]
                    row["openblas_us"] = _time(lambda: blas.scipy_cblas_sgemm(*args)) * 1e6
            table.append(row)
            if fmt in ("fp32", "bf16") and (K, N) == GATED and code in (library.F32P, library.BF16P):
                table.append(_gated(lib, library.F32 if fmt == "fp32" else library.BF16, code, rows, N, K, w32, x, tx,
                                    tw))
    return table


def _gated(lib, wfmt: int, code: int, rows: int, N: int, K: int, w32, x, tx, tw) -> dict:
    """The gated row: pxl_linear_silu on gate and up (wfmt: fp32 or bf16) packed as the engine packs
    them (gate = the shape's weights, up = them reversed), float32 x and y, vs torch's
    silu(x Wg^T) * (x Wu^T)."""
    import ml_dtypes
    import torch

    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import host_zeros

    wu32 = np.ascontiguousarray(w32[::-1])
    wg, wu = (w32, wu32) if wfmt == library.F32 else (w32.astype(ml_dtypes.bfloat16), wu32.astype(ml_dtypes.bfloat16))
    packed = host_zeros((2 * lib.pxl_packed_bytes(wfmt, N, K),), np.uint8)
    lib.pxl_pack_gated(wfmt, N, K, *(a.__array_interface__["data"][0] for a in (wg, wu, packed)))
    y = host_zeros((rows, N), np.float32)
    px, pw, py = (a.__array_interface__["data"][0] for a in (x, packed, y))
    ours = _time(lambda: lib.pxl_linear_silu(library.F32, code, rows, N, K, px, pw, py))
    twu = torch.flip(tw, [0]).contiguous()
    ref = _time(lambda: torch.nn.functional.silu(tx @ tw.t()) * (tx @ twu.t()))
    nbytes = wg.nbytes + wu.nbytes
    return {"rows": rows, "K": K, "N": N, "format": "gated", "ours_us": ours * 1e6, "torch_us": ref * 1e6,
            "ours_GBs": nbytes / ours / 1e9, "ours_GFLOPs": 4 * rows * N * K / ours / 1e9, "weight_MB": nbytes / 1e6}


def report(rows: list[dict]) -> str:
    rate = "GB/s" if rows[0]["rows"] == 1 else "GF/s"
    head = f"{'K->N':>12} {'fmt':>8} {'MB':>6} | {'ours us':>9} {rate:>6} | {'OpenBLAS us':>11} | {'torch us':>9} | " \
           f"{'vs BLAS':>7} {'vs torch':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        blas = r.get("openblas_us")
        blas_cell = "n/a" if blas is None else f"{blas:.1f}"
        vs_blas = "" if blas is None else f"{blas / r['ours_us']:.2f}x"
        lines.append(f"{r['K']:>5}->{r['N']:<6} {r['format']:>8} {r['weight_MB']:6.1f} | {r['ours_us']:9.1f} "
                     f"{r['ours_GBs' if r['rows'] == 1 else 'ours_GFLOPs']:6.1f} | {blas_cell:>11} | {r['torch_us']:9.1f} | {vs_blas:>7} "
                     f"{r['torch_us'] / r['ours_us']:7.2f}x")
    return "\n".join(lines)
