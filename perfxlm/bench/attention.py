"""Paged attention: ours vs torch's scaled_dot_product_attention, side by side in one run.

Decode: `batch` sequences of `context` cached tokens plus the new one, blocks laid out as a
W1-style run allocates them (each prompt's blocks together, then one block per sequence in
turn as decoding crosses block boundaries). Prefill: `batch` prompts of `prefill_len`
tokens, causal. Each runs over `layers` layers' caches, so a decode step reads its K and V
from DRAM as the engine does, not from a cache that one layer would fit in. torch gets
the same values as dense contiguous tensors (no block table to follow): what one would run
without a paged kernel. Times are the best of `reps` passes over all layers, per layer.

With a baseline library (another build of libperfxlm_kernels.so, e.g. the last commit's) both
run in this process on the same caches, one pass of each in turn, so a kernel change is timed
against the code before it under the same conditions; the table adds the baseline's time and
the largest difference between the two outputs (0 where the change keeps the bits).
"""

import ctypes
from dataclasses import asdict, dataclass

import numpy as np
import torch

from perfxlm.bench import best_of, best_of_each

BLOCK = 16


@dataclass
class Result:
    phase: str
    ours_us: float         # per layer
    torch_us: float
    kv_gb_per_s: float     # K and V bytes the phase reads, over our time
    max_abs_diff: float    # ours vs torch, layer 0
    baseline_us: float | None = None         # the baseline library's time, per layer
    baseline_max_abs_diff: float | None = None  # ours vs the baseline's output, layer 0


