"""The `cpu` plugin: every op on csrc's native kernels over numpy host buffers.

No torch at run time: buffers are numpy arrays (bfloat16 through ml_dtypes), and each
node is one ctypes call into libperfxlm_kernels.so, which picks AVX-512 / AVX512-BF16 /
AVX2 / RVV / generic kernels from the CPU's features. The `rvv` plugin is the same
library on riscv64 with the RVV 1.0 kernel set required.
"""

import logging
import platform
from typing import Any

import numpy as np

from graph_export import quant
from hw_plugins.base import CompiledStep, HwPlugin, NativeSampler, Node
from hw_plugins.cpu import library
from hw_plugins.cpu.buffers import _ptr, host_zeros
from hw_plugins.cpu.library import ACTIVATIONS, CACHES, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, QUANT_X, activation_code

logger = logging.getLogger(__name__)

_WEIGHT_FORMATS = {"dense": None, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1, "q4_k": Q4_K, "q5_k": Q5_K, "q6_k": Q6_K}


class CpuPlugin(HwPlugin):
    name = "cpu"
    priority = 10  # wins the default choice over the torch reference wherever the library loads
    bf16_weights_f32_activations = True  # the bf16 micro-kernels take fp32 x
    api_version = 1
    isa: str | None = None  # a kernel set this plugin insists on (None: the best the CPU has)

    def __init__(self) -> None:
        self._ops = {"Gather": self._gather, "RMSNorm": self._rmsnorm, "Linear": self._linear, "RoPE": self._rope,
                     "PagedAttention": self._paged_attention, "SiluMul": self._silu_mul, "Add": self._add,
                     "LayerNorm": self._layer_norm, "GeluMul": self._gelu_mul, "Activation": self._activation,
                     "Scale": self._scale, "Softcap": self._softcap, "MoE": self._moe,
                     "LoRA": self._lora}
        self.lib, self._error = None, self._unsupported_here()
        self._packed: dict[tuple, tuple] = {}  # weight(s) -> (weight(s), [format code,] the kernels' copy)
        self.batch_invariant = False
        self.quant_x = QUANT_X["auto"]
        if self._error is None:
            try:
                self.lib = library.load()
                if self.isa is not None and self.lib.pxl_set_isa(self.isa.encode()) != 0:
                    self.lib, self._error = None, f"this CPU or build has no {self.isa} kernels"
            except OSError as e:
                self._error = str(e)

    def _unsupported_here(self) -> str | None:
        """Why this machine cannot run the plugin before the library is even loaded (None: it may)."""
        return None

    def is_available(self) -> bool:
        return self.lib is not None

    def set_batch_invariant(self, on: bool) -> bool:
        """The kernels already reduce in one fixed order whatever the tile shape; the mode only
        sends quantised Linear through the int8 dot products at every T. The library's flag
        is per process, so this plugin (one per engine) sets it before each of its Linears."""
        self.batch_invariant = on
        return True

    def set_quant_activations(self, mode: str) -> bool:
        """int8 or int16 x (two int8 planes) everywhere, or bf16 x on Q8_0/Q4_0/Q4_1 blocks at
        every T (kernel sets with those kernels: AVX512-BF16 and AMX; K-quants then take bf16 x
        in a prefill and int8 x in decode); "int16-decode": int16 x in decode, a prefill as bf16
        panels on those sets.
        Per process in the library, like batch invariance: set before each Linear."""
        if self.lib.pxl_set_quant_x(QUANT_X[mode]) != 0:
            return False
        self.lib.pxl_set_quant_x(QUANT_X["auto"])
        self.quant_x = QUANT_X[mode]
        return True

    def set_numerics(self) -> None:
        """This engine's numeric modes into the library (its flags are per process)."""
        self.lib.pxl_set_batch_invariant(int(self.batch_invariant))
        self.lib.pxl_set_quant_x(self.quant_x)

    def unavailable_reason(self) -> str | None:
        return self._error

    def supports(self, op_type: str, dtypes: tuple[str, ...]) -> bool:
        if op_type not in self._ops or not dtypes or dtypes[0] not in ACTIVATIONS:
            return False
        # weights dense in the activation dtype, bf16 under fp32 activations, or quantised blocks (uint8)
        weights = (dtypes[0], "uint8", *(("bfloat16",) if dtypes[0] == "float32" else ()))
        if op_type == "Linear":
            return dtypes[1] in weights and all(d == dtypes[0] for d in dtypes[2:])
        if op_type == "Gather":
            return dtypes[1] == "int64"
        if op_type == "MoE":  # x, router logits, the three expert weights, the shared expert's output and gate
            return dtypes[1] == dtypes[0] and all(d in weights for d in dtypes[2:5]) \
                and all(d == dtypes[0] for d in dtypes[5:])
        if op_type == "PagedAttention":  # q, k, v in the activation dtype; the caches in it, bf16 or f16
            return dtypes[1:3] == dtypes[:1] * 2 and dtypes[3] == dtypes[4] in (dtypes[0], "bfloat16", "float16") \
                and all(d == "int64" for d in dtypes[5:])
        if op_type == "LoRA":  # x and y in the activation dtype, the adapter slots float32, slot ids int64
            return dtypes[1] == dtypes[0] and dtypes[2:] == ("float32", "float32", "float32", "int64")
        return all(d in (dtypes[0], "int64") for d in dtypes)

    def alloc(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        return host_zeros(shape, _np_dtype(dtype))

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)  # memory-mapped weights stay mapped: no copy

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        # KV caches: 4 KiB pages, since under THP's usual defrag setting each first touch of a huge
        # page zeroes 2 MiB after direct compaction. Committed here, as vLLM's zero-filled cache is:
        # the budget is held from the start (no out-of-memory later, when the cache fills), and a
        # first batch pays no page faults as it writes its keys and values
        buf = host_zeros(shape, dtype, huge_pages=False)
        self.lib.pxl_commit(_ptr(buf), buf.nbytes)
        return buf

    def download(self, buf: np.ndarray) -> np.ndarray:
        return buf.copy()  # planned buffers are reused next step

    def run(self, node: Node, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> None:
        self._ops[node.op_type](node.attrs, inputs, outputs)

    def compile_step(self, nodes: list[Node], buffer: Any, inputs: dict[str, np.ndarray],
                     rows_n: set[str]) -> CompiledStep:
        """The whole node list compiled into one C call per step (hw_plugins/cpu/plan.py)."""
        from hw_plugins.cpu.plan import Plan
        return Plan(self, nodes, buffer, inputs, rows_n)

    def native_sampler(self) -> NativeSampler:
        return self.sample_rows

    def sample_rows(self, logits: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Not a graph op: the engine's sampler hands its unseeded random rows here. logits
        (R, V) float32 rows, u (R,) float32 in [0, 1) -> (R,) int64, each row's token where the
        CDF of softmax(row) passes u (csrc/core/pxl_sample.c), or -1 where the row has no finite
        max (NaN, +inf, every token masked)."""
        if logits.dtype != np.float32 or logits.ndim != 2 or logits.strides[1] != 4:
            raise ValueError(f"sample_rows takes (R, V) float32 rows of unit stride, got {logits.dtype} "
                             f"{logits.shape} strides {logits.strides}")
        u = np.ascontiguousarray(u, np.float32)
        out = np.empty(logits.shape[0], np.int64)
        self.lib.pxl_sample_rows(logits.shape[0], logits.shape[1], _ptr(logits), logits.strides[0] // 4, _ptr(u),
                                 _ptr(out))
        return out

    # ---- ops: (attrs, inputs, outputs) -> None, writing into the preallocated outputs ----

    def _gather(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        table, idx = ins                                        # (V, D), (T,) -> (T, D)
        self.lib.pxl_gather(ACTIVATIONS[table.dtype.name], idx.shape[0], table.shape[1], _ptr(table), _ptr(idx),
                            _ptr(outs[0]))

    def _rmsnorm(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, w = ins                                              # (T, D), (D,) or (group_size,)
        g = attrs.get("group_size") or x.shape[1]               # a group per head: (T * D/g) rows of g
        self.lib.pxl_rmsnorm(ACTIVATIONS[x.dtype.name], x.size // g, g, _ptr(x), _ptr(w), attrs["epsilon"],
                             _ptr(outs[0]))

    def linear_weight(self, attrs: dict, w: np.ndarray, format_attr: str = "weight_format") -> tuple[int, np.ndarray]:
        """(weight format code, the array the kernels read): weights go to the kernel set's
        own layout once, where it has one: dense weights to the AVX512-BF16 / AVX-512F
        micro-kernels' panels, GGUF blocks to 16-row interleaved blocks (AVX-512 int8 GEMV).
        A 3-D weight (E, N, K) holds E experts (MoE), each packed on its own, back to back."""
        key = (_ptr(w), w.shape)
        if key not in self._packed:  # keyed by the weight buffer, which lives as long as the graph
            self._packed[key] = (w, *self._in_layout(attrs.get(format_attr, "dense"), w))
        return self._packed[key][-2:]

    def stacked_weight(self, attrs: dict, ws: list[np.ndarray]) -> tuple[int, np.ndarray]:
        """(weight format code, array) of Linears of one input, their weights stacked ((sum N, K):
        q, k, v) and laid out as linear_weight lays out one, for pxl_linear_parts."""
        key = tuple((_ptr(w), w.shape) for w in ws)
        if key not in self._packed:
            self._packed[key] = (*ws, *self._in_layout(attrs.get("weight_format", "dense"), np.concatenate(ws)))
        return self._packed[key][-2:]

    def _in_layout(self, name: str, w: np.ndarray) -> tuple[int, np.ndarray]:
        fmt = _WEIGHT_FORMATS[name]
        N = w.shape[-2]
        if fmt is None:
            fmt, K = ACTIVATIONS[w.dtype.name], w.shape[-1]
        else:  # quantised rows are ([E,] N, row bytes)
            K = quant.in_features(name, w.shape[-1])
        size = self.lib.pxl_packed_bytes(fmt, N, K)
        if not size:
            return fmt, w
        experts = w.reshape(-1, *w.shape[-2:])
        packed = host_zeros((len(experts) * size,), np.uint8)
        for e, we in enumerate(experts):
            self.lib.pxl_pack_weights(fmt, N, K, _ptr(we), _ptr(packed) + e * size)
        return library.PACKED[fmt], packed

    def moe_weights(self, attrs: dict, ws: list[np.ndarray]) -> tuple[int, list[np.ndarray]]:
        """A MoE node's gate, up and down expert weights as the kernels read them, and their
        formats as pxl_plan_node.wfmt holds them (gate | up << 8 | down << 16)."""
        out = [self.linear_weight(attrs, w, f"{part}_format") for w, part in zip(ws, ("gate", "up", "down"))]
        return out[0][0] | out[1][0] << 8 | out[2][0] << 16, [w for _, w in out]

    def gated_weight(self, gate_attrs: dict, wg: np.ndarray, up_attrs: dict, wu: np.ndarray) \
            -> tuple[int, np.ndarray] | None:
        """(weight format code, array) of a gated MLP's gate and up weights packed together for
        pxl_linear_silu (each panel 16 rows of gate and the same 16 of up), or None where the kernel set does not pack
        them (quantised blocks, other shapes, no packed micro-kernel)."""
        if gate_attrs.get("weight_format", "dense") != "dense" or up_attrs.get("weight_format", "dense") != "dense" \
                or wg.shape != wu.shape or wg.dtype != wu.dtype or wg.dtype.name not in ACTIVATIONS:
            return None
        fmt, (N, K) = ACTIVATIONS[wg.dtype.name], wg.shape
        size = self.lib.pxl_packed_bytes(fmt, N, K)
        if not size:
            return None
        key = (_ptr(wg), _ptr(wu), wg.shape)
        if key not in self._packed:  # kept here: the plan holds only its address
            packed = host_zeros((2 * size,), np.uint8)
            self.lib.pxl_pack_gated(fmt, N, K, _ptr(wg), _ptr(wu), _ptr(packed))
            self._packed[key] = (wg, wu, packed)
        return library.PACKED[fmt], self._packed[key][-1]

    def _linear(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x = ins[0]                                              # (T, K), weights (N, K) or (N, row bytes)
        fmt, w = self.linear_weight(attrs, ins[1])
        bias = _ptr(ins[2]) if len(ins) > 2 else None
        self.set_numerics()
        self.lib.pxl_linear(ACTIVATIONS[x.dtype.name], fmt, x.shape[0], ins[1].shape[0], x.shape[1], _ptr(x), _ptr(w),
                            bias, _ptr(outs[0]))

    def _moe(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, logits = ins[:2]                                     # (T, D), (T, E); experts (E, F, D) x 2, (E, D, F)
        fmts, (wg, wu, wd) = self.moe_weights(attrs, ins[2:5])
        E, F, D = ins[2].shape[0], ins[2].shape[1], x.shape[1]   # (w_gate's rows: F whatever its format)
        shared, gate = (_ptr(ins[5]), _ptr(ins[6])) if len(ins) > 6 else (None, None)
        self.set_numerics()
        self.lib.pxl_moe(ACTIVATIONS[x.dtype.name], fmts & 0xff, fmts >> 8 & 0xff, fmts >> 16, x.shape[0], D, F, E,
                         attrs["top_k"], attrs.get("norm_topk_prob", 0), _ptr(x), _ptr(logits), _ptr(wg), _ptr(wu),
                         _ptr(wd), shared, gate, _ptr(outs[0]))

    def _lora(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, y, a, b, scale, ids = ins                            # (T, K), (T, N), (L, R, K), (L, N, R), (L,), (T,)
        L, R, K = a.shape
        self.lib.pxl_lora(ACTIVATIONS[x.dtype.name], x.shape[0], y.shape[1], K, R, L, _ptr(x), _ptr(y), _ptr(a),
                          _ptr(b), _ptr(scale), _ptr(ids), _ptr(outs[0]))

    def _rope(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, pos, cos, sin = ins                                  # (T, H*hd), (T,), (P, hd) x 2
        hd = attrs["head_dim"]
        self.lib.pxl_rope(ACTIVATIONS[x.dtype.name], x.shape[0], x.shape[1] // hd, hd, _ptr(x), _ptr(pos), _ptr(cos),
                          _ptr(sin), _ptr(outs[0]))

    def _paged_attention(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc = ins
        self.lib.pxl_paged_attention_mask(
            ACTIVATIONS[q.dtype.name], CACHES[k_cache.dtype.name], q.shape[0], seq_lens.shape[0],
            attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"], _ptr(q), _ptr(k), _ptr(v), _ptr(k_cache),
            _ptr(v_cache), k_cache.shape[1], _ptr(slot_mapping), _ptr(block_tables), block_tables.shape[1],
            _ptr(seq_lens), _ptr(query_start_loc),
            attrs["scale"], attrs.get("softcap") or 0.0, attrs.get("sliding_window") or 0, attrs.get("causal", 1),
            _ptr(outs[0]))                                      # outs[1:] alias the caches

    def _silu_mul(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        self.lib.pxl_silu_mul(ACTIVATIONS[ins[0].dtype.name], ins[0].size, _ptr(ins[0]), _ptr(ins[1]), _ptr(outs[0]))

    def _add(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        self.lib.pxl_add(ACTIVATIONS[ins[0].dtype.name], ins[0].size, _ptr(ins[0]), _ptr(ins[1]), _ptr(outs[0]))


    def _layer_norm(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        x, w = ins[0], ins[1]                                   # (T, D), (D,), bias (D,) optional
        self.lib.pxl_layer_norm(ACTIVATIONS[x.dtype.name], x.shape[0], x.shape[1], _ptr(x), _ptr(w),
                                _ptr(ins[2]) if len(ins) > 2 else None, attrs["epsilon"], _ptr(outs[0]))

    def _gelu_mul(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        self.lib.pxl_gelu_mul(ACTIVATIONS[ins[0].dtype.name], ins[0].size, _ptr(ins[0]), _ptr(ins[1]), _ptr(outs[0]))

    def _activation(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        self.lib.pxl_activation(ACTIVATIONS[ins[0].dtype.name], activation_code(attrs), ins[0].size, _ptr(ins[0]),
                                _ptr(outs[0]))

    def _scale(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        self.lib.pxl_scale(ACTIVATIONS[ins[0].dtype.name], ins[0].size, _ptr(ins[0]), attrs["factor"], _ptr(outs[0]))

    def _softcap(self, attrs: dict, ins: list[np.ndarray], outs: list[np.ndarray]) -> None:
        self.lib.pxl_softcap(ACTIVATIONS[ins[0].dtype.name], ins[0].size, _ptr(ins[0]), attrs["cap"], _ptr(outs[0]))


class RvvPlugin(CpuPlugin):
    """The native kernels on riscv64 with the RVV 1.0 set required (VLEN-agnostic)."""
    name = "rvv"
    priority = 11
    isa = "rvv"

    def _unsupported_here(self) -> str | None:
        # checked first: selecting the rvv kernel set must never touch an x86 process's library
        machine = platform.machine()
        return None if machine == "riscv64" else f"needs a riscv64 CPU with the V extension (this is {machine})"


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # imported on demand: the riscv64 sysroot has numpy but not ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
