"""Lower a perfxlm graph into standard ONNX that onnxruntime runs: an independent check.

Every custom op becomes a handful of standard ops (opset 21), computed in float32.
PagedAttention becomes ScatterND writes into the flattened caches, then a per-token
gather of its sequence's cache slots and a masked softmax attention. The lowered
graph has the same inputs and outputs as the original (caches returned updated),
and is meant for checking, not speed: it gathers T x S keys.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_export.ops import DOMAIN, IR_VERSION, ONNX_OPSET

F32 = TensorProto.FLOAT


class _Lowerer:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.consts: list[onnx.TensorProto] = []
        self.n = 0

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        self.n += 1
        outputs = outputs or [f"_l{self.n}"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"_l{self.n}_{op_type}", **attrs))
        return outputs[0]

    def const(self, value, dtype=np.int64) -> str:
        self.n += 1
        name = f"_c{self.n}"
        self.consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    # ---- one method per custom op: (node) -> appends standard nodes writing node.output ----

    def RMSNorm(self, node: onnx.NodeProto, attrs: dict) -> None:
        x, w = node.input
        g = attrs.get("group_size", 0)
        xg = self.op("Reshape", [x, self.const([0, -1, g])]) if g else x            # (T, groups, g)
        ms = self.op("ReduceMean", [self.op("Mul", [xg, xg]), self.const([-1])], keepdims=1)
        den = self.op("Sqrt", [self.op("Add", [ms, self.const(attrs["epsilon"], np.float32)])])
        y = self.op("Mul", [w, self.op("Div", [xg, den])], None if g else [node.output[0]])
        if g:
            self.op("Reshape", [y, self.const([0, -1])], [node.output[0]])

    def LayerNorm(self, node: onnx.NodeProto, attrs: dict) -> None:
        self.op("LayerNormalization", list(node.input), [node.output[0]], axis=-1, epsilon=attrs["epsilon"])

    def GeluMul(self, node: onnx.NodeProto, attrs: dict) -> None:
        g, u = node.input
        self.op("Mul", [self.op("Gelu", [g], approximate="tanh"), u], [node.output[0]])

    def Activation(self, node: onnx.NodeProto, attrs: dict) -> None:
        kind = attrs["kind"].decode() if isinstance(attrs["kind"], bytes) else attrs["kind"]
        if kind == "relu":
            self.op("Relu", list(node.input), [node.output[0]])
        else:
            self.op("Gelu", list(node.input), [node.output[0]], approximate="tanh" if kind == "gelu_tanh" else "none")

    def Scale(self, node: onnx.NodeProto, attrs: dict) -> None:
        self.op("Mul", [node.input[0], self.const(attrs["factor"], np.float32)], [node.output[0]])

    def Softcap(self, node: onnx.NodeProto, attrs: dict) -> None:
        self._softcap(node.input[0], attrs["cap"], node.output[0])

    def _softcap(self, x: str, cap: float, out: str | None = None) -> str:
        c = self.const(cap, np.float32)
        return self.op("Mul", [self.op("Tanh", [self.op("Div", [x, c])]), c], [out] if out else None)

    def MoE(self, node: onnx.NodeProto, attrs: dict) -> None:
        """Every expert on every token (einsums), then the top-k weights scattered into a dense
        (T, E) matrix select and weigh them: E times the work, the same sum."""
        x, logits, wg, wu, wd = node.input[:5]
        probs = self.op("Softmax", [logits], axis=-1)                              # (T, E)
        top, idx = f"_l{self.n + 1}_v", f"_l{self.n + 1}_i"
        self.op("TopK", [probs, self.const([attrs["top_k"]])], [top, idx], axis=-1, largest=1, sorted=1)
        if attrs.get("norm_topk_prob"):
            top = self.op("Div", [top, self.op("ReduceSum", [top, self.const([-1])], keepdims=1)])
        dense = self.op("ScatterElements", [self.op("Mul", [probs, self.const(0.0, np.float32)]), idx, top], axis=1)
        gate = self.op("Einsum", [x, wg], equation="td,efd->tef")
        h = self.op("Mul", [self.op("Mul", [gate, self.op("Sigmoid", [gate])]),
                            self.op("Einsum", [x, wu], equation="td,efd->tef")])   # (T, E, F)
        out = self.op("Einsum", [h, wd], equation="tef,edf->ted")                  # (T, E, D)
        y = self.op("Einsum", [dense, out], equation="te,ted->td")
        if len(node.input) > 5 and node.input[5]:
            shared, shared_gate = node.input[5:7]
            self.op("Add", [y, self.op("Mul", [self.op("Sigmoid", [shared_gate]), shared])], [node.output[0]])
        else:
            self.op("Identity", [y], [node.output[0]])

    def LoRA(self, node: onnx.NodeProto, attrs: dict) -> None:
        """Each token gathers its slot's a, b and scale (slot 0 for none, then masked out)."""
        x, y, a, b, scale, ids = node.input
        slot = self.op("Max", [ids, self.const(0)])                                 # (T,)
        on = self.op("Cast", [self.op("GreaterOrEqual", [ids, self.const(0)])], to=TensorProto.FLOAT)
        xa = self.op("Einsum", [self.op("Cast", [x], to=TensorProto.FLOAT), self.op("Gather", [a, slot])],
                     equation="tk,trk->tr")                                        # (T, R)
        xa = self.op("Mul", [xa, self.op("Unsqueeze", [self.op("Mul", [self.op("Gather", [scale, slot]), on]),
                                                        self.const([1])])])
        delta = self.op("Einsum", [xa, self.op("Gather", [b, slot])], equation="tr,tnr->tn")  # (T, N)
        total = self.op("Add", [self.op("Cast", [y], to=TensorProto.FLOAT), delta])
        self.op("CastLike", [total, y], [node.output[0]])

    def Linear(self, node: onnx.NodeProto, attrs: dict) -> None:
        self.op("Gemm", list(node.input), [node.output[0]], transB=1)

    def RoPE(self, node: onnx.NodeProto, attrs: dict) -> None:
        x, positions, cos, sin = node.input
        hd = attrs["head_dim"]
        xr = self.op("Reshape", [x, self.const([0, -1, hd])])                      # (T, H, hd)
        x1, x2 = f"_l{self.n + 1}_a", f"_l{self.n + 1}_b"
        self.op("Split", [xr], [x1, x2], axis=-1, num_outputs=2)
        rot = self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1)
        axis1 = self.const([1])
        c = self.op("Unsqueeze", [self.op("Gather", [cos, positions]), axis1])      # (T, 1, hd)
        s = self.op("Unsqueeze", [self.op("Gather", [sin, positions]), axis1])
        y = self.op("Add", [self.op("Mul", [xr, c]), self.op("Mul", [rot, s])])
        self.op("Reshape", [y, self.const([0, -1])], [node.output[0]])

    def SiluMul(self, node: onnx.NodeProto, attrs: dict) -> None:
        g, u = node.input
        self.op("Mul", [self.op("Mul", [g, self.op("Sigmoid", [g])]), u], [node.output[0]])

    def PagedAttention(self, node: onnx.NodeProto, attrs: dict) -> None:
        q, k, v, kc, vc, slots, tables, seq_lens, qsl = node.input
        H, Hkv, hd = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
        G = H // Hkv
        i0, i1 = self.const([0]), self.const([1])
        # write the new K/V into the flattened caches
        cache_shape = self.op("Shape", [kc])
        slots2 = self.op("Unsqueeze", [slots, i1])                                  # (T, 1)
        flat = self.const([-1, Hkv * hd])
        k_flat = self.op("ScatterND", [self.op("Reshape", [kc, flat]), slots2, k])  # (blocks*bs, Hkv*hd)
        v_flat = self.op("ScatterND", [self.op("Reshape", [vc, flat]), slots2, v])
        self.op("Reshape", [k_flat, cache_shape], [node.output[1]])
        self.op("Reshape", [v_flat, cache_shape], [node.output[2]])
        # the cache slots of every token's sequence: (B, S) then (T, S)
        bs = self.op("Gather", [cache_shape, i1])                                  # (1,) block size
        offs = self.op("Range", [self.const(0), self.op("Squeeze", [bs, i0]), self.const(1)])
        per_block = self.op("Add", [self.op("Mul", [self.op("Unsqueeze", [tables, self.const([2])]), bs]), offs])
        all_slots = self.op("Reshape", [per_block, self.const([0, -1])])            # (B, S)
        T = self.op("Squeeze", [self.op("Gather", [self.op("Shape", [q]), i0]), i0])
        t_idx = self.op("Range", [self.const(0), T, self.const(1)])                 # (T,)
        ends = self.op("Slice", [qsl, i1, self.const([2**62])])                     # (B,) qsl[1:]
        seq_of = self.op("ReduceSum", [self.op("Cast", [self.op("GreaterOrEqual", [
            self.op("Unsqueeze", [t_idx, i1]), self.op("Unsqueeze", [ends, i0])])], to=TensorProto.INT64), i1],
            keepdims=0)                                                             # (T,) sequence of token
        tok_slots = self.op("Gather", [all_slots, seq_of])                          # (T, S)
        # position of each token, and which keys it may see: those up to its own (causal), or all
        # of its sequence's (an encoder's)
        seq_len = self.op("Gather", [seq_lens, seq_of])                             # (T,)
        pos = self.op("Add", [self.op("Sub", [seq_len, self.op("Gather", [ends, seq_of])]), t_idx])  # (T,)
        S = self.op("Squeeze", [self.op("Gather", [self.op("Shape", [all_slots]), i1]), i0])
        j = self.op("Unsqueeze", [self.op("Range", [self.const(0), S, self.const(1)]), i0])  # (1, S)
        pos2 = self.op("Unsqueeze", [pos, i1])                                      # (T, 1)
        if attrs.get("causal", 1):
            valid = self.op("LessOrEqual", [j, pos2])
        else:
            valid = self.op("Less", [j, self.op("Unsqueeze", [seq_len, i1])])
        if attrs.get("sliding_window"):
            lo = self.op("Sub", [pos2, self.const(attrs["sliding_window"])])
            valid = self.op("And", [valid, self.op("Greater", [j, lo])])
        bias = self.op("Where", [valid, self.const(0.0, np.float32), self.const(-np.inf, np.float32)])
        bias = self.op("Unsqueeze", [bias, self.const([1, 2])])                     # (T, 1, 1, S)

        def heads(cache_flat: str) -> str:  # (T, S, Hkv*hd) -> (T, H, S, hd), kv head h // G for head h
            x = self.op("Reshape", [self.op("Gather", [cache_flat, tok_slots]), self.const([0, 0, Hkv, 1, hd])])
            x = self.op("Expand", [x, self.const([1, 1, 1, G, 1])])
            return self.op("Transpose", [self.op("Reshape", [x, self.const([0, 0, H, hd])])], perm=[0, 2, 1, 3])

        Kh, Vh = heads(k_flat), heads(v_flat)
        qh = self.op("Reshape", [q, self.const([0, H, 1, hd])])                     # (T, H, 1, hd)
        scores = self.op("Mul", [self.op("MatMul", [qh, self.op("Transpose", [Kh], perm=[0, 1, 3, 2])]),
                                 self.const(attrs["scale"], np.float32)])            # (T, H, 1, S)
        if attrs.get("softcap"):
            scores = self._softcap(scores, attrs["softcap"])
        probs = self.op("Softmax", [self.op("Add", [scores, bias])], axis=-1)
        o = self.op("MatMul", [probs, Vh])                                         # (T, H, 1, hd)
        self.op("Reshape", [o, self.const([0, H * hd])], [node.output[0]])


