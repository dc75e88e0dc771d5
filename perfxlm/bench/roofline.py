"""The machine's roofs and where issue #5's workloads sit under them.

Measures, with the kernel library's own threads: memory read bandwidth (a 256 MiB stream,
as a decode GEMV reads its weights) and peak arithmetic (fp32 FMA, bf16 pair-dot, int8
quad-dot chains in registers). Then, from the model's tensor sizes, each workload's
ceiling: decode is bandwidth-bound (bytes per token: weights plus the KV cache read),
prefill and batched decode are compute-bound (FLOPs per token). decode_usage and
compute_usage place a measured rate under its roof (`perfxlm bench throughput / latency /
compare`).
"""

import functools
import json
import logging
import math
import struct
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MiB = 1 << 20
# weights as the engine runs them -> the arithmetic their matmuls use; "gguf" is GGUF blocks
# (Q4_0/Q4_1/Q8_0/K-quants: int8 dot products). Zen 4 has no fp16 arithmetic (no AVX512-FP16):
# an fp16 model computes in fp32 at best.
ARITHMETIC = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp32", "gguf": "int8"}
_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1}


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
    quant_bytes: int     # block Linears + lm_head as the engine reads them (as loaded: Q5_0 as Q8_0, Q5_1 split)
    layers: int
    kv_width: int        # Hkv * head_dim
    q_width: int         # H * head_dim
    is_gguf: bool = True  # else an HF directory: quant_bytes are its safetensors as stored
    panel_quants: bool = False  # every block Linear a prefill can run as bf16 panels (as loaded)
    hidden: int | None = None    # the model's width (which "auto" activations it runs)

    def weight_bytes(self, weights: str) -> float:
        """Bytes of Linear weights (blocks and lm_head) one decode step reads: as stored for
        GGUF blocks ("gguf"), else at the dtype the engine runs them in."""
        if weights == "gguf":
            return self.quant_bytes
        return _ELEM_BYTES[weights] * (self.linear_params + self.lm_head_params)

    def kv_bytes_per_token(self, weights: str) -> int:
        """K and V of one cached token in every layer; the KV cache is fp32 only for fp32 models."""
        return 2 * self.layers * self.kv_width * (4 if weights == "float32" else 2)


@dataclass
class Usage:
    """A measured rate placed under its roof."""

    achieved: float      # GB/s read (memory-bound), GFLOP/s or GOP/s (compute-bound)
    roof: float          # the roof, same unit (NaN where this CPU lacks the instructions)
    unit: str            # "GB/s", "GFLOP/s" or "GOP/s"
    roof_name: str       # "read bandwidth", "bf16 peak", ...

    @property
    def percent(self) -> float:
        return 100 * self.achieved / self.roof

    def describe(self) -> str:
        share = f"{figure(self.percent)} %" if math.isfinite(self.percent) else "n/a"
        return f"{figure(self.achieved)} {self.unit}, {share} of the {self.roof_name} ({self.roof:.1f} {self.unit})"


def figure(x: float) -> str:
    """One decimal, but two significant digits below 1 (a tiny model's rates stay readable)."""
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.2g}"


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


@functools.cache
def measured(threads: int | None = None) -> Roofs | None:
    """The roofs, measured once per process (about three seconds): the best of three passes,
    since right after a burst of work a VM can lose a core or memory bandwidth for a second or
    so (measured: every peak halved in the first pass after a generate). None where the native
    cpu kernels that measure them are not built."""
    from hw_plugins.base import available_plugins
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        logger.info("roofline not measured: the native cpu kernels are not built here")
        return None
    passes = [measure(threads, seconds=0.2) for _ in range(3)]
    return Roofs(*(max(getattr(r, f.name) for r in passes) for f in fields(Roofs)))