def run(batch: int = 64, context: int = 192, prefill_len: int = 128, layers: int = 30, heads: int = 9,
        kv_heads: int = 3, head_dim: int = 64, dtype: str = "bfloat16", cache_dtype: str | None = None,
        reps: int = 5, baseline: ctypes.CDLL | None = None) -> list[dict]:
    """q, k, v in `dtype`, the caches in `cache_dtype` (default: dtype; also float16); baseline:
    another kernel library (library.load_at) timed beside ours."""
    import ml_dtypes  # noqa: F401 - registers numpy's bfloat16

    from hw_plugins.cpu import library
    from hw_plugins.cpu.plugin import _ptr as ptr
    from hw_plugins.cpu.plugin import host_zeros

    lib = library.load()
    code, np_dt = library.ACTIVATIONS[dtype], np.dtype(dtype)
    cache_code, np_cache = library.CACHES[cache_dtype or dtype], np.dtype(cache_dtype or dtype)
    t_dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    rng = np.random.default_rng(0)
    scale = head_dim ** -0.5

    def rand(*shape):
        return rng.standard_normal(shape, np.float32).astype(np_dt)

    def phase(name: str, qlen: int, cached: int, tables: np.ndarray) -> Result:
        B, T, n = batch, batch * qlen, cached + qlen  # n: keys each query's sequence ends with
        nblk = tables.max() + 1
        q, k, v = rand(T, heads * head_dim), rand(T, kv_heads * head_dim), rand(T, kv_heads * head_dim)
        qa, ka, va, y = (host_zeros(a.shape, np_dt) for a in (q, k, v, q))
        qa[...], ka[...], va[...] = q, k, v
        caches = []
        for _ in range(layers):
            kc, vc = (host_zeros((nblk, BLOCK, kv_heads, head_dim), np_cache, huge_pages=False) for _ in range(2))
            kc[...], vc[...] = rand(*kc.shape), rand(*vc.shape)
            caches.append((kc, vc))
        seq_lens = np.full(B, n, np.int64)
        qsl = np.arange(B + 1, dtype=np.int64) * qlen
        pos = np.arange(cached, n)
        slots = (tables[:, pos // BLOCK] * BLOCK + pos % BLOCK).reshape(-1).astype(np.int64)

        def attend(kc: np.ndarray, vc: np.ndarray, lib: ctypes.CDLL = lib) -> None:  # one layer: y
            lib.pxl_paged_attention(code, cache_code, T, B, heads, kv_heads, head_dim, ptr(qa), ptr(ka), ptr(va),
                                    ptr(kc), ptr(vc), BLOCK, ptr(slots), ptr(tables), tables.shape[1], ptr(seq_lens),
                                    ptr(qsl), scale, 0.0, 0, ptr(y))  # no softcap, no sliding window

        def ours(lib: ctypes.CDLL = lib) -> None:
            for kc, vc in caches:
                attend(kc, vc, lib)

        def dense(cache: np.ndarray, new: np.ndarray) -> torch.Tensor:  # (B, kv_heads, n, head_dim)
            j = np.arange(n)
            rows = cache.reshape(-1, kv_heads * head_dim)[tables[:, j // BLOCK] * BLOCK + j % BLOCK]
            rows[:, cached:] = new.reshape(B, qlen, -1)  # (as stored: rounded to the cache's dtype)
            return torch.from_numpy(rows.astype(np.float32)).to(t_dt).view(B, n, kv_heads, head_dim).transpose(1, 2)

        kv = [(dense(kc, k), dense(vc, v)) for kc, vc in caches]
        tq = torch.from_numpy(q.astype(np.float32)).to(t_dt).view(B, qlen, heads, head_dim).transpose(1, 2)
        mask = torch.ones(qlen, n, dtype=torch.bool).tril(cached)  # query i sees keys up to cached + i

        def ref() -> list[torch.Tensor]:
            return [torch.nn.functional.scaled_dot_product_attention(tq, kt, vt, attn_mask=mask, scale=scale,
                                                                     enable_gqa=True) for kt, vt in kv]

        fns = [ours] if baseline is None else [ours, lambda: ours(baseline)]
        t_ours, *t_base = (t / layers for t in best_of_each(fns, reps))
        base_diff = None
        if baseline is not None:
            attend(*caches[0], baseline)
            theirs = y.astype(np.float32)
        t_ref = best_of(ref, reps) / layers
        attend(*caches[0])
        got = y.astype(np.float32)
        want = ref()[0].transpose(1, 2).reshape(T, -1).float().numpy()
        diff = float(np.abs(got - want).max())
        if baseline is not None:
            base_diff = float(np.abs(got - theirs).max())
        kv_bytes = 2 * B * n * kv_heads * head_dim * np.dtype(np_cache).itemsize
        return Result(name, 1e6 * t_ours, 1e6 * t_ref, kv_bytes / t_ours / 1e9, diff,
                      1e6 * t_base[0] if t_base else None, base_diff)

    # decode: prompt blocks together per sequence, then the later blocks in turn across sequences
    prompt_blocks, total_blocks = -(-context // BLOCK), -(-(context + 1) // BLOCK)
    tables = np.zeros((batch, total_blocks), np.int64)
    tables[:, :prompt_blocks] = np.arange(batch * prompt_blocks).reshape(batch, prompt_blocks)
    later = total_blocks - prompt_blocks
    tables[:, prompt_blocks:] = batch * prompt_blocks + np.arange(batch * later).reshape(later, batch).T
    results = [phase("decode", 1, context, tables)]
    per_seq = -(-prefill_len // BLOCK)
    results.append(phase("prefill", prefill_len, 0, np.arange(batch * per_seq, dtype=np.int64).reshape(batch, per_seq)))
    return [asdict(r) for r in results]


def report(rows: list[dict]) -> str:
    base = rows[0]["baseline_us"] is not None
    lines = [f"{'phase':<9}{'ours us/layer':>15}{'torch us/layer':>16}{'x torch':>9}{'K+V GB/s':>10}{'max |diff|':>12}"
             + (f"{'baseline us/layer':>19}{'x baseline':>12}{'|ours - base|':>15}" if base else "")]
    for r in rows:
        line = (f"{r['phase']:<9}{r['ours_us']:>15.1f}{r['torch_us']:>16.1f}{r['torch_us'] / r['ours_us']:>8.2f}x"
                f"{r['kv_gb_per_s']:>10.1f}{r['max_abs_diff']:>12.2e}")
        if base:
            line += (f"{r['baseline_us']:>19.1f}{r['baseline_us'] / r['ours_us']:>11.2f}x"
                     f"{r['baseline_max_abs_diff']:>15.2e}")
        lines.append(line)
    return "\n".join(lines)
