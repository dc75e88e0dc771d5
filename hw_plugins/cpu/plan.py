"""A compiled graph step for the `cpu` plugin: one C call runs every node (csrc/core/pxl_plan.c).

Built once from the runner's nodes and fixed buffers (weights, caches, planned activation
slots, staging arrays for the graph inputs); a step copies its small index inputs into the
staging arrays and passes T, N, B and the block-table width. The records (PlanNode) and their
codes come from library.py, which checks them against the loaded library.
"""

import ctypes
from typing import Any

import numpy as np

from graph_export.ops import LOGITS
from hw_plugins.cpu.buffers import _ptr, host_zeros
from hw_plugins.cpu.library import (ACTIVATION, ACTIVATIONS, ADD, ADD_RMSNORM, ATTENTION, BF16P, CACHES, F32, GATHER,
                                    GELU_MUL, LAYER_NORM, LINEAR, LINEAR_PARTS, LINEAR_SILU, LORA, MOE, NO_WAIT,
                                    NONCAUSAL, OUT_F32, PANEL, RMSNORM, ROPE, ROWS_N, SCALE, SILU_MUL, SOFTCAP, XR, YR,
                                    PlanNode, activation_code, ldxr)


def _independent(a: "PlanNode", b: "PlanNode") -> bool:
    """Two Linear records (p: x, weight, bias, y) that share at most their input (q / k / v,
    gate / up): neither reads or writes the buffer the other writes."""
    return a.p[3] not in (b.p[0], b.p[3]) and b.p[3] != a.p[0]


def _gated_pairs(nodes: list[Any]) -> dict[int, tuple[Any, Any]]:
    """The SiluMul nodes (by index) whose gate and up are two bias-free Linears of one input
    that nothing else reads: each becomes one pass (pxl_linear_silu) in place of the three."""
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    producer = {node.outputs[0]: node for node in nodes}
    pairs = {}
    for i, node in enumerate(nodes):
        if node.op_type != "SiluMul":
            continue
        gate, up = (producer.get(name) for name in node.inputs)
        if (gate is not None and up is not None and gate.op_type == up.op_type == "Linear"
                and len(gate.inputs) == len(up.inputs) == 2 and gate.inputs[0] == up.inputs[0]
                and readers[gate.outputs[0]] == readers[up.outputs[0]] == 1):
            pairs[i] = (gate, up)
    return pairs


def _shared_x_runs(nodes: list[Any], skip: set[int]) -> list[list[Any]]:
    """Runs of two or three consecutive Linears (q / k / v) of one input, alike in weight format
    and in having a bias or not, none the logits: each becomes one pass (pxl_linear_parts) that
    prepares x once. Consecutive, so no node between them reads or reuses their outputs' slots."""
    runs, run = [], []
    for node in [*nodes, None]:
        ok = (node is not None and node.op_type == "Linear" and id(node) not in skip
              and node.outputs[0] != LOGITS)
        if ok and run and len(run) < 3 and node.inputs[0] == run[0].inputs[0] \
                and len(node.inputs) == len(run[0].inputs) \
                and node.attrs.get("weight_format", "dense") == run[0].attrs.get("weight_format", "dense"):
            run.append(node)
            continue
        if len(run) > 1:
            runs.append(run)
        run = [node] if ok else []
    return runs


