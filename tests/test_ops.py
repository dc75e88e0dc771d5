"""Op conformance, after llama.cpp's test-backend-ops: every op of the op table, on every
available plugin, per dtype, against the torch reference plugin by normalised error; and
the reference itself against an independent oracle: onnxruntime running the op's
standard-ONNX lowering (graph_export/lowering.py)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from graph_export.lowering import lower_to_standard_onnx
from graph_export.ops import DOMAIN, IR_VERSION, ONNX_OPSET, OPS
from hw_plugins.base import available_plugins, discover_plugins
from hw_plugins.torch_ref import TorchPlugin
from hw_plugins.base import Node
from perfxlm.models.layers import RotaryTables

T, H, HKV, HD, BS, BLOCKS = 7, 4, 2, 8, 4, 8
# max normalised squared error: float32 differs only in summation order; bf16/fp16 round
# every element (unit roundoff 2^-9 / 2^-12, squared, with headroom for accumulation)
NMSE = {"float32": 1e-9, "float16": 1e-5, "bfloat16": 2e-4}
INT8_X_NMSE = 5e-4  # x quantised to int8 per 32-block (see test_quantized_linear_on_every_plugin)


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = a.astype(np.float64), ref.astype(np.float64)
    return float(((a - ref) ** 2).sum() / max((ref ** 2).sum(), 1e-30))


# every op once, and again for each attribute that changes what its kernels do: "Op/variant"
CASES = ["Gather", "RMSNorm", "RMSNorm/group_size", "Linear", "RoPE", "PagedAttention", "PagedAttention/softcap",
         "PagedAttention/bidirectional", "SiluMul", "Add", "LayerNorm", "LayerNorm/no_bias", "GeluMul",
         "Activation/relu", "Activation/gelu", "Activation/gelu_tanh", "Scale", "Softcap", "MoE", "MoE/shared",
         "LoRA"]


def op_of(name: str) -> str:
    return name.split("/")[0]


def case(name: str) -> tuple[dict, list[np.ndarray], list[tuple]]:
    """attrs, float32/int64 inputs, output shapes for one op (or "Op/variant" of CASES)."""
    op, _, variant = name.partition("/")
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    if op == "Gather":
        return {"axis": 0}, [f(50, 16), rng.integers(0, 50, T)], [(T, 16)]
    if name == "RMSNorm":
        return {"epsilon": 1e-5}, [f(T, 32), f(32)], [(T, 32)]
    if name == "RMSNorm/group_size":  # per-head q/k norm: x (T, H*hd), weight (hd,); rows of different scale
        return {"epsilon": 1e-6, "group_size": HD}, [f(T, H * HD) * np.repeat(np.arange(1, H + 1, dtype=np.float32),
                                                                          HD), f(HD)], [(T, H * HD)]
    if op == "Linear":
        return {}, [f(T, 24), f(40, 24), f(40)], [(T, 40)]
    if op == "RoPE":
        tables = RotaryTables(HD, 10000.0, 64, None)
        return {"head_dim": HD}, [f(T, H * HD), rng.integers(0, 64, T), tables.cos.numpy(), tables.sin.numpy()], \
            [(T, H * HD)]
    if op == "PagedAttention" and variant == "bidirectional":
        # an encoder's step (causal 0): two whole prompts of 4 and 3 tokens, every token seeing all of its own
        tables = np.array([[3, 6], [1, 0]], np.int64)
        seq_lens = np.array([4, 3], np.int64)
        slots = [tables[b, p // BS] * BS + p % BS for b in range(2) for p in range(seq_lens[b])]
        attrs = {"num_heads": H, "num_kv_heads": HKV, "head_dim": HD, "scale": HD ** -0.5, "sliding_window": 0,
                 "causal": 0}
        return attrs, [f(T, H * HD), f(T, HKV * HD), f(T, HKV * HD), f(BLOCKS, BS, HKV, HD), f(BLOCKS, BS, HKV, HD),
                       np.array(slots, np.int64), tables, seq_lens, np.array([0, 4, 7], np.int64)], [(T, H * HD)]
    if op == "PagedAttention":
        # sequence 0: 5 cached tokens + a 6-token prefill chunk; sequence 1: 9 cached + 1 decode token
        tables = np.array([[3, 0, 5, 0], [1, 6, 2, 7]], np.int64)
        seq_lens, qlens = np.array([11, 10], np.int64), [6, 1]
        slots = [tables[b, p // BS] * BS + p % BS for b in range(2) for p in range(seq_lens[b] - qlens[b], seq_lens[b])]
        attrs = {"num_heads": H, "num_kv_heads": HKV, "head_dim": HD, "scale": HD ** -0.5, "sliding_window": 0}
        if variant == "softcap":  # a cap near the logits' size (scale 1 makes them ~N(0, hd)), so it bends them
            attrs.update(scale=1.0, softcap=3.0)
        return attrs, [f(T, H * HD), f(T, HKV * HD), f(T, HKV * HD), f(BLOCKS, BS, HKV, HD), f(BLOCKS, BS, HKV, HD),
                       np.array(slots, np.int64), tables, seq_lens, np.array([0, 6, 7], np.int64)], [(T, H * HD)]
    if op == "SiluMul":
        return {}, [f(T, 48), f(T, 48)], [(T, 48)]
    if op == "Add":
        return {}, [f(T, 32), f(T, 32)], [(T, 32)]
    if op == "LayerNorm":  # rows off-centre, so the mean matters
        x, w, b = f(T, 40) + 3.0, f(40), f(40)
        return {"epsilon": 1e-5}, [x, w] if variant == "no_bias" else [x, w, b], [(T, 40)]
    if op == "GeluMul":
        return {}, [f(T, 48) * 2, f(T, 48)], [(T, 48)]
    if op == "Activation":
        return {"kind": variant}, [f(T, 48) * 2], [(T, 48)]
    if op == "Scale":
        return {"factor": 2048 ** 0.5}, [f(T, 32)], [(T, 32)]
    if op == "Softcap":
        return {"cap": 30.0}, [f(T, 64) * 30], [(T, 64)]
    if op == "MoE":
        return moe_case(rng, T, 24, 40, 6, top_k=2, shared=variant == "shared")
    if op == "LoRA":  # 3 slots of rank 4; tokens on slots 2, none, 0, 2, ... (slot 1 unused)
        ids = np.array([2, -1, 0, 2, -1, 0, 2, 2, 0, -1, 2][:T] + [-1] * max(0, T - 11), np.int64)
        return {}, [f(T, 24), f(T, 40), f(3, 4, 24), f(3, 40, 4), np.array([0.5, 2.0, 1.5], np.float32), ids], \
            [(T, 40)]
    raise AssertionError(f"no test case for op {name}: add one with the op")


def keeps_float32(op: str, i: int) -> bool:
    """Input i of op is float32 whatever the activation dtype (LoRA's adapter slots)."""
    specs = OPS[op].inputs
    return i < len(specs) and specs[i].endswith(" float32")


def moe_case(rng, tokens: int, D: int, F: int, E: int, top_k: int, shared: bool):
    """MoE inputs where expert E-1 gets no token (its router logit far below the rest); with
    shared, Qwen2-MoE's shared expert and gate and no renormalisation, else Mixtral's."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    logits = f(tokens, E) * 2
    logits[:, E - 1] = -30.0
    inputs = [f(tokens, D), logits, f(E, F, D) / D ** 0.5, f(E, F, D) / D ** 0.5, f(E, D, F) / F ** 0.5]
    if shared:
        inputs += [f(tokens, D), f(tokens, 1)]
    return {"top_k": top_k, "norm_topk_prob": int(not shared)}, inputs, [(tokens, D)]


def run_on(plugin, op: str, attrs: dict, inputs: list[np.ndarray], out_shapes, dtype: str) -> list[np.ndarray]:
    cast = [x.astype(_np(dtype)) if x.dtype == np.float32 and not keeps_float32(op, i) else x
            for i, x in enumerate(inputs)]
    bufs = [plugin.upload(x) for x in cast]
    outs = [plugin.alloc(s, dtype) for s in out_shapes]
    aliases = OPS[op].aliases
    node = Node(op, op, [f"in{i}" for i in range(len(inputs))], [f"out{i}" for i in range(1 + len(aliases))], attrs)
    plugin.run(node, bufs, outs + [bufs[aliases[o]] for o in sorted(aliases)])
    plugin.synchronize()
    results = [plugin.download(o) for o in outs] + [plugin.download(bufs[aliases[o]]) for o in sorted(aliases)]
    return [r.astype(np.float32) for r in results]


def _np(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def onnxruntime_oracle(op: str, attrs: dict, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort
    spec = OPS[op]
    in_names = [f"in{i}" for i in range(len(inputs))]
    out_names = [f"out{i}" for i in range(1 + len(spec.aliases))]
    node = helper.make_node(op, in_names, out_names, domain=spec.domain, **attrs)
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, elem[x.dtype], x.shape)
                                           for n, x in zip(in_names, inputs)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in out_names])
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                                          helper.make_opsetid(DOMAIN, 1)])
    lowered = lower_to_standard_onnx(model)
    session = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(out_names, dict(zip(in_names, inputs)))


def test_every_op_has_a_case():
    assert {op_of(name) for name in CASES} == set(OPS)


@pytest.mark.parametrize("name", CASES)
def test_reference_plugin_matches_onnxruntime(name):
    op, (attrs, inputs, shapes) = op_of(name), case(name)
    ours = run_on(TorchPlugin(), op, attrs, inputs, shapes, "float32")
    oracle = onnxruntime_oracle(op, attrs, inputs)
    for a, b in zip(ours, oracle):
        assert a.shape == b.shape and nmse(a, b) < NMSE["float32"], (op, nmse(a, b))


PLUGINS = [pytest.param(name, marks=() if ok else pytest.mark.skip(reason=f"{name} unavailable here: {why}"))
           for name, ok, why in available_plugins()]


@pytest.mark.parametrize("dtype", list(NMSE))
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("plugin_name", PLUGINS)
def test_every_op_on_every_plugin(plugin_name, name, dtype):
    plugin = discover_plugins()[plugin_name]()
    op, (attrs, inputs, shapes) = op_of(name), case(name)
    dtypes = tuple(dtype if x.dtype == np.float32 and not keeps_float32(op, i) else x.dtype.name
                   for i, x in enumerate(inputs))
    if not plugin.supports(op, dtypes):
        pytest.skip(f"{plugin_name} does not implement {op}{dtypes} (the engine falls back to torch)")
    got = run_on(plugin, op, attrs, inputs, shapes, dtype)
    # the reference in float32 on the same (rounded) inputs
    rounded = [x.astype(_np(dtype)).astype(np.float32) if x.dtype == np.float32 else x for x in inputs]
    ref = run_on(TorchPlugin(), op, attrs, rounded, shapes, "float32")
    for a, b in zip(got, ref):
        assert nmse(a, b) < NMSE[dtype], (plugin_name, name, dtype, nmse(a, b))


@pytest.mark.parametrize("cache", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["PagedAttention", "PagedAttention/softcap", "PagedAttention/bidirectional"])
@pytest.mark.parametrize("plugin_name", PLUGINS)
def test_attention_on_a_16_bit_cache_under_float32_activations(plugin_name, name, cache):
    """A bf16 model's KV cache under float32 activations (bf16, or f16 with kv_cache_dtype="float16"):
    the step's keys and values are rounded as they are stored, and the attention reads the rounded
    cache, so it equals the float32 reference on rounded k, v and caches (only the summation order
    differs)."""
    import ml_dtypes
    plugin = discover_plugins()[plugin_name]()
    attrs, inputs, shapes = case(name)
    dtypes = ("float32",) * 3 + (cache,) * 2 + ("int64",) * 4
    if not plugin.supports("PagedAttention", dtypes):
        pytest.skip(f"{plugin_name} does not implement PagedAttention{dtypes} (the engine falls back to torch)")
    np_cache = ml_dtypes.bfloat16 if cache == "bfloat16" else np.float16
    mixed = [x.astype(np_cache) if i in (3, 4) else x for i, x in enumerate(inputs)]
    bufs = [plugin.upload(x) for x in mixed]
    out = plugin.alloc(shapes[0], "float32")
    node = Node("PagedAttention", "attn", [f"in{i}" for i in range(9)], ["y", "kc", "vc"], attrs)
    plugin.run(node, bufs, [out, bufs[3], bufs[4]])
    plugin.synchronize()
    got = [plugin.download(b).astype(np.float32) for b in (out, bufs[3], bufs[4])]
    assert plugin.download(bufs[3]).dtype == np_cache  # the cache keeps its dtype
    rounded = [x.astype(np_cache).astype(np.float32) if i in (1, 2, 3, 4) else x for i, x in enumerate(inputs)]
    ref = run_on(TorchPlugin(), "PagedAttention", attrs, rounded, shapes, "float32")
    assert nmse(got[0], ref[0]) < NMSE["float32"], (plugin_name, name, nmse(got[0], ref[0]))
    np.testing.assert_array_equal(got[1], ref[1])  # the stored rows: exactly k, v rounded
    np.testing.assert_array_equal(got[2], ref[2])
    unrounded = run_on(TorchPlugin(), "PagedAttention", attrs, [*rounded[:1], *inputs[1:3], *rounded[3:]], shapes,
                       "float32")[0]
    assert nmse(got[0], unrounded) > 100 * nmse(got[0], ref[0])  # the rounding is what the test sees


def test_every_op_has_a_reference_kernel():
    plugin = TorchPlugin()
    for op in OPS:
        assert plugin.supports(op, ("float32",)), op


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("rows", [1, 2, 7, 70])
@pytest.mark.parametrize("plugin_name", PLUGINS)
def test_quantized_linear_on_every_plugin(plugin_name, fmt, rows, dtype):
    """Linear on GGUF blocks (int8 and 4-bit) vs the reference on the dequantised weights.
    rows covers the int8 dot-product GEMV (1, 2) and the dequantised-panel GEMM (7, 70), or on
    a kernel set that repacks the blocks (AVX-512) the int8 dot products at every T.
    The GEMV quantises x to int8 per 32-block, as llama.cpp does: its error is the rounding
    of x, NMSE ~ (amax/127)^2 / 12 / E[x^2] ~ 2e-5 for Gaussian x (amax ~ 2.5 sigma), times
    how the weights of a block spread; such rows get 5e-4. The fp32 paths keep the dtype's
    tolerance."""
    from graph_export.quant import dequantize, quantize
    plugin = discover_plugins()[plugin_name]()
    if not plugin.supports("Linear", (dtype, "uint8", dtype)):
        pytest.skip(f"{plugin_name} has no quantised Linear in {dtype}")
    rng = np.random.default_rng(1)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(rows, 96), (40, 96), (40,)])
    blocks = quantize(w, fmt)
    got = run_on(plugin, "Linear", {"weight_format": fmt}, [x, blocks, b], [(rows, 40)], dtype)[0]
    rounded = [a.astype(_np(dtype)).astype(np.float32) for a in (x, b)]
    ref = run_on(TorchPlugin(), "Linear", {}, [rounded[0], dequantize(blocks, fmt), rounded[1]], [(rows, 40)],
                 "float32")[0]
    from hw_plugins.cpu import library
    code = {"q8_0": library.Q8_0, "q4_0": library.Q4_0, "q4_1": library.Q4_1}[fmt]
    repacked = getattr(plugin, "lib", None) is not None and plugin.lib.pxl_packed_bytes(code, 40, 96) > 0
    tol = max(NMSE[dtype], INT8_X_NMSE if rows <= 4 or repacked else 0)
    assert nmse(got, ref) < tol, (plugin_name, fmt, rows, dtype, nmse(got, ref))


def _cpu_plugin_or_skip():
    plugin = discover_plugins()["cpu"]()
    if not plugin.is_available():
        pytest.skip(f"cpu unavailable here: {plugin.unavailable_reason()}")
    return plugin


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_new_ops_in_a_compiled_cpu_step(dtype):
    """The newer families' ops as records of a compiled step (hw_plugins/cpu/plan.py) give the
    bits the same ops give node by node: Scale, LayerNorm, Activation, GeluMul, an Add then a
    grouped RMSNorm (not fused: the fused pass normalises whole rows), Softcap as the logits
    (stored as float32, as the lm_head's are), and PagedAttention with softcap."""
    from graph_export.ops import LOGITS
    plugin = _cpu_plugin_or_skip()
    rng = np.random.default_rng(2)
    D = H * HD
    vals = {"x": rng.standard_normal((T, D)), "w": rng.standard_normal(D), "b": rng.standard_normal(D),
            "wg": rng.standard_normal(HD)}
    vals = {k: v.astype(np.float32).astype(_np(dtype)) for k, v in vals.items()}
    nodes = [Node("Scale", "n1", ["x"], ["a"], {"factor": 8.0}),
             Node("LayerNorm", "n2", ["a", "w", "b"], ["ln"], {"epsilon": 1e-5}),
             Node("Activation", "n3", ["ln"], ["act"], {"kind": "gelu"}),
             Node("GeluMul", "n4", ["act", "x"], ["gm"], {}),
             Node("Activation", "n5", ["gm"], ["r"], {"kind": "relu"}),
             Node("Add", "n6", ["r", "x"], ["s"], {}),
             Node("RMSNorm", "n7", ["s", "wg"], ["q"], {"epsilon": 1e-6, "group_size": HD}),
             Node("Softcap", "n8", ["q"], [LOGITS], {"cap": 1.5})]
    by_node = dict(vals)
    for node in nodes:
        by_node[node.outputs[0]] = plugin.alloc((T, D), dtype)
        plugin.run(node, [by_node[n] for n in node.inputs], [by_node[node.outputs[0]]])
    fixed = dict(vals)
    for node in nodes:
        fixed[node.outputs[0]] = plugin.alloc((T, D), dtype)
    step = plugin.compile_step(nodes, fixed.__getitem__, {}, set())
    feeds = {"input_ids": np.zeros(T, np.int64), "logits_indices": np.zeros(T, np.int64),
             "block_tables": np.zeros((1, 1), np.int64)}
    step.run(feeds)
    assert step.logits.dtype == np.float32
    np.testing.assert_array_equal(step.logits[:T], by_node[LOGITS].astype(np.float32))
    np.testing.assert_array_equal(fixed["s"], by_node["s"])

    for variant in ("softcap", "bidirectional"):  # (the plan record carries causal 0 as a flag)
        attrs, inputs, _ = case(f"PagedAttention/{variant}")
        names = [f"in{i}" for i in range(len(inputs))]
        cast = [x.astype(_np(dtype)) if x.dtype == np.float32 else x for x in inputs]
        node = Node("PagedAttention", "attn", names, ["y", "kc_out", "vc_out"], attrs)
        ins = [x.copy() for x in cast]
        ref = plugin.alloc((T, H * HD), dtype)
        plugin.run(node, ins, [ref, ins[3], ins[4]])
        fixed = dict(zip(names, [x.copy() for x in cast]), y=plugin.alloc((T, H * HD), dtype))
        step = plugin.compile_step([node], fixed.__getitem__, {}, set())
        step.run({"input_ids": np.zeros(T, np.int64), "logits_indices": np.zeros(T, np.int64),
                  "block_tables": inputs[6]})
        np.testing.assert_array_equal(fixed["y"], ref, err_msg=variant)


def test_bidirectional_attention_is_dense_attention_per_sequence():
    """PagedAttention with causal 0 (an encoder's) on the reference equals plain softmax(q k^T) v
    over each whole sequence, computed here in numpy from the step's own k and v (no cache)."""
    attrs, inputs, shapes = case("PagedAttention/bidirectional")
    got = run_on(TorchPlugin(), "PagedAttention", attrs, inputs, shapes, "float32")[0]
    q, k, v = (x.reshape(T, -1, HD) for x in inputs[:3])
    qsl, group = inputs[8], H // HKV
    for b in range(len(qsl) - 1):
        rows = slice(qsl[b], qsl[b + 1])
        for h in range(H):
            s = q[rows, h] @ k[rows, h // group].T * attrs["scale"]                    # (n, n)
            p = np.exp(s - s.max(-1, keepdims=True))
            want = (p / p.sum(-1, keepdims=True)) @ v[rows, h // group]
            np.testing.assert_allclose(got[rows].reshape(-1, H, HD)[:, h], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("formats,tokens", [(("q4_k", "q4_k", "q6_k"), 1), (("q4_k", "q4_k", "q6_k"), 9),
                                            (("q8_0", "q8_0", "q4_0"), 3), (("q5_k", "q4_1", "dense"), 70)])
def test_quantized_moe_on_cpu(formats, tokens, dtype):
    """MoE with GGUF-block experts (a Q4_K_M file's Q4_K gate/up and Q6_K down, among others), one
    expert without tokens, vs the reference on the dequantised weights. The experts' Linears
    quantise x to int8 (per 32 or, for K-quants, 256 values) as Linear does, so the error is
    INT8_X_NMSE's; dense experts keep the dtype's tolerance."""
    from graph_export.quant import dequantize, quantize
    from tests.test_kquants import quantize_q45_k, quantize_q6_k  # (gguf's Python side cannot quantise K-quants)
    quantizers = {"q4_k": lambda w: quantize_q45_k(w, 4), "q5_k": lambda w: quantize_q45_k(w, 5), "q6_k": quantize_q6_k}
    plugin = _cpu_plugin_or_skip()
    attrs, inputs, shapes = moe_case(np.random.default_rng(3), tokens, 256, 256, 5, top_k=2, shared=False)
    quantized = list(inputs)
    for i, (fmt, part) in enumerate(zip(formats, ("gate", "up", "down")), start=2):
        if fmt != "dense":
            quantized[i] = quantizers.get(fmt, lambda w: quantize(w, fmt))(inputs[i].reshape(-1, 256)).reshape(5, 256, -1)
            inputs[i] = dequantize(quantized[i].reshape(5 * 256, -1), fmt).reshape(5, 256, 256)
            attrs[f"{part}_format"] = fmt
    got = run_on(plugin, "MoE", attrs, quantized, shapes, dtype)[0]
    rounded = [x.astype(_np(dtype)).astype(np.float32) if i < 2 or formats[i - 2] == "dense" else x
               for i, x in enumerate(inputs)]
    ref = run_on(TorchPlugin(), "MoE", {k: v for k, v in attrs.items() if not k.endswith("_format")}, rounded, shapes,
                 "float32")[0]
    assert nmse(got, ref) < max(NMSE[dtype], INT8_X_NMSE), (formats, tokens, dtype, nmse(got, ref))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_in_a_compiled_cpu_step_and_in_chunks(dtype):
    """A MoE record of a compiled step gives the bits of the node run alone, with a shared expert
    and with more (token, expert) rows than the kernel takes at once (it then runs in chunks),
    which match the reference."""
    plugin = _cpu_plugin_or_skip()
    tokens = 1100  # x top_k 2 = 2200 rows: two chunks of the kernel's 2048
    attrs, inputs, shapes = moe_case(np.random.default_rng(4), tokens, 16, 24, 4, top_k=2, shared=True)
    names = [f"in{i}" for i in range(len(inputs))]
    cast = [x.astype(_np(dtype)) for x in inputs]
    node = Node("MoE", "moe", names, ["y"], attrs)
    alone = plugin.alloc(shapes[0], dtype)
    plugin.run(node, cast, [alone])
    fixed = dict(zip(names, cast), y=plugin.alloc(shapes[0], dtype))
    step = plugin.compile_step([node], fixed.__getitem__, {}, set())
    step.run({"input_ids": np.zeros(tokens, np.int64), "logits_indices": np.zeros(1, np.int64),
              "block_tables": np.zeros((1, 1), np.int64)})
    np.testing.assert_array_equal(fixed["y"], alone)
    rounded = [x.astype(np.float32) for x in cast]
    ref = run_on(TorchPlugin(), "MoE", attrs, rounded, shapes, "float32")[0]
    assert nmse(alone.astype(np.float32), ref) < NMSE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_in_a_compiled_cpu_step(dtype):
    """A LoRA record of a compiled step gives the node's bits, its slot ids staged as a graph
    input, and picks up adapter slots written in place afterwards (as the engine loads adapters)."""
    plugin = _cpu_plugin_or_skip()
    attrs, inputs, shapes = case("LoRA")
    names = ["x", "y", "a", "b", "scale", "lora_ids"]
    cast = [v.astype(_np(dtype)) if i < 2 else v for i, v in enumerate(inputs)]
    node = Node("LoRA", "lora", names, ["out"], attrs)
    fixed = dict(zip(names[:5], [v.copy() for v in cast[:5]]), out=plugin.alloc(shapes[0], dtype))
    staging = {"lora_ids": np.zeros(T + 1, np.int64)}
    step = plugin.compile_step([node], lambda n: staging[n] if n in staging else fixed[n], staging, set())
    feeds = {"lora_ids": cast[5], "input_ids": np.zeros(T, np.int64), "logits_indices": np.zeros(T, np.int64),
             "block_tables": np.zeros((1, 1), np.int64)}
    for scale in (None, np.array([1.0, 1.0, -3.0], np.float32)):
        if scale is not None:
            np.copyto(fixed["scale"], scale)
            cast[4] = scale
        ref = plugin.alloc(shapes[0], dtype)
        plugin.run(node, cast, [ref])
        step.run(feeds)
        np.testing.assert_array_equal(fixed["out"], ref)
    untouched = cast[5] < 0
    np.testing.assert_array_equal(fixed["out"][untouched], cast[1][untouched])


_TILES_AFTER_TORCH = """
import numpy as np, torch, ml_dtypes
from hw_plugins.cpu import library
from perfxlm.bench.gemv import _packed
lib = library.load()
T, N, K = 64, 256, 512
rng = np.random.default_rng(0)
w, code = _packed(lib, library.BF16, rng.standard_normal((N, K)).astype(ml_dtypes.bfloat16), N, K)
x = rng.standard_normal((T, K)).astype(np.float32)
def linear():
    y = np.empty((T, N), np.float32)
    lib.pxl_linear(library.F32, code, T, N, K, x.ctypes.data, w.ctypes.data, None, y.ctypes.data)
    return y
first = linear()
a = torch.randn(512, 512, dtype=torch.bfloat16)
for _ in range(3):
    a @ a  # oneDNN's own tiles, on this thread
assert np.array_equal(linear(), first)
print("same")
"""


def test_amx_tiles_survive_torch_between_calls():
    """Within one call into the library the amx GEMM keeps the tile configuration it loaded;
    between calls, torch's oneDNN may have changed or released the thread's tiles. A Linear
    after a torch bf16 matmul must load them again (a stale one stops on an illegal
    instruction) and give the same bits. In a child process, so a crash is a failure here."""
    import subprocess
    import sys
    from hw_plugins.cpu import library
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    if library.load().pxl_isa() != b"amx":
        pytest.skip("this CPU has no AMX tiles")
    run = subprocess.run([sys.executable, "-c", _TILES_AFTER_TORCH], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "same", run.stderr[-2000:]
