"""GGUF K-quants (Q4_K, Q5_K, Q6_K) kept as blocks and run natively: a tiny random Llama written
as a Q4_K_M-style GGUF (Q4_K with Q6_K for the output and some attn_v / ffn_down, one Q5_K
tensor), loaded with its blocks as stored, gives the greedy tokens of the same file dequantised
to float32.

gguf-py dequantises K-quants but does not quantise them, so the blocks are made here by a
numpy quantiser that follows llama.cpp's layouts (ggml-common.h) with simple min/max scales;
gguf-py's own dequantiser, which the float32 run uses, then checks their format."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perfxlm import LLM, SamplingParams
from tests.conftest import SMALL_KV, assert_no_leaks, bf16_quant_activations, build_tiny_model, copy_gguf_tokenizer

QK_K = 256


def _round(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """(nb,) float -> (nb, 2) uint8, little-endian fp16."""
    return np.ascontiguousarray(v.astype(np.float16)).view(np.uint8).reshape(-1, 2)


def quantize_q45_k(w: np.ndarray, bits: int) -> np.ndarray:
    """float (N, K) -> Q4_K (bits 4) or Q5_K (bits 5) blocks, uint8 (N, K/256 * 144 or 176):
    per 32 an asymmetric scale and min (6 bits each, against the super-block's fp16 d and dmin)."""
    N, K = w.shape
    top = (1 << bits) - 1
    x = w.reshape(-1, 8, 32).astype(np.float32)                       # (blocks, sub-block, 32)
    lo = np.minimum(x.min(-1), 0.0)                                   # w = d sc q - dmin m, m >= 0
    scale = (x.max(-1) - lo) / top
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)    # (blocks,)
    dmin = (-lo.min(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(_round(scale / np.where(d > 0, d, 1)[:, None]), 0, 63)
    m = np.clip(_round(-lo / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(_round((x + (dmin[:, None] * m)[..., None]) / np.where(step > 0, step, 1)), 0, top)
    q = q.reshape(-1, 4, 2, 32)                                       # (blocks, chunk j, half, l)
    qs = (q[:, :, 0] & 15 | (q[:, :, 1] & 15) << 4).reshape(-1, 128)
    scales = np.zeros((len(x), 12), np.int32)
    scales[:, :4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    scales[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    scales[:, 8:] = (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4
    parts = [_fp16_bytes(d), _fp16_bytes(dmin), scales.astype(np.uint8)]
    if bits == 5:  # bit 2j (low half of chunk j) and 2j + 1 (high half) of qh[l]
        hb = (q >> 4).transpose(0, 3, 1, 2).reshape(-1, 32, 8)       # (blocks, l, 2j + half)
        parts.append((hb << np.arange(8)).sum(-1).astype(np.uint8))
    parts.append(qs.astype(np.uint8))
    return np.concatenate(parts, axis=1).reshape(N, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float (N, K) -> Q6_K blocks, uint8 (N, K/256 * 210): per 16 a signed 8-bit scale against
    the super-block's fp16 d, quants -32..31 stored + 32."""
    N, K = w.shape
    x = w.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(x).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(_round(scale / np.where(d > 0, d, 1)[:, None]), -128, 127)
    step = (d[:, None] * sc)[..., None]
    q = (np.clip(_round(x / np.where(step > 0, step, 1)), -32, 31) + 32).reshape(-1, 2, 4, 32)  # (blocks, half, g, l)
    ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], axis=2)
    qh = ((q >> 4) << (2 * np.arange(4))[None, None, :, None]).sum(2)  # (blocks, half, l): bits 2g
    return np.concatenate([ql.reshape(-1, 128).astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8),
                           sc.astype(np.int8).view(np.uint8), _fp16_bytes(d)], axis=1).reshape(N, -1)


HF_TO_GGUF = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
              ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
              ("mlp.down_proj", "ffn_down"), ("post_attention_layernorm", "ffn_norm"),
              ("input_layernorm", "attn_norm")]


def q4_k_m_type(gname: str) -> str:
    """llama.cpp's Q4_K_M choice, scaled down to two layers: Q6_K for the output and layer 0's
    attn_v / ffn_down, Q4_K elsewhere; plus one Q5_K tensor so that format runs end to end."""
    if gname in ("output.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        return "Q6_K"
    return "Q5_K" if gname == "blk.1.attn_k.weight" else "Q4_K"


def write_gguf(hf_dir, out, tokenizer_gguf, type_of=q4_k_m_type) -> dict[str, str]:
    """The HF Llama at hf_dir as a llama GGUF with 2-D weights in the types type_of names (Q/K
    rows permuted as convert_hf_to_gguf.py does); returns each tensor's type."""
    import gguf
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    copy_gguf_tokenizer(w, tokenizer_gguf)
    kinds = {}
    for name, t in sorted(load_file(hf_dir / "model.safetensors").items()):
        gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}.get(name)
        for hf, ll in HF_TO_GGUF:
            if gname is None and hf in name:
                gname = f"blk.{name.split('.')[2]}.{ll}.weight"
        data = t.float().numpy()
        heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}.get(gname.split(".")[-2])
        if heads:  # ggml's interleaved RoPE layout
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(data.shape)
        if data.ndim == 1:
            w.add_tensor(gname, np.ascontiguousarray(data, np.float32))
            continue
        kind = kinds[gname] = type_of(gname)
        if kind == "F16":
            w.add_tensor(gname, np.ascontiguousarray(data, np.float16))
            continue
        if kind in ("Q5_0", "Q5_1", "Q8_0"):  # (gguf-py quantises the 32-blocks itself)
            blocks = gguf.quants.quantize(data, gguf.GGMLQuantizationType[kind])
        else:
            blocks = quantize_q6_k(data) if kind == "Q6_K" else quantize_q45_k(data, 5 if kind == "Q5_K" else 4)
        w.add_tensor(gname, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kinds


@pytest.fixture(scope="module")
def q4_k_m_gguf(smol_tokenizer, gguf_path, tmp_path_factory):
    """A Q4_K_M-style GGUF of a tiny random Llama (K = 256 / 512: whole super-blocks)."""
    hf = build_tiny_model(tmp_path_factory.mktemp("kq_hf"), "LlamaForCausalLM", smol_tokenizer,
                          hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path_factory.mktemp("kq") / "tiny-Q4_K_M.gguf"
    kinds = write_gguf(hf, out, gguf_path)
    assert set(kinds.values()) == {"Q4_K", "Q5_K", "Q6_K"}
    return out


@pytest.mark.parametrize("kind,bits", [("Q4_K", 4), ("Q5_K", 5), ("Q6_K", 6)])
def test_quantiser_writes_llama_cpp_layouts(kind, bits):
    """gguf-py's dequantiser reads the test's blocks back within each format's step."""
    import gguf
    w = np.random.default_rng(0).normal(0, 0.2, (8, 512)).astype(np.float32)
    blocks = quantize_q6_k(w) if bits == 6 else quantize_q45_k(w, bits)
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).reshape(w.shape)
    err = np.abs(back - w).max() / np.abs(w).max()
    assert err < {4: 0.08, 5: 0.04, 6: 0.02}[bits], err


def test_loader_keeps_k_quant_blocks_as_stored(q4_k_m_gguf):
    """Every Linear weight stays the file's bytes: a Q4_K_M model's weight memory is its size."""
    from perfxlm.models.loader import resolve_model
    source = resolve_model(str(q4_k_m_gguf))
    assert source.is_quantized()
    blocks = source.linear_blocks()
    import gguf
    stored = {t.name: t for t in gguf.GGUFReader(str(q4_k_m_gguf)).tensors}
    assert {fmt for fmt, _ in blocks.values()} == {"q4_k", "q5_k", "q6_k"}
    # seven Linears a layer, the output, and the token embedding (which a tied output would read)
    assert len(blocks) == 7 * 2 + 2 == sum(len(t.shape) == 2 for t in stored.values())
    assert sum(b.nbytes for _, b in blocks.values()) == sum(int(t.n_bytes) for t in stored.values()
                                                            if len(t.shape) == 2)
    assert all(b.dtype == np.uint8 for _, b in blocks.values())


PROMPTS = ["The K-quants keep their super-blocks", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


def test_q4_k_m_native_blocks_follow_the_dequantised_run(q4_k_m_gguf):
    """Greedy decoding over 32 steps: K-quant blocks run natively (x quantised per 256 as Q8_K,
    as llama.cpp does) against the same file dequantised to float32 at load.

    Exact equality is not the bar: the tiny random model's next-token distributions are flat
    (top logprob about -2.5 over 49k tokens, several tokens within tenths of a nat), and x's
    8-bit rounding moves its logits by tenths of a nat. The 32-block path llama.cpp's way has
    the same limit: this model written as Q4_0 parts from its float32 run at step 2 on both
    prompts (measured). So the runs must agree token for token until they first part, and
    there the native pick must be a near-tie in the float32 run: among its top 5 and within
    1 nat of its choice. (Measured: one prompt agrees on 31 of 32 tokens, parting at 0.55 nat;
    the other parts at step 1, at a 0.13-nat tie.)"""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5)
    native = LLM(str(q4_k_m_gguf), dtype="float32", quantization="gguf", kv_cache_memory_bytes=SMALL_KV)
    assert {n.plugin.name for n in native.llm_engine.runner.executor.runner.nodes} == {"cpu"}
    got = native.generate(PROMPTS, params, use_tqdm=False)
    assert_no_leaks(native)
    want = LLM(str(q4_k_m_gguf), dtype="float32", kv_cache_memory_bytes=SMALL_KV).generate(PROMPTS, params,
                                                                                           use_tqdm=False)
    for a, b in zip(got, want):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        part = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if part is None:
            continue
        top = b.outputs[0].logprobs[part]  # the float32 run's top 5 where the runs part
        assert ta[part] in top, (part, ta[part], top)
        assert top[tb[part]].logprob - top[ta[part]].logprob < 1.0, (part, top)


@pytest.fixture(scope="module")
def float32_run(q4_k_m_gguf):
    """The file dequantised to float32 at load: greedy tokens and their logprobs."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)
    return LLM(str(q4_k_m_gguf), dtype="float32", kv_cache_memory_bytes=SMALL_KV).generate(PROMPTS, params,
                                                                                          use_tqdm=False)


def logprob_move(llm, want) -> float:
    """mean |logprob change| of the float32 run's tokens, teacher-forced by prompting with them:
    each prompt (prompt and 32 outputs, over 32 tokens) runs as one prefill"""
    moves = []
    for w in want:
        ids = w.prompt_token_ids + list(w.outputs[0].token_ids)
        got = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0].prompt_logprobs
        n = len(w.prompt_token_ids)
        for i, tok in enumerate(w.outputs[0].token_ids):
            moves.append(abs(got[n + i][tok].logprob - w.outputs[0].logprobs[i][tok].logprob))
    return float(np.mean(moves))


def native_llm(path, mode: str, monkeypatch) -> LLM:
    monkeypatch.setenv("PERFXLM_QUANT_ACTIVATIONS", mode)
    llm = LLM(str(path), dtype="float32", quantization="gguf", kv_cache_memory_bytes=SMALL_KV)
    assert llm.llm_engine.config.quant_activations == mode
    return llm


def test_q4_k_m_int16_activations_reach_the_float32_run(q4_k_m_gguf, float32_run, monkeypatch):
    """PERFXLM_QUANT_ACTIVATIONS=int16 takes K-quants' Q8_K x to 16 bits (two int8 planes through
    the same kernels): the native run then gives the dequantised float32 run's tokens, with the
    decoded tokens' logprobs two orders closer than the 8-bit default's. (Measured: mean move
    0.16 nats with int8, 0.0006 with int16.)"""
    int8 = logprob_move(native_llm(q4_k_m_gguf, "int8", monkeypatch), float32_run)
    llm = native_llm(q4_k_m_gguf, "int16", monkeypatch)
    int16 = logprob_move(llm, float32_run)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=0)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in float32_run]
    assert_no_leaks(llm)
    assert int16 < 0.002 and int16 * 20 < int8, (int16, int8)


def test_q4_k_m_bf16_prefill_runs_bf16_panels(q4_k_m_gguf, float32_run, monkeypatch):
    """PERFXLM_QUANT_ACTIVATIONS=bf16: a prefill of 32 tokens or more on Q4_K / Q5_K / Q6_K
    blocks runs them dequantised into bf16 panels against x rounded to bf16 (the path AMX's
    `auto` takes), nearer the float32 run than Q8_K x, though the weights too are rounded to
    bf16 there.
    (Measured: mean move 0.042 nats on the AMX and AVX512-BF16 kernel sets, 0.16 with int8.)"""
    if not bf16_quant_activations():
        pytest.skip("this CPU has no AVX512-BF16 kernels for bf16 activations")
    int8 = logprob_move(native_llm(q4_k_m_gguf, "int8", monkeypatch), float32_run)
    llm = native_llm(q4_k_m_gguf, "bf16", monkeypatch)
    bf16 = logprob_move(llm, float32_run)
    assert_no_leaks(llm)
    assert bf16 * 3 < int8, (bf16, int8)


def test_roofline_places_a_k_quant_prefill_by_its_formats(q4_k_m_gguf, smol_tokenizer, gguf_path, tmp_path,
                                                          monkeypatch):
    """`perfxlm bench` puts a prefill on K-quant blocks under the bf16 peak where it runs as bf16
    panels (here PERFXLM_QUANT_ACTIVATIONS=bf16), as it does one with a Q5_1 tensor (its Q4_1
    and Q4_0 parts take panels too), and a file with an F16 Linear, which no panel takes (it
    loads as float32), under int8's."""
    from perfxlm.bench import roofline
    hf = build_tiny_model(tmp_path / "hf", "LlamaForCausalLM", smol_tokenizer, hidden_size=256,
                          intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    files = {}
    for kind in ("Q5_1", "F16"):
        files[kind] = tmp_path / f"tiny-{kind}.gguf"
        kinds = write_gguf(hf, files[kind], gguf_path, lambda g: kind if g == "blk.0.attn_k.weight" else "Q4_K")
        assert set(kinds.values()) == {"Q4_K", kind}
    monkeypatch.setenv("PERFXLM_QUANT_ACTIVATIONS", "bf16")
    roofs = roofline.Roofs(read_GBs=30.0, fp32_GFLOPs=400.0, bf16_GFLOPs=6000.0, int8_GOPs=1500.0)
    for path, peak in ((q4_k_m_gguf, "bf16 peak"), (files["Q5_1"], "bf16 peak"), (files["F16"], "int8 peak")):
        cost = roofline.model_cost(str(path))
        assert cost.panel_quants == (peak == "bf16 peak")
        assert roofline.compute_usage(roofs, "gguf", 1e9, 600.0, cost).roof_name == peak, path


def fallback_gguf(smol_tokenizer, gguf_path, tmp_path, kind: str):
    """A tiny random Llama's GGUF with `kind` where llama.cpp's K-quant mixes fall back (every
    Linear but ffn_down, which is Q4_K): (its path, its tensors by GGUF name, its ModelSource)."""
    import gguf
    from perfxlm.models.loader import resolve_model
    hf = build_tiny_model(tmp_path / "hf", "LlamaForCausalLM", smol_tokenizer, hidden_size=256,
                          intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / f"tiny-{kind}.gguf"
    kinds = write_gguf(hf, path, gguf_path, lambda g: "Q4_K" if "ffn_down" in g else kind)
    assert set(kinds.values()) == {"Q4_K", kind}
    return path, {t.name: t for t in gguf.GGUFReader(str(path)).tensors}, resolve_model(str(path))


def assert_int16_matches_float32(path, monkeypatch) -> None:
    """The native run with 16-bit x gives the float32 dequantisation's greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    want = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV).generate(PROMPTS, params, use_tqdm=False)
    llm = native_llm(path, "int16", monkeypatch)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]
    assert_no_leaks(llm)


def test_q5_0_tensors_run_as_the_q8_0_blocks_of_the_same_values(smol_tokenizer, gguf_path, tmp_path, monkeypatch):
    """llama.cpp's Q4_K_M writes Q5_0 where a tensor's rows are not whole 256-blocks (most of a
    narrow model's). The loader rewrites those blocks as Q8_0 of the same values (the same d,
    the same integers), so they run on the native kernels at 34 bytes a block, not as float32:
    the blocks dequantise to llama.cpp's values bit for bit, and with 16-bit x the native run
    gives the float32 run's greedy tokens."""
    import gguf
    from graph_export.quant import dequantize, transcode
    path, stored, source = fallback_gguf(smol_tokenizer, gguf_path, tmp_path, "Q5_0")
    blocks = source.linear_blocks()
    assert {fmt for fmt, _ in blocks.values()} == {"q8_0", "q4_k"}
    assert sum(b.nbytes for fmt, b in blocks.values() if fmt == "q8_0") == \
        sum(int(t.n_bytes) // 22 * 34 for t in stored.values() if t.tensor_type.name == "Q5_0")
    for t in stored.values():
        if t.tensor_type.name == "Q5_0":
            fmt, q8 = transcode(np.asarray(t.data), "Q5_0")
            want = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q5_0)
            assert np.array_equal(dequantize(q8, fmt), want), t.name
    # bench's roofline counts what a decode step reads: the blocks as loaded (the embedding's
    # rows are gathered, not read whole, unless it is the tied output)
    from perfxlm.bench import roofline
    embedding = next(b.nbytes for name, (_, b) in blocks.items() if "embed" in name)
    assert roofline.model_cost(str(path)).quant_bytes == sum(b.nbytes for _, b in blocks.values()) - embedding * (
        "output.weight" in stored)
    with pytest.raises(ValueError, match="a Q5_0 row of 23 bytes is not whole 22-byte blocks"):
        transcode(np.zeros((2, 23), np.uint8), "Q5_0")
    with pytest.raises(ValueError, match="no exact transcoding for GGML type 'Q5_1'"):
        transcode(np.zeros((2, 24), np.uint8), "Q5_1")
    assert_int16_matches_float32(path, monkeypatch)


def test_q5_1_tensors_run_as_q4_1_plus_q4_0_blocks(smol_tokenizer, gguf_path, tmp_path, monkeypatch):
    """llama.cpp's Q5_K_M writes Q5_1 where a tensor's rows are not whole 256-blocks (SmolLM2's
    576-wide ones). No native format holds a 5-bit quant with a min, but two hold it as a sum:
    the loader splits each Q5_1 weight into Q4_1 blocks (its d, m and low four bits) and Q4_0
    blocks (16 d and the fifth bit), and the graph runs the two Linears on the same x and adds
    them: 38 bytes a block for 24, where float32 took 128. The parts carry the stored integers
    and scales, so their values add up to llama.cpp's (up to float32 rounding of the sum), and
    with 16-bit x the native run gives the float32 run's greedy tokens."""
    import gguf
    import onnx
    from graph_export.quant import ADDEND, dequantize, split
    from perfxlm.models.graph_cache import cached_graph
    path, stored, source = fallback_gguf(smol_tokenizer, gguf_path, tmp_path, "Q5_1")
    blocks = source.linear_blocks()
    assert {fmt for fmt, _ in blocks.values()} == {"q4_1", "q4_0", "q4_k"}
    addends = [name for name in blocks if name.endswith(ADDEND)]
    assert len(addends) == sum(t.tensor_type.name == "Q5_1" for t in stored.values())
    assert all(blocks[n][0] == "q4_0" and blocks[n.removesuffix(ADDEND)][0] == "q4_1" for n in addends)
    assert sum(b.nbytes for fmt, b in blocks.values() if fmt in ("q4_1", "q4_0")) == \
        sum(int(t.n_bytes) // 24 * 38 for t in stored.values() if t.tensor_type.name == "Q5_1")
    for t in stored.values():
        if t.tensor_type.name == "Q5_1":
            (f1, low), (f2, high) = split(np.asarray(t.data), "Q5_1")
            q5 = np.asarray(t.data).reshape(-1, 24)
            assert np.array_equal(low.reshape(-1, 20)[:, :4], q5[:, :4])  # d and m as stored
            want = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q5_1)
            got = dequantize(low, f1) + dequantize(high, f2)
            np.testing.assert_allclose(got, want, rtol=0, atol=float(np.abs(want).max()) * 2.0 ** -22, err_msg=t.name)
    with pytest.raises(ValueError, match="a Q5_1 row of 25 bytes is not whole 24-byte blocks"):
        split(np.zeros((2, 25), np.uint8), "Q5_1")
    # the graph: each split weight a Linear reads is a second Linear on the same x, and an Add
    # (the untied token embedding is only gathered, from its float32 rows)
    read = [n for n in addends if not (n.startswith("tok_embeddings.") and "output.weight" in stored)]
    graph = onnx.load(str(cached_graph(source, torch.float32, "gguf")), load_external_data=False).graph
    linears = [n for n in graph.node if n.op_type == "Linear"]
    formats = [next(a.s.decode() for a in n.attribute if a.name == "weight_format") for n in linears]
    assert formats.count("q4_0") == len(read) == formats.count("q4_1")
    assert len(linears) == 2 * len(read) + formats.count("q4_k")
    adds = {n.output[0]: n.input for n in graph.node if n.op_type == "Add"}
    sums = [ins for ins in adds.values() if set(ins) <= {n.output[0] for n in linears}]
    assert len(sums) == len(read)
    from perfxlm.bench import roofline
    embedding = sum(b.nbytes for name, (_, b) in blocks.items() if "embed" in name)  # both parts
    assert roofline.model_cost(str(path)).quant_bytes == sum(b.nbytes for _, b in blocks.values()) - embedding * (
        "output.weight" in stored)
    assert_int16_matches_float32(path, monkeypatch)
