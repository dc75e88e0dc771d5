"""The machine's roofs and where issue #5's workloads sit under them.

Measures, with the kernel library's own threads: memory read bandwidth (a 256 MiB stream,
as a decode GEMV reads its weights) and peak arithmetic (fp32 FMA, bf16 pair-dot, int8
quad-dot chains in registers). Then, from the model's tensor sizes, each workload's
ceiling: decode is bandwidth-bound (bytes per token: weights plus the KV cache read),
prefill and batched decode are compute-bound (FLOPs per token).
"""

import time
from dataclasses import dataclass

import numpy as np

MiB = 1 << 20


@dataclass
class Roofs:
    read_GBs: float
    fp32_GFLOPs: float
    bf16_GFLOPs: float
    int8_GOPs: float


@dataclass
class ModelCost:
    linear_params: int   # transformer-block Linear weights
    lm_head_params: int
    quant_bytes: int     # block Linears + lm_head as stored in the GGUF
    layers: int
    kv_width: int        # Hkv * head_dim
    q_width: int         # H * head_dim


def measure(threads: int | None = None, seconds: float = 0.5) -> Roofs:
    from hw_plugins.cpu import library
    lib = library.load()
    if threads:
        lib.pxl_set_num_threads(threads)

    buf = np.ones(256 * MiB // 8, np.uint64)  # touched: no first-touch page faults in the timing
    ptr = buf.__array_interface__["data"][0]

    def best(fn, reps: int) -> float:
        fn()
        times = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 3:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) / reps)
        return min(times)

    read = buf.nbytes / best(lambda: lib.pxl_roofline_read(ptr, buf.nbytes), 2) / 1e9
    peaks = []
    for kind in range(3):
        ops = lib.pxl_roofline_peak(kind, 1)
        if ops == 0:
            peaks.append(float("nan"))
            continue
        iters = 200_000
        peaks.append(lib.pxl_roofline_peak(kind, iters) / best(lambda: lib.pxl_roofline_peak(kind, iters), 1) / 1e9)
    return Roofs(read, *peaks)


def model_cost(gguf_path: str) -> ModelCost:
    import gguf
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    blocks = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    head = tensors.get("output.weight", tensors["token_embd.weight"])  # tied: the embedding is the lm_head
    linear, lm_head = sum(int(t.n_elements) for t in blocks), int(head.n_elements)
    quant = sum(int(t.n_bytes) for t in blocks) + int(head.n_bytes)

    def field(suffix: str) -> int:
        for key, f in reader.fields.items():
            if key.endswith(suffix):
                return int(f.parts[f.data[0]][0])
        raise KeyError(suffix)

    layers, hidden, heads = field(".block_count"), field(".embedding_length"), field(".attention.head_count")
    kv_heads = field(".attention.head_count_kv")
    return ModelCost(linear, lm_head, quant, layers, hidden // heads * kv_heads, hidden)


def ceilings(roofs: Roofs, m: ModelCost) -> list[dict]:
    """tok/s each workload could reach if it ran exactly at its roof."""
    def kv_bytes(ctx: float, elem: int) -> float:  # K and V of every layer, read once per decode token
        return 2 * m.layers * m.kv_width * elem * ctx

    def attn_flops(ctx: float) -> float:  # q.k and p.v for every query head
        return 4 * m.layers * m.q_width * ctx

    w2_ctx = 32 + 256 / 2  # W2: 32-token prompt, 256 generated: average context
    rows = [
        {"workload": "W2 decode, Q4_1/Q8_0 GGUF blocks", "bound": "memory",
         "bytes_per_token": m.quant_bytes + kv_bytes(w2_ctx, 2)},
        {"workload": "W2 decode, bf16 weights", "bound": "memory",
         "bytes_per_token": 2 * (m.linear_params + m.lm_head_params) + kv_bytes(w2_ctx, 2)},
    ]
    for r in rows:
        r["ceiling_tok_s"] = roofs.read_GBs * 1e9 / r["bytes_per_token"]
    # W3: 512 prompt tokens, the lm_head only for the last one; average context 256
    w3 = 2 * m.linear_params + attn_flops(256)
    rows.append({"workload": "W3 prefill 512, bf16", "bound": "bf16 compute", "flops_per_token": w3,
                 "ceiling_tok_s": roofs.bf16_GFLOPs * 1e9 / w3})
    # W1: 64 x (128 in -> 128 out): per output token one prompt token and one generated token,
    # each through the blocks, plus the lm_head for the generated one; average context 128
    w1 = 2 * (2 * m.linear_params + attn_flops(128)) + 2 * m.lm_head_params
    rows.append({"workload": "W1 64x128->128, bf16 (output tok/s)", "bound": "bf16 compute",
                 "flops_per_token": w1, "ceiling_tok_s": roofs.bf16_GFLOPs * 1e9 / w1})
    rows.append({"workload": "W1 64x128->128, fp32 (output tok/s)", "bound": "fp32 compute",
                 "flops_per_token": w1, "ceiling_tok_s": roofs.fp32_GFLOPs * 1e9 / w1})
    return rows


def report(roofs: Roofs, rows: list[dict], threads: int) -> str:
    lines = [f"roofs ({threads} threads): memory read {roofs.read_GBs:.1f} GB/s; peak fp32 {roofs.fp32_GFLOPs:.0f} "
             f"GFLOP/s, bf16 {roofs.bf16_GFLOPs:.0f} GFLOP/s, int8 {roofs.int8_GOPs:.0f} GOP/s",
             f"{'workload':<40} {'bound':<13} {'per token':>12} {'ceiling tok/s':>14}", "-" * 82]
    for r in rows:
        per = f"{r['bytes_per_token'] / 1e6:.1f} MB" if "bytes_per_token" in r else f"{r['flops_per_token'] / 1e6:.0f} MFLOP"
        lines.append(f"{r['workload']:<40} {r['bound']:<13} {per:>12} {r['ceiling_tok_s']:14.0f}")
    return "\n".join(lines)
