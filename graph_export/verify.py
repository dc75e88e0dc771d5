"""`perfxlm export --verify`: onnxruntime runs the lowered graph for a prefill step and a
decode step; its logits are compared with the PyTorch model's on the same inputs."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from graph_export.lowering import lower_to_standard_onnx
from perfxlm.models.paged_attention import AttentionMetadata

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
    import onnxruntime as ort
    p, dtype = model.params, model.tok_embeddings.weight.dtype
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
    cache_shape = (num_blocks, block_size, p.n_kv_heads, p.head_dim)
    ort_caches = {f"{kind}_cache.{i}": np.zeros(cache_shape, np.float32)
                  for i in range(p.n_layers) for kind in "kv"}
    torch_cache = torch.zeros(p.n_layers, 2, *cache_shape, dtype=dtype)
    diffs, scale = [], 1.0
    for ids, positions, seq_len, rows in steps:
        feeds = {"input_ids": ids.astype(np.int64), "positions": positions.astype(np.int64),
                 "slot_mapping": positions.astype(np.int64), "block_tables": table,
                 "seq_lens": np.array([seq_len], np.int64), "query_start_loc": np.array([0, len(ids)], np.int64),
                 "logits_indices": rows.astype(np.int64), **ort_caches}
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(names, feeds)))
        ort_caches = {name.replace("_out", ""): outs[name] for name in names if "_cache_out." in name}
        meta = AttentionMetadata(torch.from_numpy(feeds["slot_mapping"]), torch.from_numpy(table),
                                 torch.tensor([seq_len]), [len(ids)], [seq_len])
        with torch.inference_mode():
            hidden = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["positions"]),
                           torch_cache, meta)
            ref = model.compute_logits(hidden[torch.from_numpy(feeds["logits_indices"])]).numpy()
        scale = max(scale, float(np.abs(ref).max()))
        diffs.append(float(np.abs(outs["logits"] - ref).max()))
    return VerifyResult(diffs[0], diffs[1], RELATIVE_TOLERANCE[dtype] * scale)
