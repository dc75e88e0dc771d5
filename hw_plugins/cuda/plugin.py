"""The `cuda` and `dcu` plugins: torch device tensors plus csrc/cuda kernels.

Buffers are torch tensors on the GPU. Decode GEMVs (dense and GGUF blocks), RMSNorm,
RoPE, SiLU-mul, Add and paged attention run our kernels (libperfxlm_cuda.so from
`make -C csrc check-cuda`, or libperfxlm_hip.so built by hipcc for DCUs) on torch's
current stream; prefill GEMMs go to cuBLAS / hipBLAS through torch. Without the
library every op runs through the torch reference on the device.
"""

import ctypes
import logging
from pathlib import Path
from typing import Any

import torch

from hw_plugins.cpu.library import BF16, F32, Q4_0, Q4_1, Q8_0  # the format codes (csrc/include/pxl_abi.h)
from hw_plugins.torch_ref.plugin import (TorchPlugin, _add, _linear, _paged_attention, _rmsnorm, _rope,
                                         _silu_mul)

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent.parent / "csrc" / "build"
_FORMATS = {"dense": None, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
_DT = {torch.float32: F32, torch.bfloat16: BF16}  # activation dtypes our kernels take
GEMV_MAX_ROWS = 8  # up to this many tokens a warp-per-feature GEMV beats a cuBLAS GEMM launch


class CudaPlugin(TorchPlugin):
    name = "cuda"
    priority = 20
    bf16_weights_f32_activations = False  # tensor cores want bf16 activations
    hip = False
    lib_path = _CSRC / "cuda" / "libperfxlm_cuda.so"

    def __init__(self) -> None:
        super().__init__("cuda")
        self._reason = None
        if not torch.cuda.is_available():
            self._reason = "torch sees no CUDA/ROCm device"
        elif bool(torch.version.hip) != self.hip:
            self._reason = "this torch is built for " + ("ROCm" if torch.version.hip else "CUDA")
        self.lib = None
        if self._reason is None and self.lib_path.is_file():
            self.lib = ctypes.CDLL(str(self.lib_path))
            logger.info("%s plugin: kernels from %s", self.name, self.lib_path)
        elif self._reason is None:
            logger.info("%s plugin: %s not built; ops run through torch on the device", self.name, self.lib_path)
        if self.lib is not None:
            self._kernels.update({"Linear": self._linear, "RMSNorm": self._rmsnorm, "SiluMul": self._silu_mul,
                                  "Add": self._add, "RoPE": self._rope, "PagedAttention": self._paged_attention})

    def is_available(self) -> bool:
        return self._reason is None

    def unavailable_reason(self) -> str | None:
        return self._reason

    # ---- our kernels (dt: F32 or BF16; other dtypes take the torch path) ----

    def _stream(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def _dt(self, t: Any) -> int | None:
        return _DT.get(t.dtype)

    def _linear(self, attrs: dict, ins: list, outs: list) -> None:
        x, w = ins[0], ins[1]
        weight_format = attrs.get("weight_format", "dense")
        fmt = _FORMATS.get(weight_format)
        dt = self._dt(x)
        # K-quants (q4_k, ...) have no GPU GEMV yet: torch's path dequantises them once
        if dt is None or x.shape[0] > GEMV_MAX_ROWS or weight_format not in _FORMATS:
            return _linear(attrs, ins, outs)  # cuBLAS (on the dequantised weights, cached per weight)
        wfmt = fmt if fmt is not None else dt
        bias = ctypes.c_void_p(ins[2].data_ptr()) if len(ins) > 2 else None
        self.lib.pxl_gpu_linear_gemv(dt, wfmt, x.shape[0], w.shape[0], x.shape[1], ctypes.c_void_p(x.data_ptr()),
                                     ctypes.c_void_p(w.data_ptr()), bias, ctypes.c_void_p(outs[0].data_ptr()),
                                     self._stream())

    def _rmsnorm(self, attrs: dict, ins: list, outs: list) -> None:
        x, w = ins
        dt = self._dt(x)
        if dt is None:
            return _rmsnorm(attrs, ins, outs)
        group = attrs.get("group_size") or x.shape[1]  # per-head norms: each group of columns is a row
        self.lib.pxl_gpu_rmsnorm(dt, x.numel() // group, group, ctypes.c_void_p(x.data_ptr()),
                                 ctypes.c_void_p(w.data_ptr()), ctypes.c_float(attrs["epsilon"]),
                                 ctypes.c_void_p(outs[0].data_ptr()), self._stream())

    def _rope(self, attrs: dict, ins: list, outs: list) -> None:
        x, pos, cos, sin = ins
        dt, hd = self._dt(x), attrs["head_dim"]
        if dt is None:
            return _rope(attrs, ins, outs)
        p = [ctypes.c_void_p(t.data_ptr()) for t in (x, pos, cos, sin, outs[0])]
        self.lib.pxl_gpu_rope(dt, x.shape[0], x.shape[1] // hd, hd, *p, self._stream())

    def _paged_attention(self, attrs: dict, ins: list, outs: list) -> None:
        q, k_cache, block_tables, seq_lens = ins[0], ins[3], ins[6], ins[7]
        dt = self._dt(q)
        # no softcap, bidirectional mask or cache in another dtype than q in the GPU kernel yet
        if (dt is None or attrs["head_dim"] > 256 or attrs.get("softcap") or not attrs.get("causal", 1)
                or k_cache.dtype != q.dtype):
            return _paged_attention(attrs, ins, outs)
        p = [ctypes.c_void_p(t.data_ptr()) for t in ins]
        self.lib.pxl_gpu_paged_attention(
            dt, q.shape[0], seq_lens.shape[0], attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"],
            *p[:5], k_cache.shape[1], p[5], p[6], block_tables.shape[1], p[7], p[8], ctypes.c_float(attrs["scale"]),
            attrs.get("sliding_window") or 0, ctypes.c_void_p(outs[0].data_ptr()), self._stream())

    def _elementwise(self, fn: str, fallback: Any, attrs: dict, ins: list, outs: list) -> None:
        dt = self._dt(ins[0])
        if dt is None:
            return fallback(attrs, ins, outs)
        getattr(self.lib, fn)(dt, ctypes.c_int64(ins[0].numel()), ctypes.c_void_p(ins[0].data_ptr()),
                              ctypes.c_void_p(ins[1].data_ptr()), ctypes.c_void_p(outs[0].data_ptr()), self._stream())

    def _silu_mul(self, attrs: dict, ins: list, outs: list) -> None:
        self._elementwise("pxl_gpu_silu_mul", _silu_mul, attrs, ins, outs)

    def _add(self, attrs: dict, ins: list, outs: list) -> None:
        self._elementwise("pxl_gpu_add", _add, attrs, ins, outs)


class DcuPlugin(CudaPlugin):
    """Hygon DCU / AMD GPUs: ROCm torch plus the same kernels built by hipcc."""
    name = "dcu"
    hip = True
    lib_path = _CSRC / "hip" / "libperfxlm_hip.so"
