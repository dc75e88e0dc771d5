"""A model's forward -> ONNX graph over the op set of ops.py, by tracing it once.

The model computes through graph_export.functional; export runs its forward on a tiny
step (two tokens of one sequence) with a tracer that records one node per op call. Each
value is named by where it comes from: a graph input (ops.GRAPH_INPUTS, the KV caches), a
weight (the module's own parameter or buffer name) or a node's output. Nothing here knows
an architecture or a weight name.

The graph computes one engine step: T new tokens of B sequences in, logits for the
`logits_indices` rows out, with each layer's paged KV cache as an input that
PagedAttention updates in place (and names again as an output).
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from graph_export import functional
from graph_export.quant import ADDEND
from graph_export.ops import (DOMAIN, DOMAIN_VERSION, FORMAT_VERSION, GRAPH_INPUTS, IR_VERSION, LOGITS, ONNX_OPSET,
                              OPS, OPTIONAL_GRAPH_INPUTS, cache_input_names, cache_output_name)

logger = logging.getLogger(__name__)

_ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                torch.bfloat16: TensorProto.BFLOAT16}
TRACE_BLOCK_SIZE = 16


class _Tracer:
    """Records the functional ops a forward calls (graph_export.functional._tracer)."""

    def __init__(self, model: torch.nn.Module, quantized: dict[str, tuple[str, np.ndarray]],
                 weight_dtype: torch.dtype | None = None) -> None:
        self.quantized = quantized
        self.weight_dtype = weight_dtype                # dense weight inputs stored in this dtype (None: as held)
        self.narrowed: dict[int, str] = {}             # id(tensor) -> its weight_dtype initializer
        self.weight_names: dict[int, list[str]] = {}   # id(tensor) -> its names in the module (tied: several)
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            self.weight_names.setdefault(id(t), []).append(name)
        self.values: dict[int, str] = {}               # id(tensor) -> graph value name
        self.alive: list[torch.Tensor] = []            # every traced tensor, so no id is reused
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.blocks: dict[str, str] = {}               # weight name -> its GGUF blocks' initializer
        self.scope: list[str] = []                     # module path of the forward being traced

    def name_input(self, t: torch.Tensor, name: str) -> None:
        self.values[id(t)] = name
        self.alive.append(t)

    def record(self, op_type: str, inputs: list[Any], outputs: list[torch.Tensor], **attrs: Any) -> None:
        addends = {i: self._addend(inputs[i]) for i in OPS[op_type].weights if i < len(inputs)}
        if not any(addends.values()):
            self._record(op_type, inputs, outputs, **attrs)
            return
        if op_type != "Linear":
            raise ValueError(f"a {op_type} op reads a weight stored as two parts (quant.SPLIT); only Linear can")
        # a split weight (quant.SPLIT): y = x W^T (+ b) + x A^T, A the blocks that complete W exactly
        key = addends[1]
        a, parts = torch.empty(0), [torch.empty(0), torch.empty(0)]
        self.name_input(a, self._blocks(key, self.quantized[key][1]))
        self._record(op_type, inputs, parts[:1], **attrs)
        self._record(op_type, [inputs[0], a], parts[1:], weight_format=self.quantized[key][0])
        self._record("Add", parts, outputs)

    def _addend(self, w: Any) -> str | None:
        """The `quantized` key of the blocks a weight's blocks need added (quant.ADDEND), if any."""
        names = [n for n in self.weight_names.get(id(w), []) if n in self.quantized]
        return names[0] + ADDEND if names and names[0] + ADDEND in self.quantized else None

    def _record(self, op_type: str, inputs: list[Any], outputs: list[torch.Tensor], **attrs: Any) -> None:
        spec = OPS[op_type]
        names = [self._value(t, quantizable=i in spec.weights) for i, t in enumerate(inputs)]
        for i, fmt_attr in spec.weights.items():  # a weight input that reads GGUF blocks names their format
            if i < len(names) and names[i] in self.blocks.values() and fmt_attr not in attrs:
                name = next(n for n in self.weight_names[id(inputs[i])] if n in self.quantized)
                attrs[fmt_attr] = self.quantized[name][0]
        out_names = [self._node_name(op_type, names)]
        for o in range(1, len(outputs)):  # outputs that alias an input (the KV caches) are named after it
            out_names.append(cache_output_name(names[spec.aliases[o]]))
        self.nodes.append(helper.make_node(op_type, names, out_names, name=out_names[0], domain=spec.domain, **attrs))
        self.values[id(outputs[0])] = out_names[0]
        self.alive.append(outputs[0])

    def _value(self, t: torch.Tensor, quantizable: bool) -> str:
        names = self.weight_names.get(id(t), [])
        quantized = [n for n in names if n in self.quantized]
        if quantizable and quantized:  # a weight input reads GGUF blocks; the same tensor may be read dense elsewhere
            return self._blocks(names[-1], self.quantized[quantized[0]][1])  # a tied projection's own name
        if quantizable and names and self.weight_dtype not in (None, t.dtype):  # (a tied Gather reads it as held)
            if id(t) not in self.narrowed:
                self.narrowed[id(t)] = name = self._unique(names[-1])
                self.initializers[name] = to_tensor_proto(t.to(self.weight_dtype), name)
            return self.narrowed[id(t)]
        name = self.values.get(id(t))
        if name is not None:
            return name
        if not names:
            raise ValueError(f"an op input of shape {tuple(t.shape)} is neither a graph input, a weight of the model, "
                             "nor an op's output: a model must compute only through graph_export.functional")
        name = self.values[id(t)] = self._unique(names[0])
        self.initializers[name] = to_tensor_proto(t, name)
        return name

    def _blocks(self, name: str, blocks: np.ndarray) -> str:
        if name not in self.blocks:
            self.blocks[name] = self._unique(name)
            self.initializers[self.blocks[name]] = onnx.numpy_helper.from_array(
                np.ascontiguousarray(blocks, np.uint8), self.blocks[name])
        return self.blocks[name]

    def _unique(self, name: str) -> str:
        return name if name not in self.initializers else f"{name}.{len(self.initializers)}"

    def _node_name(self, op_type: str, inputs: list[str]) -> str:
        """A node that reads a weight is named after that parameter (less '.weight'), others after
        the module that called the op and the op; a name already taken gets a number."""
        weight = next((n for n in inputs[:2] if n in self.initializers), None)
        scope = self.scope[-1:]
        if len(self.scope) > 1 and not self.scope[-1].startswith(self.scope[-2] + "."):  # a shared module
            scope = [f"{self.scope[-2]}.{self.scope[-1]}"]
        name = weight.removesuffix(".weight") if weight else ".".join([*scope, op_type.lower()])
        taken = set(self.initializers) | set(self.values.values()) | set(GRAPH_INPUTS) | set(OPTIONAL_GRAPH_INPUTS)
        base, k = name, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name


