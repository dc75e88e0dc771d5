"""`perfxlm export --verify`: onnxruntime runs the lowered graph for a prefill step and a
decode step; its logits are compared with the PyTorch model's on the same inputs."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from graph_export.functional import StepInputs
from graph_export.lowering import lower_to_standard_onnx
from graph_export.ops import cache_input_names, cache_output_name

# Allowed max |logits difference|, relative to max |logit|. The lowered graph computes in
# float32 from the same (rounded) weights: in float32 only summation order differs (~1e-6
# per op, ~1e-5 after a 30-layer model), so 1e-4 passes any correct export and fails any
# wrong op, which is off by O(1). In bf16 (8-bit mantissa, unit roundoff 2^-9) and fp16
# (2^-12) the torch model rounds every intermediate; the error grows like sqrt(#ops).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class VerifyResult:
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return max(self.prefill_max_abs_diff, self.decode_max_abs_diff) <= self.tolerance


def verify_graph(graph: onnx.ModelProto, model: torch.nn.Module, prompt_ids: list[int],
                 block_size: int = 16) -> VerifyResult:
    """Run a prefill of prompt_ids and one decode step through onnxruntime (the lowered graph)
    and through the model's own forward; compare their logits."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("perfxlm export --verify needs onnxruntime: pip install 'perfxlm[verify]'") from None
    dtype = next(model.parameters()).dtype
    n = len(prompt_ids)
    num_blocks = (n + 1) // block_size + 2
    table = np.arange(num_blocks, dtype=np.int64)[None, :]
    steps = [  # (ids, positions, seq_len, logits rows)
        (np.array(prompt_ids), np.arange(n), n, np.arange(n)),
        (np.array([prompt_ids[-1]]), np.array([n]), n + 1, np.array([0])),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lowered.onnx"
        onnx.save_model(lower_to_standard_onnx(graph), str(path), save_as_external_data=True,
                        location="lowered.onnx.data")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_caches, torch_caches = {}, []
    for i, shapes in enumerate(model.kv_cache_shapes()):
        layer = []
        for name, shape in zip(cache_input_names(i), shapes):
            ort_caches[name] = np.zeros((num_blocks, block_size, *shape), np.float32)
            layer.append(torch.zeros(num_blocks, block_size, *shape, dtype=dtype))
        torch_caches.append(tuple(layer))
    names = [o.name for o in session.get_outputs()]
    diffs, scale = [], 1.0
    for ids, positions, seq_len, rows in steps:
        feeds = {"input_ids": ids.astype(np.int64), "positions": positions.astype(np.int64),
                 "slot_mapping": positions.astype(np.int64), "block_tables": table,
                 "seq_lens": np.array([seq_len], np.int64), "query_start_loc": np.array([0, len(ids)], np.int64),
                 "logits_indices": rows.astype(np.int64)}
        outs = dict(zip(names, session.run(names, {**feeds, **ort_caches})))
        ort_caches = {name: outs[cache_output_name(name)] for name in ort_caches}
        with torch.inference_mode():
            step = StepInputs(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            ref = model(step, torch_caches).float().numpy()
        scale = max(scale, float(np.abs(ref).max()))
        diffs.append(float(np.abs(outs["logits"] - ref).max()))
    return VerifyResult(diffs[0], diffs[1], RELATIVE_TOLERANCE[dtype] * scale)
