"""The `torch` reference plugin: every op of graph_export/ops.py in plain torch.

Its kernels are the bodies of graph_export/functional.py, the functions the models are
written against, so the graph on this plugin computes what the eager model does. It runs
on any torch device (CPU here; CUDA and ROCm devices elsewhere, chosen by
$PERFXLM_TORCH_DEVICE) and is the oracle that every other plugin is tested against.
"""

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from graph_export import functional
from hw_plugins.base import HwPlugin, Node

_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "uint8": torch.uint8}


class TorchPlugin(HwPlugin):
    name = "torch"
    priority = 0  # the fallback: any native plugin should win the default choice
    bf16_weights_f32_activations = True  # the CPU plugins' reference
    api_version = 1

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or os.environ.get("PERFXLM_TORCH_DEVICE", "cpu"))
        self._kernels = {op: _reference(op) for op in functional.KERNELS}

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

    def run(self, node: Node, inputs: list[Any], outputs: list[Any]) -> None:
        self._kernels[node.op_type](node.attrs, inputs, outputs)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


Kernel = Callable[[dict, list[torch.Tensor], list[torch.Tensor]], None]


def _reference(op_type: str) -> Kernel:
    """(attrs, inputs, outputs) -> None: the op's functional body (the same the models run),
    its result written into the preallocated output (the caches are updated in place)."""
    body = functional.KERNELS[op_type]

    def kernel(attrs: dict, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        outs[0].copy_(body(attrs, ins))
    return kernel


# the reference kernels by name, for plugins that fall back to them op by op (hw_plugins/cuda)
_gather, _rmsnorm, _linear, _rope, _paged_attention, _silu_mul, _add = (
    _reference(op) for op in ("Gather", "RMSNorm", "Linear", "RoPE", "PagedAttention", "SiluMul", "Add"))