def _name_scopes(model: torch.nn.Module, tracer: _Tracer) -> list[Any]:
    """Keep tracer.scope as the path of the module whose forward is running (names nodes)."""
    def enter(name: str) -> Any:
        return lambda module, args: tracer.scope.append(name)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        tracer.scope.pop()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave))
    return handles


def to_tensor_proto(t: torch.Tensor, name: str) -> onnx.TensorProto:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: store the raw 16-bit patterns
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes(),
                                  raw=True)
    return onnx.numpy_helper.from_array(t.numpy(), name)


def trace_inputs(model: torch.nn.Module, cache_dtype: torch.dtype) -> tuple[functional.StepInputs,
                                                                             list[functional.KVCache]]:
    """A two-token prefill of one sequence, and one cache block per layer in cache_dtype: enough to
    run every op once."""
    def ints(*values: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)
    step = functional.StepInputs(input_ids=ints(0, 1), positions=ints(0, 1), slot_mapping=ints(0, 1),
                                 block_tables=ints(0).view(1, 1), seq_lens=ints(2), query_start_loc=ints(0, 2),
                                 logits_indices=ints(1), token_type_ids=ints(0, 0),
                                 lora_ids=ints(0, 0))
    caches = [(torch.zeros(1, TRACE_BLOCK_SIZE, *k, dtype=cache_dtype),
               torch.zeros(1, TRACE_BLOCK_SIZE, *v, dtype=cache_dtype))
              for k, v in model.kv_cache_shapes()]
    return step, caches