def _bf16_rows(records: Any, x_of: dict[int, str], y_of: dict[int, tuple[str, np.ndarray, int]],
               readers: dict[str, set[int]]) -> list[np.ndarray]:
    """Hand the float32 values that pass from an RMSNorm (or Add+RMSNorm, Linear+SiluMul or
    attention) to the next record, one Linear on packed bf16 weights, and to nothing else, as
    bf16 rows: the Linear rounds x to bf16 anyway, so the producer stores it so (YR) and the
    Linear reads it as it is (XR), with no pass of its own over x. The rows go in the value's
    own planned buffer (they take at most its bytes), except where that buffer is also one of
    the producer's inputs (an Add+RMSNorm's y over its a, a fused pair's planned reuse): a row
    at another stride would overwrite rows another thread has still to read, so those go in one
    of two buffers of their own, the one the producer does not read. x_of: record -> the value
    it reads as x (Linears); y_of: record -> the value it could store so, its buffer and its
    pointer's index; readers: value -> the records reading it. Returns the buffers made."""
    def plain(r: Any) -> bool:
        return r.dt == F32 and not r.rows & ROWS_N

    pairs = []  # (producer, its pointer's index, consumer, the value's float32 buffer)
    for j, (name, out, k) in y_of.items():
        i = j + 1
        if (x_of.get(i) == name and name != LOGITS and readers.get(name) == {i} and plain(records[i])
                and plain(records[j]) and records[i].wfmt == BF16P and ldxr(out.shape[1]) * 2 <= out.strides[0]):
            pairs.append((j, k, i, out))

    def over_input(j: int, k: int) -> bool:  # the producer's y buffer is also one of its inputs
        return any(records[j].p[m] == records[j].p[k] for m in range(len(records[j].p)) if m != k)

    spare = [out for j, k, _, out in pairs if over_input(j, k)]  # (before re-pointing: at most these)
    bufs = [host_zeros((max(o.shape[0] for o in spare), max(ldxr(o.shape[1]) for o in spare)), np.uint16)
            for _ in range(2)] if spare else []
    for j, k, i, _ in pairs:  # in record order: a producer's x is already re-pointed
        if over_input(j, k):
            records[j].p[k] = next(_ptr(b) for b in bufs if _ptr(b) not in records[j].p[:])
        records[i].p[0] = records[j].p[k]
        records[j].dt |= YR
        records[i].dt |= XR
    return bufs