def model_cost(path: str | Path) -> ModelCost:
    """The costs of a GGUF file's or an HF directory's model (dense models: every Linear is
    read per token)."""
    if Path(path).is_dir():
        return _hf_model_cost(Path(path))
    import gguf
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    blocks = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    head = tensors.get("output.weight", tensors["token_embd.weight"])  # tied: the embedding is the lm_head
    linear, lm_head = sum(int(t.n_elements) for t in blocks), int(head.n_elements)

    q = gguf.GGMLQuantizationType
    # (bytes a block stored, as loaded): Q5_0 as Q8_0, Q5_1 as Q4_1 plus Q4_0 (20 + 18)
    loaded = {q.Q5_0: (22, 34), q.Q5_1: (24, 38)}

    def read(t: Any) -> int:  # bytes a decode step reads
        stored, as_loaded = loaded.get(t.tensor_type, (1, 1))
        return int(t.n_bytes) // stored * as_loaded

    quant = sum(read(t) for t in blocks) + read(head)

    def field(suffix: str) -> int:
        for key, f in reader.fields.items():
            if key.endswith(suffix):
                return int(f.parts[f.data[0]][0])
        raise KeyError(suffix)

    layers, hidden, heads = field(".block_count"), field(".embedding_length"), field(".attention.head_count")
    kv_heads = field(".attention.head_count_kv")
    panels = {q.Q8_0, q.Q4_0, q.Q4_1, q.Q4_K, q.Q5_K, q.Q6_K, q.Q5_0, q.Q5_1}  # into bf16 panels (as loaded)
    return ModelCost(linear, lm_head, quant, layers, hidden // heads * kv_heads, hidden,
                     panel_quants=all(t.tensor_type in panels for t in blocks), hidden=hidden)


def _hf_model_cost(path: Path) -> ModelCost:
    """From config.json and the safetensors headers (shapes and dtypes only: no weight is read)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors files: the roofline reads tensor shapes from their headers")
    shapes: dict[str, tuple[list[int], str]] = {}
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        shapes.update({k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    blocks = [(s, d) for k, (s, d) in shapes.items() if ".layers." in k and len(s) == 2]
    head_name = next((k for k in shapes if k.endswith("lm_head.weight")), None) or \
        next(k for k in shapes if k.endswith("embed_tokens.weight"))  # tied: the embedding is the lm_head
    head_shape, head_dtype = shapes[head_name]
    linear, lm_head = sum(math.prod(s) for s, _ in blocks), math.prod(head_shape)
    stored = sum(math.prod(s) * _SAFETENSORS_BYTES.get(d, 2) for s, d in blocks)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    return ModelCost(linear, lm_head, stored + lm_head * _SAFETENSORS_BYTES.get(head_dtype, 2),
                     cfg["num_hidden_layers"], head_dim * cfg.get("num_key_value_heads", heads), head_dim * heads,
                     is_gguf=False)


def _attn_flops(m: ModelCost, keys: float) -> float:
    """q.k and p.v of one query token against `keys` cached keys, every query head, every layer."""
    return 4 * m.layers * m.q_width * keys


def prefill_flops(m: ModelCost, prompt_len: int) -> float:
    """FLOPs per prompt token of one prompt's prefill: its tokens attend to 1..prompt_len keys,
    and only the last one goes through the lm_head."""
    return 2 * m.linear_params + _attn_flops(m, (prompt_len + 1) / 2) + 2 * m.lm_head_params / prompt_len


def batch_flops(m: ModelCost, input_len: int, output_len: int) -> float:
    """FLOPs per output token of a request input_len -> output_len: the blocks run every token
    but the last generated (n of them, attending to 1..n keys), the lm_head once per output token."""
    n = input_len + output_len - 1
    return (2 * m.linear_params * n + _attn_flops(m, n * (n + 1) / 2)) / output_len + 2 * m.lm_head_params


def decode_usage(roofs: Roofs, m: ModelCost, weights: str, tok_s: float, input_len: int, output_len: int,
                 batch: int = 1, kv_bytes_per_token: int | None = None) -> Usage:
    """Decode of `batch` sequences input_len -> output_len at tok_s (all sequences together):
    each step reads the weights once and every sequence's KV cache (average context)."""
    kv = m.kv_bytes_per_token(weights) if kv_bytes_per_token is None else kv_bytes_per_token
    step_bytes = m.weight_bytes(weights) + batch * kv * (input_len + output_len / 2)
    return Usage(step_bytes * tok_s / batch / 1e9, roofs.read_GBs, "GB/s", "read bandwidth")