def lower_to_standard_onnx(m: onnx.ModelProto) -> onnx.ModelProto:
    """The same computation in standard ONNX ops, float32 throughout."""
    low = _Lowerer()
    for node in m.graph.node:
        if node.domain == DOMAIN:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            getattr(low, node.op_type)(node, attrs)
        else:
            low.nodes.append(node)
    inits = [_as_float32(t) for t in m.graph.initializer]

    def f32(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        if vi.type.tensor_type.elem_type in (TensorProto.BFLOAT16, TensorProto.FLOAT16):
            vi = onnx.ValueInfoProto.FromString(vi.SerializeToString())
            vi.type.tensor_type.elem_type = F32
        return vi

    graph = helper.make_graph(low.nodes, m.graph.name + "_lowered", [f32(v) for v in m.graph.input],
                              [f32(v) for v in m.graph.output], inits + low.consts)
    return helper.make_model(graph, producer_name="perfxlm-lowering", ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", ONNX_OPSET)])


def _as_float32(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type == TensorProto.BFLOAT16:
        bits = np.frombuffer(t.raw_data, dtype=np.uint16).astype(np.uint32) << 16
        return numpy_helper.from_array(bits.view(np.float32).reshape(tuple(t.dims)), t.name)
    if t.data_type == TensorProto.FLOAT16:
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
    return t
