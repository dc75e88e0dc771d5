"""perfxlm model (torch module + weights) -> ONNX graph over the op set of ops.py.

The graph computes one engine step: T new tokens of B sequences in, logits for
the `logits_indices` rows out, with each layer's paged KV cache as an input that
PagedAttention updates in place (and names again as an output).
"""

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from graph_export.ops import DOMAIN, DOMAIN_VERSION, FORMAT_VERSION, GRAPH_INPUTS, IR_VERSION, ONNX_OPSET, OPS

logger = logging.getLogger(__name__)

_ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                torch.bfloat16: TensorProto.BFLOAT16}


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.count = 0

    def weight(self, name: str, t: torch.Tensor) -> str:
        if name not in self.initializers:
            self.initializers[name] = to_tensor_proto(t, name)
        return name

    def raw_weight(self, name: str, blocks: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = onnx.numpy_helper.from_array(np.ascontiguousarray(blocks, np.uint8), name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str = "", **attrs) -> list[str]:
        spec = OPS[op_type]
        self.count += 1
        base = name or f"{op_type.lower()}_{self.count}"
        outputs = [base] if n_out == 1 else [f"{base}.{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=base, domain=spec.domain, **attrs))
        return outputs


def to_tensor_proto(t: torch.Tensor, name: str) -> onnx.TensorProto:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: store the raw 16-bit patterns
        proto = helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes(),
                                   raw=True)
        return proto
    return onnx.numpy_helper.from_array(t.numpy(), name)


def export_model(model: torch.nn.Module, *, source: str = "",
                 quantized: dict[str, tuple[str, np.ndarray]] | None = None) -> onnx.ModelProto:
    """Build the ONNX graph of a perfxlm Transformer (see models/llama.py).

    `quantized` maps Linear weight names to (weight_format, uint8 blocks) (graph_export/quant.py):
    those Linear nodes read the blocks as stored instead of the module's float weights."""
    quantized = quantized or {}
    p = model.params
    dtype = model.tok_embeddings.weight.dtype
    g = _GraphBuilder()
    w = {k: v for k, v in model.state_dict().items()}
    cos = g.weight("rope_cos", model.rope_cos.to(dtype))
    sin = g.weight("rope_sin", model.rope_sin.to(dtype))
    meta_inputs = ["slot_mapping", "block_tables", "seq_lens", "query_start_loc"]

    def linear(x: str, prefix: str, name: str) -> str:
        fmt, blocks = quantized.get(f"{prefix}.weight", ("dense", None))
        if blocks is not None:
            ins = [x, g.raw_weight(f"{prefix}.weight", blocks)]
        else:
            ins = [x, g.weight(f"{prefix}.weight", w[f"{prefix}.weight"])]
        if f"{prefix}.bias" in w:
            ins.append(g.weight(f"{prefix}.bias", w[f"{prefix}.bias"]))
        attrs = {} if fmt == "dense" else {"weight_format": fmt}
        return g.op("Linear", ins, name=name, **attrs)[0]

    def rmsnorm(x: str, prefix: str, name: str) -> str:
        return g.op("RMSNorm", [x, g.weight(f"{prefix}.weight", w[f"{prefix}.weight"])], name=name,
                    epsilon=float(p.norm_eps))[0]

    x = g.op("Gather", [g.weight("tok_embeddings.weight", w["tok_embeddings.weight"]), "input_ids"],
             name="embed", axis=0)[0]
    for i in range(p.n_layers):
        L = f"layers.{i}"
        h = rmsnorm(x, f"{L}.attention_norm", f"{L}.attn_norm")
        q = linear(h, f"{L}.attention.wq", f"{L}.q")
        k = linear(h, f"{L}.attention.wk", f"{L}.k")
        v = linear(h, f"{L}.attention.wv", f"{L}.v")
        q = g.op("RoPE", [q, "positions", cos, sin], name=f"{L}.q_rope", head_dim=p.head_dim)[0]
        k = g.op("RoPE", [k, "positions", cos, sin], name=f"{L}.k_rope", head_dim=p.head_dim)[0]
        attn, _, _ = g.op("PagedAttention", [q, k, v, f"k_cache.{i}", f"v_cache.{i}", *meta_inputs], n_out=3,
                          name=f"{L}.attn", num_heads=p.n_heads, num_kv_heads=p.n_kv_heads, head_dim=p.head_dim,
                          scale=float(p.head_dim ** -0.5), sliding_window=int(p.sliding_window or 0))
        g.nodes[-1].output[1:] = [f"k_cache_out.{i}", f"v_cache_out.{i}"]
        x = g.op("Add", [x, linear(attn, f"{L}.attention.wo", f"{L}.o")], name=f"{L}.attn_residual")[0]
        h = rmsnorm(x, f"{L}.ffn_norm", f"{L}.ffn_norm")
        gate = linear(h, f"{L}.feed_forward.w1", f"{L}.gate")
        up = linear(h, f"{L}.feed_forward.w3", f"{L}.up")
        act = g.op("SiluMul", [gate, up], name=f"{L}.silu_mul")[0]
        x = g.op("Add", [x, linear(act, f"{L}.feed_forward.w2", f"{L}.down")], name=f"{L}.ffn_residual")[0]
    rows = g.op("Gather", [x, "logits_indices"], name="logits_rows", axis=0)[0]
    h = rmsnorm(rows, "norm", "final_norm")
    if "output.weight" in quantized:
        fmt, blocks = quantized["output.weight"]
        ins, attrs = [h, g.raw_weight("output.weight", blocks)], {"weight_format": fmt}
    else:
        out_weight = "tok_embeddings.weight" if p.tie_word_embeddings else "output.weight"
        ins, attrs = [h, g.weight(out_weight, w[out_weight])], {}
    g.nodes.append(helper.make_node("Linear", ins, ["logits"], name="lm_head", domain=DOMAIN, **attrs))

    et = _ONNX_DTYPES[dtype]
    cache_shape = ["num_blocks", "block_size", p.n_kv_heads, p.head_dim]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, _dims(s)) for n, s in GRAPH_INPUTS.items()]
    outputs = [helper.make_tensor_value_info("logits", et, ["N", p.vocab_size])]
    for i in range(p.n_layers):
        for kind in ("k", "v"):
            inputs.append(helper.make_tensor_value_info(f"{kind}_cache.{i}", et, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"{kind}_cache_out.{i}", et, cache_shape))
    graph = helper.make_graph(g.nodes, "perfxlm_llm_step", inputs, outputs, list(g.initializers.values()))
    m = helper.make_model(graph, producer_name="perfxlm", ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    from perfxlm.version import __version__
    m.producer_version = __version__
    helper.set_model_props(m, {
        "perfxlm.format_version": str(FORMAT_VERSION),
        "perfxlm.model_params": json.dumps(p.__dict__),
        "perfxlm.dtype": str(dtype).removeprefix("torch."),
        "perfxlm.weight_formats": json.dumps(sorted({f for f, _ in quantized.values()})),
        "perfxlm.source": source,
    })
    return m


def save_model(m: onnx.ModelProto, path: str | Path) -> None:
    """Save the graph with its weights in `<file>.data` (memory-mapped at load), then check it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    onnx.checker.check_model(str(path))
    # saving moved the weights out of `m`; bring them back so the caller's model stays whole
    onnx.load_external_data_for_model(m, str(path.parent))


def op_histogram(m: onnx.ModelProto) -> dict[str, int]:
    hist: dict[str, int] = {}
    for node in m.graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return dict(sorted(hist.items(), key=lambda kv: -kv[1]))


def _dims(shape: str) -> list[str]:
    """'(B+1,) int64' -> ['B+1']: symbolic dimension names."""
    inner = shape.split(")")[0].strip("(")
    return [d.strip() for d in inner.split(",") if d.strip()]