def arithmetic(weights: str, cost: ModelCost | None = None) -> str:
    """The arithmetic a compute-bound phase on `weights` runs: ARITHMETIC's, except for Q8_0 /
    Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K blocks (and Q5_0, loaded as Q8_0) under
    PERFXLM_QUANT_ACTIVATIONS=bf16, and under "auto" on the `amx` kernel set, which runs steps
    of 32 tokens or more as bf16 panels, as "int16-decode" ("auto" on a narrow model) does on
    the `avx512bf16` set too. (int16 is int8 done twice: the same peak, against the model's own
    operations.)"""
    if weights == "gguf" and cost is not None and cost.panel_quants:
        from perfxlm.config import quant_activations_from_env, resolve_quant_activations
        mode = resolve_quant_activations(quant_activations_from_env(), cost.hidden)
        if mode == "bf16":
            return "bf16"
        from hw_plugins.cpu import library
        isa = library.load().pxl_isa()
        if (mode == "auto" and isa == b"amx") or (mode == "int16-decode" and isa in (b"amx", b"avx512bf16")):
            return "bf16"
    return ARITHMETIC[weights]


def compute_usage(roofs: Roofs, weights: str, flops_per_token: float, tok_s: float,
                  cost: ModelCost | None = None) -> Usage:
    """A compute-bound rate against the peak of the arithmetic `weights` use (`arithmetic`)."""
    kind = arithmetic(weights, cost)
    peak = {"fp32": roofs.fp32_GFLOPs, "bf16": roofs.bf16_GFLOPs, "int8": roofs.int8_GOPs}[kind]
    return Usage(flops_per_token * tok_s / 1e9, peak, "GOP/s" if kind == "int8" else "GFLOP/s", f"{kind} peak")


def ceilings(roofs: Roofs, m: ModelCost) -> list[dict]:
    """tok/s each workload could reach if it ran exactly at its roof."""
    def kv_bytes(ctx: float, elem: int) -> float:  # K and V of every layer, read once per decode token
        return 2 * m.layers * m.kv_width * elem * ctx

    w2_ctx = 32 + 256 / 2  # W2: 32-token prompt, 256 generated: average context
    rows = [{"workload": "W2 decode, Q4_1/Q8_0 GGUF blocks", "bound": "memory",
             "bytes_per_token": m.quant_bytes + kv_bytes(w2_ctx, 2)}] if m.is_gguf else []
    rows.append({"workload": "W2 decode, bf16 weights", "bound": "memory",
                 "bytes_per_token": 2 * (m.linear_params + m.lm_head_params) + kv_bytes(w2_ctx, 2)})
    for r in rows:
        r["ceiling_tok_s"] = roofs.read_GBs * 1e9 / r["bytes_per_token"]
    # W3: 512 prompt tokens, the lm_head only for the last one; average context 256
    w3 = 2 * m.linear_params + _attn_flops(m, 256)
    rows.append({"workload": "W3 prefill 512, bf16", "bound": "bf16 compute", "flops_per_token": w3,
                 "ceiling_tok_s": roofs.bf16_GFLOPs * 1e9 / w3})
    # W1: 64 x (128 in -> 128 out): per output token one prompt token and one generated token,
    # each through the blocks, plus the lm_head for the generated one; average context 128
    w1 = 2 * (2 * m.linear_params + _attn_flops(m, 128)) + 2 * m.lm_head_params
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
