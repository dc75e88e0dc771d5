"""Runs an exported perfxlm graph node by node on hardware plugins.

At load: check the graph's format, give each node to the chosen plugin (or, for
an op it lacks, the reference plugin), upload the weights, allocate the KV caches,
and plan activation buffers once: each intermediate value gets a slot sized for
the largest step, and slots are reused as soon as their value is dead. A step
then only uploads the small index inputs, runs the nodes and downloads logits.
"""

import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graph_export.ops import FORMAT_VERSION, GRAPH_INPUTS, LOGITS, OPS, OPTIONAL_GRAPH_INPUTS, is_cache_input
from hw_plugins.base import CompiledStep, HwPlugin, Node

logger = logging.getLogger(__name__)

_ONNX_FLOATS = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.BFLOAT16: "bfloat16",
                onnx.TensorProto.FLOAT16: "float16"}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_STEP_INPUTS = {**GRAPH_INPUTS, **OPTIONAL_GRAPH_INPUTS}  # every int64 input a step may feed


@dataclass(frozen=True)
class CacheSpec:
    """One paged KV cache the graph takes: (num_blocks, block_size, *slot_shape) of dtype."""

    name: str                       # the graph input
    slot_shape: tuple[int, ...]     # one token's entry, e.g. (kv heads, head dim)
    dtype: str                      # numpy name

    def shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, *self.slot_shape)

    def bytes_per_block(self, block_size: int) -> int:
        return block_size * math.prod(self.slot_shape) * _ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class GraphSpec:
    """What the engine must know of a model to serve it, read off the graph's inputs and outputs."""

    vocab_size: int                 # the output's width: logits (V), or a pooling model's hidden size / classes
    caches: tuple[CacheSpec, ...]
    optional_inputs: tuple[str, ...] = ()  # the ops.OPTIONAL_GRAPH_INPUTS the graph takes (token_type_ids)

    def kv_bytes_per_block(self, block_size: int) -> int:
        return sum(c.bytes_per_block(block_size) for c in self.caches)

    @classmethod
    def of_graph(cls, m: onnx.ModelProto) -> "GraphSpec":
        caches = []
        for v in m.graph.input:
            if is_cache_input(v.name):
                dims = v.type.tensor_type.shape.dim
                caches.append(CacheSpec(v.name, tuple(d.dim_value for d in dims[2:]),
                                        _ONNX_FLOATS[v.type.tensor_type.elem_type]))
        logits = next(v for v in m.graph.output if v.name == LOGITS)
        optional = tuple(v.name for v in m.graph.input if v.name in OPTIONAL_GRAPH_INPUTS)
        return cls(logits.type.tensor_type.shape.dim[1].dim_value, tuple(caches), optional)


@dataclass
class _Slot:
    key: tuple                      # (rows symbol, width, dtype, plugin name)
    buffer: Any = None              # (max rows, width) on the plugin
    values: list[str] = field(default_factory=list)