def export_model(model: torch.nn.Module, *, source: str = "", producer_version: str = "",
                 quantized: dict[str, tuple[str, np.ndarray]] | None = None,
                 weight_dtype: torch.dtype | None = None, cache_dtype: torch.dtype | None = None) -> onnx.ModelProto:
    """The ONNX graph of `model` (a perfxlm model family: forward(step, kv_caches) -> logits,
    kv_cache_shapes()), traced once.

    `quantized` maps weight names to (weight_format, uint8 blocks) (graph_export/quant.py): the
    ops that take them as a weight input (Linear, MoE's experts) read the blocks as stored
    instead of the module's float weights. `weight_dtype` (bfloat16 under a float32 model) stores
    the other dense weights those ops read in that dtype: the activations stay in the model's.
    The KV caches are in `cache_dtype`, by default the weights' (vLLM's kv_cache_dtype "auto": the
    model's dtype), so a bf16 model's cache is bf16 under float32 activations: half the bytes a
    decode reads."""
    quantized = quantized or {}
    dtype = next(model.parameters()).dtype
    tracer = _Tracer(model, quantized, weight_dtype)
    cache_dtype = cache_dtype or weight_dtype or dtype
    step, caches = trace_inputs(model, cache_dtype)
    for name in [*GRAPH_INPUTS, *OPTIONAL_GRAPH_INPUTS]:
        tracer.name_input(getattr(step, name), name)
    for i, (k, v) in enumerate(caches):
        k_name, v_name = cache_input_names(i)
        tracer.name_input(k, k_name)
        tracer.name_input(v, v_name)
    token = functional.tracer.set(tracer)
    scopes = _name_scopes(model, tracer)
    try:
        with torch.inference_mode():
            logits = model(step, caches)                                     # (N, V)
    finally:
        functional.tracer.reset(token)
        for handle in scopes:
            handle.remove()
    last = tracer.nodes[-1]
    if tracer.values.get(id(logits)) != last.output[0]:
        raise ValueError("the model's forward must return the output of its last op (the logits)")
    last.output[0] = last.name = LOGITS

    et, cache_et = _ONNX_DTYPES[dtype], _ONNX_DTYPES[cache_dtype]
    read = {name for node in tracer.nodes for name in node.input}
    optional = {n: s for n, s in OPTIONAL_GRAPH_INPUTS.items() if n in read}  # only the inputs the model reads
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, _dims(s))
              for n, s in {**GRAPH_INPUTS, **optional}.items()]
    outputs = [helper.make_tensor_value_info(LOGITS, et, ["N", int(logits.shape[1])])]
    for i, cache in enumerate(caches):
        for name, t in zip(cache_input_names(i), cache):
            shape = ["num_blocks", "block_size", *t.shape[2:]]
            inputs.append(helper.make_tensor_value_info(name, cache_et, shape))
            outputs.append(helper.make_tensor_value_info(cache_output_name(name), cache_et, shape))
    graph = helper.make_graph(tracer.nodes, "perfxlm_llm_step", inputs, outputs, list(tracer.initializers.values()))
    m = helper.make_model(graph, producer_name="perfxlm", ir_version=IR_VERSION, opset_imports=[
        helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    m.producer_version = producer_version
    params = getattr(model, "params", None)
    helper.set_model_props(m, {
        "perfxlm.format_version": str(FORMAT_VERSION),
        "perfxlm.model_params": json.dumps(dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}),
        "perfxlm.dtype": str(dtype).removeprefix("torch."),
        "perfxlm.weight_formats": json.dumps(sorted({a.s.decode() for n in tracer.nodes for a in n.attribute
                                                     if a.name.endswith("_format")})),
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
