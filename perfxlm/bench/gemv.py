"""Linear y (rows, N) = x (rows, K) @ W^T: ours vs OpenBLAS vs torch, side by side in one run.

rows = 1 is the decode GEMV; rows > 1 (e.g. 512, a prefill) the GEMM. Shapes are SmolLM2-135M's
(K -> N: 576->1536 gate/up, 1536->576 down, 576->49152 lm_head) and 4096x4096, or the caller's.
Each cell is the median time of one call; GB/s counts the weight bytes read (the roofline of a
bandwidth-bound GEMV), GFLOP/s the 2*rows*N*K of a GEMM. Ours runs as the cpu engine does:
float32 x and y whatever the weights (bf16 ones multiply x rounded to bf16). Quantised weights
are compared with OpenBLAS and torch on their dequantised fp32 copy: what one would run without
our kernels (K-quants: random blocks, which gguf's Python side cannot quantise to, but which
time the same); bf16 with torch's bf16 mm, which takes bf16 x and y: the "bf16 x/y" row runs
ours so too. With a baseline library (another build of our kernels) both builds run on the
same x, each on its own packed copy of the weights, their calls alternating, and the table adds
the baseline's time. Cold (--cold): each call reads the next of enough copies of its weights to
fill twice the last-level cache, so they come from memory as a model's decode step streams them;
otherwise a shape small enough stays in the caches from call to call.
"""

import ctypes
import itertools
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