def load_graph(path: str | Path) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Load an exported graph and check that perfxlm can run it."""
    m = onnx.load(str(path), load_external_data=False)  # weights stay in the side file
    meta = {p.key: p.value for p in m.metadata_props}
    version = meta.get("perfxlm.format_version")
    if m.producer_name != "perfxlm" or version is None:
        raise ValueError(f"{path} is not a perfxlm graph (producer {m.producer_name!r}, no format version)")
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path} has perfxlm graph format version {version}; this perfxlm reads version "
                         f"{FORMAT_VERSION}. Re-export it with `perfxlm export`.")
    unknown = sorted({f"{n.op_type} (node {n.name})" for n in m.graph.node
                      if n.op_type not in OPS or OPS[n.op_type].domain != n.domain})
    if unknown:
        raise ValueError(f"{path} has ops outside the perfxlm op set: {', '.join(unknown)}. "
                         f"Known ops: {sorted(OPS)}")
    return m, meta


class GraphRunner:
    def __init__(self, path: str | Path, plugin: HwPlugin, reference: HwPlugin | Callable[[], HwPlugin],
                 max_tokens: int, num_blocks: int, block_size: int) -> None:
        """`reference` runs the ops `plugin` lacks; a callable makes it only when one does (the
        torch reference plugin needs torch, which a board may not have)."""
        m, _ = load_graph(path)
        self.spec = GraphSpec.of_graph(m)
        self.plugin, self._reference = plugin, reference
        weights = {t.name: _to_numpy(t, Path(path).parent) for t in m.graph.initializer}
        self.nodes = [Node(n.op_type, n.name, list(n.input), list(n.output),
                           {a.name: _attr(a) for a in n.attribute}) for n in m.graph.node]
        shapes = {n: (("N",) if n == "logits_indices" else ("T",)) for n in _STEP_INPUTS}
        shapes["block_tables"], shapes["seq_lens"], shapes["query_start_loc"] = ("B", "M"), ("B",), ("B1",)
        dtypes = {n: "int64" for n in _STEP_INPUTS}
        for cache in self.spec.caches:
            shapes[cache.name], dtypes[cache.name] = cache.shape(num_blocks, block_size), cache.dtype
        shapes.update({k: w.shape for k, w in weights.items()})
        dtypes.update({k: w.dtype.name for k, w in weights.items()})
        self._assign_plugins(dtypes, shapes)

        # weights, graph-input routing and KV caches, each on the plugins whose nodes read them
        self.values: dict[tuple[str, str], Any] = {}   # (value, plugin name) -> buffer
        self.input_plugins: dict[str, list[HwPlugin]] = defaultdict(list)
        for node in self.nodes:
            for name in filter(None, node.inputs):
                key = (name, node.plugin.name)
                if name in weights and key not in self.values:
                    self.values[key] = node.plugin.upload(weights[name])
                elif name in _STEP_INPUTS and node.plugin not in self.input_plugins[name]:
                    self.input_plugins[name].append(node.plugin)
                elif is_cache_input(name) and key not in self.values:
                    # zero-filled: masked attention rows still read padded slots, which must be finite
                    self.values[key] = node.plugin.zeros(shapes[name], np_dtype(dtypes[name]))
        self._plan(shapes, dtypes, max_tokens)
        self.compiled = self._compile_step(shapes, max_tokens)
        logger.info("graph %s: %d nodes on %s, %d activation buffers", Path(path).name, len(self.nodes),
                    ", ".join(sorted({n.plugin.name for n in self.nodes})), len(self.slots))

    @property
    def reference(self) -> HwPlugin:
        if not isinstance(self._reference, HwPlugin):
            self._reference = self._reference()
        return self._reference

    def _assign_plugins(self, dtypes: dict[str, str], shapes: dict[str, tuple]) -> None:
        """Each node to the chosen plugin, or to the reference where the plugin lacks the op."""
        warned = set()
        for node in self.nodes:
            ins = [n for n in node.inputs if n]
            op_dtypes = tuple(dtypes[n] for n in ins)
            if self.plugin.supports(node.op_type, op_dtypes):
                node.plugin = self.plugin
            elif self.reference.supports(node.op_type, op_dtypes):
                node.plugin = self.reference
                if node.op_type not in warned:
                    warned.add(node.op_type)
                    logger.info("hw_plugin %s does not support %s%s; running it on %s", self.plugin.name,
                                node.op_type, op_dtypes, self.reference.name)
            else:
                raise ValueError(f"No plugin supports {node.op_type} with inputs {op_dtypes} (node {node.name})")
            out = OPS[node.op_type].infer([shapes[n] for n in ins])
            shapes[node.outputs[0]], dtypes[node.outputs[0]] = out, dtypes[ins[0]]
            for o, i in OPS[node.op_type].aliases.items():
                shapes[node.outputs[o]], dtypes[node.outputs[o]] = shapes[node.inputs[i]], dtypes[node.inputs[i]]

    def _plan(self, shapes: dict[str, tuple], dtypes: dict[str, str], max_tokens: int) -> None:
        """Give every activation a reusable slot; allocate each slot once at its largest size."""
        last_use = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                last_use[name] = i
        free: dict[tuple, list[_Slot]] = defaultdict(list)
        self.slot_of: dict[str, _Slot] = {}
        self.slots: list[_Slot] = []
        self.producer = {node.outputs[0]: node.plugin for node in self.nodes}
        for i, node in enumerate(self.nodes):
            out = node.outputs[0]
            rows, width = shapes[out]
            key = (rows, width, dtypes[out], node.plugin.name)
            slot = free[key].pop() if free[key] else None
            if slot is None:
                slot = _Slot(key, node.plugin.alloc((max_tokens, width), dtypes[out]))
                self.slots.append(slot)
            slot.values.append(out)
            self.slot_of[out] = slot
            for name in set(node.inputs):
                if last_use.get(name) == i and name in self.slot_of and name != LOGITS:
                    free[self.slot_of[name].key].append(self.slot_of[name])

    def _compile_step(self, shapes: dict[str, tuple], max_tokens: int) -> CompiledStep | None:
        """When one plugin runs every node, offer it the whole step with its fixed buffers
        (HwPlugin.compile_step); run() then makes one call a step and reads its `logits`,
        (N, V) float32. None where the plugin declines or nodes are split across plugins."""
        plugin = self.nodes[0].plugin
        if any(n.plugin is not plugin for n in self.nodes):
            return None
        if os.environ.get("PERFXLM_NODE_BY_NODE") == "1":  # for debugging and comparing the two paths
            return None
        inputs = {name: np.zeros(max_tokens + 1, dtype=np.int64) for name in self.input_plugins}

        def buffer(name: str) -> Any:
            if name in inputs:
                return inputs[name]
            if (name, plugin.name) in self.values:
                return self.values[(name, plugin.name)]
            return self.slot_of[name].buffer

        rows_n = {name for name, s in shapes.items() if s and s[0] == "N"}
        return plugin.compile_step(self.nodes, buffer, inputs, rows_n)

    def write_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Overwrite weights by name (a LoRA slot's stacks), where every plugin that holds them
        reads them: host arrays in place, so a compiled step's pointers stay valid; another
        plugin's buffer is uploaded anew, and then no compiled step is kept."""
        for (name, plugin_name), buf in list(self.values.items()):
            if name not in weights:
                continue
            if isinstance(buf, np.ndarray) and buf.flags.writeable:
                np.copyto(buf, weights[name].reshape(buf.shape), casting="same_kind")
            else:
                plugin = next(n.plugin for n in self.nodes if n.plugin.name == plugin_name)
                self.values[(name, plugin_name)] = plugin.upload(np.ascontiguousarray(weights[name]))
                self.compiled = None

    def native_sampler(self) -> Any:
        """The sampler of the plugin that produces the logits, if it has one (HwPlugin.native_sampler)."""
        return self.nodes[-1].plugin.native_sampler()

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One step: feeds are the graph's input arrays -> logits (N, V) float32, valid until the
        next step (the compiled path's are written as float32 into one buffer it reuses)."""
        if self.compiled is not None:
            self.compiled.run(feeds)
            logits = self.compiled.logits[:len(feeds["logits_indices"])]
            # a lm_head writes float32; a pooling model's last op (a Gather of hidden rows) the dtype's own
            return logits if logits.dtype == np.float32 else logits.astype(np.float32)
        rows = {"T": len(feeds["input_ids"]), "N": len(feeds["logits_indices"])}
        env: dict[tuple[str, str], Any] = {}  # this step's values: (name, plugin name) -> buffer
        for name, plugins in self.input_plugins.items():
            for plugin in plugins:
                env[(name, plugin.name)] = plugin.upload(np.ascontiguousarray(feeds[name]))
        for node in self.nodes:
            plugin = node.plugin
            ins = [self._fetch(env, name, plugin) for name in node.inputs if name]
            slot = self.slot_of[node.outputs[0]]
            out = slot.buffer[:rows[slot.key[0]]]
            env[(node.outputs[0], plugin.name)] = out
            outs = [out] + [ins[OPS[node.op_type].aliases[o]] for o in range(1, len(node.outputs))]
            plugin.run(node, ins, outs)
        last = self.nodes[-1].plugin
        last.synchronize()
        return last.download(env[(LOGITS, last.name)]).astype(np.float32, copy=False)

    def _fetch(self, env: dict, name: str, plugin: HwPlugin) -> Any:
        """A value on `plugin`: a weight or cache, or this step's value, copied over from the
        plugin that produced it when that is another one."""
        key = (name, plugin.name)
        buf = self.values.get(key)
        if buf is None:
            buf = env.get(key)
        if buf is None:
            producer = self.producer[name]
            producer.synchronize()
            buf = env[key] = plugin.upload(producer.download(env[(name, producer.name)]))
        return buf


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16 of its own
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _attr(a: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(a)
    return value.decode() if isinstance(value, bytes) else value


def _to_numpy(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """An initializer as an array: external data is memory-mapped copy-on-write, not read."""
    if t.data_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)  # numpy_helper would widen bfloat16 to float32
    else:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        return np.memmap(base_dir / info["location"], dtype=dtype, mode="c", offset=int(info.get("offset", 0)),
                         shape=tuple(t.dims))
    if t.data_type == onnx.TensorProto.BFLOAT16:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims)).copy()
    return numpy_helper.to_array(t)