class Plan:
    def __init__(self, plugin: Any, nodes: list[Any], buffer: Any, inputs: dict[str, np.ndarray],
                 rows_n: set[str]) -> None:
        """nodes: the runner's nodes in order; buffer(name) -> the fixed array holding a value
        (its full planned size); inputs: staging arrays of the graph inputs; rows_n: values
        whose row count is the step's N (logits rows), not T. After a step, `logits` holds the
        float32 logits of its N rows: the lm_head stores them so (bf16 values widened), where the
        engine would otherwise convert 64 x 49152 of them a decode step."""
        lib = plugin.lib
        self.plugin, self.lib, self.inputs = plugin, lib, inputs
        gated = {}  # id(SiluMul node) -> (its gate and up Linears, (format, their packed weights))
        for i, (gate, up) in _gated_pairs(nodes).items():
            packed = plugin.gated_weight(gate.attrs, buffer(gate.inputs[1]), up.attrs, buffer(up.inputs[1]))
            if packed is not None:
                gated[id(nodes[i])] = (gate, up, packed)
        fused = {id(n) for gate, up, _ in gated.values() for n in (gate, up)}
        # Linears of one x (q / k / v): one pass over their stacked weights, where every part
        # starts on a panel (the kernels' unit of features) and the weights are alike
        parts = {}  # id(first Linear) -> (the run, (format, stacked weights), stacked bias or None)
        for run in _shared_x_runs(nodes, fused):
            ws = [buffer(n.inputs[1]) for n in run]
            if any(w.ndim != 2 or w.dtype != ws[0].dtype or w.shape[1] != ws[0].shape[1] or w.shape[0] % PANEL
                   for w in ws):
                continue
            bias = np.concatenate([buffer(n.inputs[2]) for n in run]) if len(run[0].inputs) > 2 else None
            parts[id(run[0])] = (run, plugin.stacked_weight(run[0].attrs, ws), bias)
            fused |= {id(n) for n in run[1:]}
        self.biases = [bias for _, _, bias in parts.values() if bias is not None]  # (the records point to them)
        # a residual Add and the RMSNorm of its sum right after it: one pass (pxl_add_rmsnorm)
        normed = {id(a): b for a, b in zip(nodes, nodes[1:])
                  if a.op_type == "Add" and b.op_type == "RMSNorm" and b.inputs[0] == a.outputs[0]
                  and not b.attrs.get("group_size")}
        fused |= {id(b) for b in normed.values()}
        nodes = [n for n in nodes if id(n) not in fused]  # each fused pair's first (SiluMul: last) record runs it
        self.records = (PlanNode * len(nodes))()
        self.input_refs: dict[str, list[tuple[int, int]]] = {n: [] for n in inputs}
        x_of, y_of, readers = {}, {}, {}  # (for _bf16_rows)
        for i, node in enumerate(nodes):
            ins = [n for n in node.inputs if n]
            arrays = [buffer(n) for n in ins]
            out = buffer(node.outputs[0])
            r = self.records[i]
            r.dt = ACTIVATIONS[arrays[0].dtype.name]
            r.rows = ROWS_N if node.outputs[0] in rows_n else 0
            at = node.attrs
            if node.op_type == "Gather":
                r.op, r.a, ptrs = GATHER, arrays[0].shape[1], [arrays[0], arrays[1], out]
            elif node.op_type == "RMSNorm":  # b groups of a features a row (0: the whole row)
                g = at.get("group_size") or arrays[0].shape[1]
                r.op, r.a, r.b, r.f0 = RMSNORM, g, arrays[0].shape[1] // g, at["epsilon"]
                ptrs = [arrays[0], arrays[1], out]
            elif id(node) in parts:  # y_i = x @ W_i^T (+ b_i) for the run's Linears, x prepared once
                run, (r.wfmt, weight), bias = parts[id(node)]
                outs = [buffer(n.outputs[0]) for n in run]
                r.op, r.a, r.b = LINEAR_PARTS, len(run), arrays[0].shape[1]
                r.c, r.d, r.e = (*(o.shape[1] for o in outs), 0, 0)[:3]
                ptrs = [arrays[0], weight, bias, *outs]
            elif node.op_type == "Linear":
                r.op, r.a, r.b = LINEAR, arrays[1].shape[0], arrays[0].shape[1]
                r.wfmt, weight = plugin.linear_weight(at, arrays[1])
                if node.outputs[0] == LOGITS and out.dtype != np.float32:
                    out = host_zeros(out.shape, np.float32)
                    r.rows |= OUT_F32
                ptrs = [arrays[0], weight, arrays[2] if len(arrays) > 2 else None, out]
            elif node.op_type == "RoPE":
                hd = at["head_dim"]
                r.op, r.a, r.b, ptrs = ROPE, arrays[0].shape[1] // hd, hd, [*arrays[:4], out]
            elif node.op_type == "PagedAttention":
                r.op, r.a, r.b, r.c = ATTENTION, at["num_heads"], at["num_kv_heads"], at["head_dim"]
                r.wfmt = CACHES[arrays[3].dtype.name]  # the caches' format
                r.d, r.e, r.f0 = arrays[3].shape[1], at.get("sliding_window") or 0, at["scale"]
                r.f1 = at.get("softcap") or 0.0
                r.rows |= 0 if at.get("causal", 1) else NONCAUSAL
                ptrs = [*arrays[:9], out]
            elif id(node) in gated:  # y = silu(x @ Wg^T) * (x @ Wu^T), in one pass
                gate, _, (r.wfmt, weight) = gated[id(node)]
                x = buffer(gate.inputs[0])
                r.op, r.a, r.b, r.dt = LINEAR_SILU, out.shape[1], x.shape[1], ACTIVATIONS[x.dtype.name]
                ptrs = [x, weight, out]
                ins = [gate.inputs[0]]
            elif id(node) in normed:  # s = a + b, y = rmsnorm(s)
                norm = normed[id(node)]
                r.op, r.a, r.f0 = ADD_RMSNORM, out.shape[1], norm.attrs["epsilon"]
                ptrs = [*arrays[:2], buffer(norm.inputs[1]), out, buffer(norm.outputs[0])]
            elif node.op_type in ("SiluMul", "Add"):
                r.op, r.a, ptrs = SILU_MUL if node.op_type == "SiluMul" else ADD, arrays[0].shape[1], [*arrays[:2], out]
            elif node.op_type == "LayerNorm":
                r.op, r.a, r.f0 = LAYER_NORM, arrays[0].shape[1], at["epsilon"]
                ptrs = [arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, out]
            elif node.op_type == "GeluMul":
                r.op, r.a, ptrs = GELU_MUL, arrays[0].shape[1], [*arrays[:2], out]
            elif node.op_type == "Activation":
                r.op, r.a, r.b, ptrs = ACTIVATION, arrays[0].shape[1], activation_code(at), [arrays[0], out]
            elif node.op_type == "Scale":
                r.op, r.a, r.f0, ptrs = SCALE, arrays[0].shape[1], at["factor"], [arrays[0], out]
            elif node.op_type == "Softcap":
                r.op, r.a, r.f0 = SOFTCAP, arrays[0].shape[1], at["cap"]
                if node.outputs[0] == LOGITS and out.dtype != np.float32:  # the logits: float32, as a lm_head's
                    out = host_zeros(out.shape, np.float32)
                    r.rows |= OUT_F32
                ptrs = [arrays[0], out]
            elif node.op_type == "MoE":  # a = D, b = F, c = E, d = top_k, e = norm_topk_prob
                r.op, r.wfmt, (wg, wu, wd) = MOE, *plugin.moe_weights(at, arrays[2:5])
                r.a, r.b, r.c = arrays[0].shape[1], arrays[2].shape[1], arrays[2].shape[0]
                r.d, r.e = at["top_k"], at.get("norm_topk_prob", 0)
                shared = arrays[5:7] if len(arrays) > 6 else [None, None]
                ptrs = [arrays[0], arrays[1], wg, wu, wd, *shared, out]
            elif node.op_type == "LoRA":  # a = N, b = K, c = R, d = L
                r.op, r.a, r.b = LORA, arrays[1].shape[1], arrays[0].shape[1]
                r.c, r.d = arrays[2].shape[1], arrays[2].shape[0]
                ptrs = [*arrays[:6], out]
            else:
                raise ValueError(f"no plan record for {node.op_type}")
            if r.op in (LINEAR, LINEAR_PARTS, LINEAR_SILU):
                x_of[i] = ins[0]
            if (r.op == RMSNORM and r.b == 1) or r.op == LINEAR_SILU:
                y_of[i] = (node.outputs[0], out, 2)
            elif r.op == ATTENTION:
                y_of[i] = (node.outputs[0], out, 9)
            elif r.op == ADD_RMSNORM:
                y_of[i] = (normed[id(node)].outputs[0], ptrs[4], 4)
            for name in ins:
                readers.setdefault(name, set()).add(i)
            if node.outputs[0] == LOGITS:
                self.logits = out
            for j, a in enumerate(ptrs):
                r.p[j] = None if a is None else _ptr(a)
            for j, name in enumerate(ins):  # remember where graph inputs go, to re-point them on growth
                if name in self.input_refs:
                    self.input_refs[name].append((i, j))
        self.bf16_rows = _bf16_rows(self.records, x_of, y_of, readers)  # (the records point to them)
        for a, b in zip(self.records, self.records[1:]):
            if a.op == LINEAR and b.op == LINEAR and _independent(a, b):
                a.rows |= NO_WAIT
        self._run = lib.pxl_plan_run  # (argument types: library._SIGNATURES)
        self._records_ptr = ctypes.addressof(self.records)

    def run(self, feeds: dict[str, np.ndarray]) -> None:
        for name, refs in self.input_refs.items():
            src = feeds[name].reshape(-1)
            buf = self.inputs[name]
            if src.size > buf.size:  # grow the staging array and re-point the records that read it
                buf = self.inputs[name] = np.empty(2 * src.size, dtype=np.int64)
                for i, j in refs:
                    self.records[i].p[j] = _ptr(buf)
            buf[:src.size] = src
        B, M = feeds["block_tables"].shape
        self.plugin.set_numerics()  # per engine; the library's flags are per process
        self._run(self._records_ptr, len(self.records), len(feeds["input_ids"]), len(feeds["logits_indices"]), B, M)