# (K, N): every SmolLM2 Linear shape (k/v, q/o, gate/up, down, lm_head), and a 7B-class square one
SHAPES = [(576, 192), (576, 576), (576, 1536), (1536, 576), (576, 49152), (4096, 4096)]
# gate/up also runs as the engine runs it: one fused pass, y = silu(x Wg^T) * (x Wu^T), over panels
# of 16 gate and 16 up rows each ("gated": N = 1536 outputs from 2 x 1536 weight rows; torch: two mms,
# silu, mul)
GATED = (576, 1536)
FORMATS = ("fp32", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")
K_QUANTS = ("q4_k", "q5_k", "q6_k")  # 256-weight super-blocks: K a multiple of 256


def _time(fn, min_time: float = 0.2) -> float:
    # On a 2-core machine the libraries' idle worker threads compete: OpenBLAS and both
    # OpenMP runtimes (ours, torch's bundled one) spin for milliseconds after a call. Let
    # the previous library's threads go to sleep first, so each is timed on quiet cores.
    time.sleep(0.3)
    return _time_each([fn], min_time)[0]


def _time_each(fns: list, min_time: float = 0.2) -> list[float]:
    """The median of 5 samples of each fn, each sample as many calls as fill min_time / 4 for the
    first; several fns (builds of our kernels, which share one OpenMP runtime) take their samples
    in turn, so all see the same machine."""
    for fn in fns:
        fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time / 4:
        fns[0]()
        reps += 1
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(5):
        for fn, out in zip(fns, samples):
            t = time.perf_counter()
            for _ in range(max(reps, 1)):
                fn()
            out.append((time.perf_counter() - t) / max(reps, 1))
    return [statistics.median(s) for s in samples]


def _timed(ours, baseline=None) -> tuple[float, dict]:
    """ours' time in s, alone; or with baseline, (its call, a function giving the largest
    difference of its output from ours), the two alternating, and the baseline's columns."""
    if baseline is None:
        return _time(ours), {}
    call, diff = baseline
    t_ours, t_base = _time_each([ours, call])
    return t_ours, {"baseline_us": t_base * 1e6, "baseline_max_abs_diff": float(diff())}


def _row(fmt: str, rows: int, K: int, N: int, ours: float, torch_us: float, nbytes: int, flops: float,
         **extra) -> dict:
    """One table row: ours (s) against torch (us), the rates of `nbytes` of weights and `flops`."""
    return {"rows": rows, "K": K, "N": N, "format": fmt, "ours_us": ours * 1e6, "torch_us": torch_us,
            "ours_GBs": nbytes / ours / 1e9, "ours_GFLOPs": flops / ours / 1e9, "weight_MB": nbytes / 1e6, **extra}


def last_level_cache_bytes() -> int:
    """The largest cache's size as Linux reports it for CPU 0 (64 MiB where it does not)."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        sizes[level] = int(size.rstrip("KMG")) * unit
    return sizes[max(sizes)] if sizes else 64 << 20


class Rotation:
    """An array and, when cold, copies of it filling twice the last-level cache; `next()` gives the
    next one's address (`tensors()` the same copies as torch tensors), so successive calls each
    read weights no earlier call left in the caches."""

    def __init__(self, a: np.ndarray, cold: bool):
        from hw_plugins.cpu.plugin import host_zeros

        self.arrays = [a]
        for _ in range(-(-2 * last_level_cache_bytes() // a.nbytes) - 1 if cold else 0):
            self.arrays.append(host_zeros(a.shape, a.dtype))
            self.arrays[-1][...] = a
        self._addresses = itertools.cycle([c.__array_interface__["data"][0] for c in self.arrays])

    def next(self) -> int:
        return next(self._addresses)

    def tensors(self, as_torch: Callable) -> Callable:
        """A function giving as_torch(copy) for each copy in turn (converted once, here)."""
        return itertools.cycle([as_torch(c) for c in self.arrays]).__next__


def _packed(lib, code: int, w: np.ndarray, N: int, K: int) -> tuple[np.ndarray, int]:
    """W as lib runs it: its kernel set's packed copy where it has one, else as it is."""
    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import host_zeros

    if not lib.pxl_packed_bytes(code, N, K):
        return w, code
    packed = host_zeros((lib.pxl_packed_bytes(code, N, K),), np.uint8)
    lib.pxl_pack_weights(code, N, K, w.__array_interface__["data"][0], packed.__array_interface__["data"][0])
    return packed, library.PACKED[code]


def _k_blocks(rng: np.random.Generator, N: int, K: int, fmt: str) -> np.ndarray:
    """Random Q4_K / Q5_K / Q6_K blocks, uint8 (N, K/256 * block bytes): random quants and
    sub-block scales, small positive fp16 super-block scales (Q4_K's and Q5_K's d and dmin, Q6_K's d)."""
    from graph_export.quant import FORMATS as QUANT_FORMATS

    nb, nbytes = K // 256, QUANT_FORMATS[fmt][1]
    blocks = rng.integers(0, 256, (N, nb, nbytes), dtype=np.uint8)
    d = (rng.random((N, nb, 1)) * 1e-3 + 1e-4).astype(np.float16).view(np.uint8)  # (N, nb, 2)
    for at in ((0, 2) if fmt in ("q4_k", "q5_k") else (208,)):  # where the block keeps its fp16 scales
        blocks[..., at:at + 2] = d
    return blocks.reshape(N, nb * nbytes)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'2048x2048,2048x512' -> [(2048, 2048), (2048, 512)]: (K, N), input then output features."""
    shapes = []
    for item in text.split(","):
        k, sep, n = item.strip().lower().partition("x")
        if not (sep and k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0):
            raise ValueError(f"--shapes: {item!r} is not KxN (input x output features, e.g. 2048x8192)")
        shapes.append((int(k), int(n)))
    return shapes


def run(threads: int, formats: list[str], rows: int = 1, baseline: ctypes.CDLL | None = None,
        shapes: list[tuple[int, int]] | None = None, cold: bool = False) -> list[dict]:
    import ml_dtypes
    import torch

    from graph_export.quant import dequantize, quantize
    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import host_zeros
    from perfxlm.bench import openblas

    lib = library.load()
    for each in (lib, baseline) if baseline is not None else (lib,):
        each.pxl_set_num_threads(threads)
    openblas.set_threads(threads)
    torch.set_num_threads(threads)
    blas = openblas.load()
    table = []
    rng = np.random.default_rng(0)
    for K, N in shapes or SHAPES:
        w32 = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
        x32 = rng.standard_normal((rows, K)).astype(np.float32)
        for fmt in formats:
            y = np.empty((rows, N), np.float32)
            # ref_w: the weights torch (and, but for bf16, OpenBLAS) multiply
            if fmt == "fp32":
                w, x, code, nbytes = w32, x32, library.F32, w32.nbytes
                ref_w, tx = Rotation(w32, cold), torch.from_numpy(x32)
                tw = ref_w.tensors(torch.from_numpy)
            elif fmt == "bf16":  # as the cpu engine runs bf16 models: float32 x and y, bf16 weights
                w, x = w32.astype(ml_dtypes.bfloat16), x32
                code, nbytes = library.BF16, w.nbytes
                ref_w = Rotation(w.view(np.int16), cold)  # numpy has no bf16
                tw = ref_w.tensors(lambda a: torch.from_numpy(a).view(torch.bfloat16))
                tx = torch.from_numpy(x32).to(torch.bfloat16)  # torch: its bf16 mm on bf16 x, as vLLM's CPU path
            else:  # GGUF blocks: torch and OpenBLAS get the dequantised fp32 weights
                w = _k_blocks(rng, N, K, fmt) if fmt in K_QUANTS else quantize(w32, fmt)
                x, code, nbytes = x32, library.FORMATS.index(fmt.upper()), w.nbytes
                ref_w, tx = Rotation(np.ascontiguousarray(dequantize(w, fmt)), cold), torch.from_numpy(x32)
                tw = ref_w.tensors(torch.from_numpy)
            w_plain, code_plain = w, code
            w, code = _packed(lib, code, w, N, K)  # what the engine runs: the kernel set's packed copy
            # x and y on cache lines too, as the engine's activation buffers are
            xa, y = host_zeros(x.shape, x.dtype), host_zeros(y.shape, y.dtype)
            xa[...] = x
            x = xa
            pw, px, py = Rotation(w, cold), *(a.__array_interface__["data"][0] for a in (x, y))
            theirs = None
            if baseline is not None:
                bw, bcode = _packed(baseline, code_plain, w_plain, N, K)
                by = host_zeros(y.shape, y.dtype)
                pbw, pby = Rotation(bw, cold), by.__array_interface__["data"][0]
                theirs = (lambda: baseline.pxl_linear(library.F32, bcode, rows, N, K, px, pbw.next(), None, pby),
                          lambda: np.abs(y - by).max())
            ours, base_row = _timed(lambda: lib.pxl_linear(library.F32, code, rows, N, K, px, pw.next(), None, py),
                                    theirs)
            ty = torch.empty((rows, N), dtype=tx.dtype)
            ref = _time(lambda: torch.mm(tx, tw().t(), out=ty))
            row = _row(fmt, rows, K, N, ours, ref * 1e6, nbytes, 2 * rows * N * K, **base_row)
            if fmt != "bf16":  # scipy-openblas32 has no bf16 routines
                yb = np.empty((rows, N), np.float32)
                pxb, pyb = (a.__array_interface__["data"][0] for a in (x32, yb))
                if rows == 1:
                    def sgemv():
                        blas.scipy_cblas_sgemv(openblas.ROW_MAJOR, openblas.NO_TRANS, N, K, ctypes.c_float(1.0),
                                               ref_w.next(), K, pxb, 1, ctypes.c_float(0.0), pyb, 1)
                    row["openblas_us"] = _time(sgemv) * 1e6
                else:
                    def sgemm():
                        blas.scipy_cblas_sgemm(openblas.ROW_MAJOR, openblas.NO_TRANS, openblas.TRANS, rows, N, K,
                                               ctypes.c_float(1.0), pxb, K, ref_w.next(), K, ctypes.c_float(0.0), pyb, N)
                    row["openblas_us"] = _time(sgemm) * 1e6
            table.append(row)
            if fmt == "bf16":
                table.append(_bf16_xy(lib, code, pw, rows, N, K, x32, y, row["torch_us"], nbytes,
                                      None if baseline is None else (baseline, bcode, pbw)))
            if fmt in ("fp32", "bf16") and (K, N) == GATED and code in (library.F32P, library.BF16P):
                table.append(_gated(lib, library.F32 if fmt == "fp32" else library.BF16, code, rows, N, K, w32, x, tx,
                                    tw(), baseline, cold))
    return table


def _bf16_xy(lib, code: int, w: Rotation, rows: int, N: int, K: int, x32: np.ndarray, y32: np.ndarray,
             torch_us: float, nbytes: int, baseline: tuple | None) -> dict:
    """The "bf16 x/y" row: the bf16 row's kernel on bf16 x and y, as torch's mm (and vLLM's bf16
    models) run it, so the difference from the bf16 row is what float32 activations cost (x
    rounded to bf16 in a pass of its own, float32 y); baseline: (library, its code, its weights).
    y32: the bf16 row's float32 y, which ours must equal to bf16's rounding (bf16_row_max_rel)."""
    import ml_dtypes

    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import host_zeros

    x = host_zeros((rows, K), np.uint16)
    x[...] = x32.astype(ml_dtypes.bfloat16).view(np.uint16)
    def call(lib, code, w):
        y = host_zeros((rows, N), np.uint16)
        px, py = (a.__array_interface__["data"][0] for a in (x, y))
        return y, lambda: lib.pxl_linear(library.BF16, code, rows, N, K, px, w.next(), None, py)

    def widened(y):
        return y.view(ml_dtypes.bfloat16).astype(np.float32)

    y, ours_fn = call(lib, code, w)
    theirs = None
    if baseline is not None:
        by, base_fn = call(*baseline)
        theirs = (base_fn, lambda: np.abs(widened(y) - widened(by)).max())
    ours, base_row = _timed(ours_fn, theirs)
    rel = float((np.abs(widened(y) - y32) / np.maximum(np.abs(y32), 1e-30)).max())
    return _row("bf16 x/y", rows, K, N, ours, torch_us, nbytes, 2 * rows * N * K, bf16_row_max_rel=rel, **base_row)


def _gated(lib, wfmt: int, code: int, rows: int, N: int, K: int, w32, x, tx, tw, baseline=None,
           cold: bool = False) -> dict:
    """The gated row: pxl_linear_silu on gate and up (wfmt: fp32 or bf16) packed as the engine packs
    them (gate = the shape's weights, up = them reversed), float32 x and y, vs torch's
    silu(x Wg^T) * (x Wu^T); and the baseline's, where it packs the same format."""
    import ml_dtypes
    import torch

    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import host_zeros

    wu32 = np.ascontiguousarray(w32[::-1])
    wg, wu = (w32, wu32) if wfmt == library.F32 else (w32.astype(ml_dtypes.bfloat16), wu32.astype(ml_dtypes.bfloat16))
    def pack(lib):
        packed = host_zeros((2 * lib.pxl_packed_bytes(wfmt, N, K),), np.uint8)
        lib.pxl_pack_gated(wfmt, N, K, *(a.__array_interface__["data"][0] for a in (wg, wu, packed)))
        return packed

    packed, y = Rotation(pack(lib), cold), host_zeros((rows, N), np.float32)
    px, py = (a.__array_interface__["data"][0] for a in (x, y))
    theirs = None
    if baseline is not None and baseline.pxl_packed_bytes(wfmt, N, K):
        bpacked, by = Rotation(pack(baseline), cold), host_zeros((rows, N), np.float32)
        pby = by.__array_interface__["data"][0]
        theirs = (lambda: baseline.pxl_linear_silu(library.F32, code, rows, N, K, px, bpacked.next(), pby),
                  lambda: np.abs(y - by).max())
    ours, base_row = _timed(lambda: lib.pxl_linear_silu(library.F32, code, rows, N, K, px, packed.next(), py), theirs)
    pair = torch.stack([tw, torch.flip(tw, [0])])  # gate, up
    raw = pair.view(torch.int16) if pair.dtype == torch.bfloat16 else pair  # numpy has no bf16
    pairs = Rotation(raw.numpy(), cold).tensors(lambda a: torch.from_numpy(a).view(pair.dtype))

    def ref_fn():
        gate, up = pairs()
        return torch.nn.functional.silu(tx @ gate.t()) * (tx @ up.t())
    ref = _time(ref_fn)
    nbytes = wg.nbytes + wu.nbytes
    return _row("gated", rows, K, N, ours, ref * 1e6, nbytes, 4 * rows * N * K, **base_row)


def report(rows: list[dict]) -> str:
    rate = "GB/s" if rows[0]["rows"] == 1 else "GF/s"
    base = any("baseline_us" in r for r in rows)
    head = f"{'K->N':>12} {'fmt':>8} {'MB':>6} | {'ours us':>9} {rate:>6} | {'OpenBLAS us':>11} | {'torch us':>9} | " \
           f"{'vs BLAS':>7} {'vs torch':>8}" + (f" | {'baseline us':>11} {'vs base':>7} {'|ours - base|':>13}" if base else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        blas = r.get("openblas_us")
        blas_cell = "n/a" if blas is None else f"{blas:.1f}"
        vs_blas = "" if blas is None else f"{blas / r['ours_us']:.2f}x"
        line = (f"{r['K']:>5}->{r['N']:<6} {r['format']:>8} {r['weight_MB']:6.1f} | {r['ours_us']:9.1f} "
                f"{r['ours_GBs' if r['rows'] == 1 else 'ours_GFLOPs']:6.1f} | {blas_cell:>11} | {r['torch_us']:9.1f} | {vs_blas:>7} "
                f"{r['torch_us'] / r['ours_us']:7.2f}x")
        if "baseline_us" in r:
            line += f" | {r['baseline_us']:11.1f} {r['baseline_us'] / r['ours_us']:6.2f}x {r['baseline_max_abs_diff']:13.2e}"
        elif base:
            line += f" | {'n/a':>11}"
        lines.append(line)
    return "\n".join(lines)
