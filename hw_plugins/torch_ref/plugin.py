"""The `torch` reference plugin: every op of graph_export/ops.py in plain torch.

It runs on any torch device (CPU here; CUDA and ROCm devices elsewhere, chosen by
$PERFXLM_TORCH_DEVICE) and is the oracle that every other plugin is tested against.
"""

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hw_plugins.base import HwPlugin
from perfxlm.models.llama import apply_rope
from perfxlm.models.paged_attention import AttentionMetadata, paged_attention, write_kv

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "uint8": torch.uint8}


class TorchPlugin(HwPlugin):
    name = "torch"
    priority = 0  # the fallback: any native plugin should win the default choice

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or os.environ.get("PERFXLM_TORCH_DEVICE", "cpu"))
        self._kernels = {"Gather": _gather, "RMSNorm": _rmsnorm, "Linear": _linear, "RoPE": _rope,
                         "PagedAttention": _paged_attention, "SiluMul": _silu_mul, "Add": _add}

    def is_available(self) -> bool:
        try:
            torch.empty(1, device=self.device)
            return True
        except Exception:
            return False

    def unavailable_reason(self) -> str | None:
        return None if self.is_available() else f"torch cannot allocate on device {self.device}"

    def supports(self, op_type: str, dtypes: tuple[str, ...]) -> bool:
        if op_type == "Linear" and dtypes[1:2] == ("uint8",):  # quantised weights
            return dtypes[0] in ("float32", "float16", "bfloat16")
        return op_type in self._kernels and all(d in _TORCH for d in dtypes)

    def alloc(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        return torch.empty(shape, dtype=_TORCH[dtype], device=self.device)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable:  # torch wants writable memory; weights come copy-on-write
            array = array.copy()
        if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits, torch's dtype
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(array).to(self.device)

    def download(self, buf: torch.Tensor) -> np.ndarray:
        buf = buf.detach().cpu()
        if buf.dtype == torch.bfloat16:
            import ml_dtypes
            return buf.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return buf.numpy()

    def run(self, node: Any, inputs: list[Any], outputs: list[Any]) -> None:
        self._kernels[node.op_type](node.attrs, inputs, outputs)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# Each kernel: (attrs, inputs, outputs) -> None, writing into the preallocated outputs.

def _gather(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    torch.index_select(ins[0], 0, ins[1], out=outs[0])             # (V, D)[(T,)] -> (T, D)


def _rmsnorm(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    x, weight = ins                                                 # (T, D), (D,)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + attrs["epsilon"])
    torch.mul(weight, xf.to(x.dtype), out=outs[0])


def _linear(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    # x (T, K) @ W (N, K)^T (+ b) -> (T, N); the same GEMM call as F.linear, bit for bit
    w = ins[1]
    fmt = attrs.get("weight_format", "dense")
    if fmt != "dense":  # GGUF blocks (uint8): the reference dequantises them (once per weight)
        w = _dequantized(w, fmt, ins[0].dtype)
    if len(ins) > 2:
        torch.addmm(ins[2], ins[0], w.t(), out=outs[0])
    else:
        torch.mm(ins[0], w.t(), out=outs[0])


_DEQUANTIZED: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _dequantized(blocks: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    key = (blocks.data_ptr(), fmt, dtype)
    hit = _DEQUANTIZED.get(key)
    if hit is None or hit[0] is not blocks:
        from graph_export.quant import dequantize
        w = torch.from_numpy(dequantize(blocks.cpu().numpy(), fmt)).to(dtype=dtype, device=blocks.device)
        hit = _DEQUANTIZED[key] = (blocks, w)
    return hit[1]


def _rope(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    x, positions, cos, sin = ins                                    # (T, H*hd), (T,), (P, hd) x 2
    T, hd = x.shape[0], attrs["head_dim"]
    y = apply_rope(x.view(T, -1, hd), cos[positions], sin[positions])
    outs[0].copy_(y.view(T, -1))


def _paged_attention(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc = ins
    T, H, Hkv, hd = q.shape[0], attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    write_kv(k.view(T, Hkv, hd), v.view(T, Hkv, hd), k_cache, v_cache, slot_mapping)
    meta = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc.diff().tolist(),
                             seq_lens.tolist())
    y = paged_attention(q.view(T, H, hd), k_cache, v_cache, meta, attrs["scale"],
                        attrs.get("sliding_window") or None)
    outs[0].copy_(y.view(T, H * hd))                                # outs[1:] alias the caches


def _silu_mul(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    torch.mul(F.silu(ins[0]), ins[1], out=outs[0])


def _add(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    torch.add(ins[0], ins[1], out=outs[0])
