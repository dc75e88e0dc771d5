"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): greedy float32 tokens equal
transformers' on tiny random-weight models built here (3 layers, GQA, 8 experts of which each
token takes 2, Qwen2-MoE's shared expert and a dense mlp_only layer), through the default cpu
plugin, with chunked prefill and preemption, on steps that leave experts without tokens, and
from a GGUF written as llama.cpp's converter writes one (experts stacked); and models or
checkpoints the families cannot run are refused, naming what is wrong."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from perfxlm import LLM, SamplingParams
from perfxlm.models.loader import resolve_model
from tests.conftest import SMALL_KV, assert_no_leaks, copy_gguf_tokenizer
from tests.test_family_qwen3_phi3 import (ENGINE_VARIANTS, MAX_TOKENS, PROMPTS, greedy,
                                          kv_block_bytes)
from tests.test_family_qwen3_phi3 import no_weight_reads  # noqa: F401 - a fixture the refusal tests use

LAYERS, KV_HEADS, EXPERTS, TOP_K = 3, 2, 8, 2
COMMON = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS,
              max_position_embeddings=512, num_experts_per_tok=TOP_K)
MIXTRAL = dict(COMMON, intermediate_size=32, num_local_experts=EXPERTS)
# a shared expert; layer 1 dense (mlp_only_layers) with its own intermediate_size; top-k not renormalised
QWEN2_MOE = dict(COMMON, intermediate_size=96, num_experts=EXPERTS, moe_intermediate_size=32,
                 shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)
QWEN3_MOE = dict(COMMON, intermediate_size=96, num_experts=EXPERTS, moe_intermediate_size=32, head_dim=32,
                 norm_topk_prob=True, mlp_only_layers=[2])

CASES = {"mixtral": ("mixtral", "MixtralForCausalLM", MIXTRAL),
         "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_MOE),
         "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE)}
GGUF_ARCH = {"MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}


def build(tmp_path: Path, model_type: str, arch: str, tokenizer, **overrides) -> Path:
    """A seeded random-weight HF model directory with the SmolLM2 tokenizer's vocabulary,
    saved by transformers (which writes the experts one tensor each, as published checkpoints do)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(vocab_size=len(tokenizer), rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so that greedy outputs and routing vary by token
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # the experts are (E, N, K) parameters in transformers 5
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def hf_greedy(model_dir: Path, tokenizer) -> tuple[list[list[int]], list[list[list[set[int]]]]]:
    """transformers' greedy tokens per prompt, and the experts each decode step routes to:
    routing[prompt][step][layer] (only the sparse layers)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    calls: list[list[set[int]]] = []

    def record(layer: int):
        def hook(module, args, output):  # the router returns (logits, weights, expert indices (T, k))
            if layer == 0:  # a forward of the model starts
                calls.append([])
            calls[-1].append(set(output[2].flatten().tolist()))
        return hook

    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    handles = [r.register_forward_hook(record(i)) for i, r in enumerate(routers)]
    outs, routing = [], []
    for p in PROMPTS:
        calls.clear()
        ids = torch.tensor([tokenizer.encode(p)])
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, ids.shape[1]:].tolist())
        routing.append(list(calls[1:]))  # calls[0] is the prefill
    for h in handles:
        h.remove()
    return outs, routing


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, smol_tokenizer, tmp_path_factory):
    model_type, arch, overrides = CASES[request.param]
    path = build(tmp_path_factory.mktemp(request.param), model_type, arch, smol_tokenizer, **overrides)
    tokens, routing = hf_greedy(path, smol_tokenizer)
    return path, tokens, routing


def engine(path: Path, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_bytes", SMALL_KV)
    return LLM(str(path), dtype="float32", **kw)


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(tiny, variant):
    path, expected, _ = tiny
    kw = dict(ENGINE_VARIANTS[variant])
    if kw.get("kv_cache_memory_bytes") == "8 blocks":
        kw["kv_cache_memory_bytes"] = 8 * kv_block_bytes(path)
    llm = engine(path, **kw)
    nodes = llm.llm_engine.runner.executor.runner.nodes
    assert "MoE" in {n.op_type for n in nodes}
    assert greedy(llm) == expected
    if variant == "preemption":
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)
    # every node, MoE included, on the native cpu plugin (fails until the cpu plugin has an MoE kernel)
    assert {n.plugin.name for n in nodes} == {"cpu"}


def test_steps_that_leave_experts_idle_match(tiny):
    """A decode step of the 4 prompts routes 4 tokens x top-2 among 8 experts: transformers'
    routing shows such steps leaving experts without a token, which the engine's batched decode
    (the same tokens in one step) runs as they are; and a lone sequence's decode steps (one token:
    6 of 8 experts idle) give transformers' tokens too."""
    path, expected, routing = tiny
    n_sparse = len(routing[0][0])
    idle = [(step, layer) for step in range(MAX_TOKENS - 1) for layer in range(n_sparse)
            if len(set().union(*(r[step][layer] for r in routing))) < EXPERTS]
    assert idle, "every batched decode step used every expert: no step leaves one idle"
    llm = engine(path)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert list(alone[0].outputs[0].token_ids) == expected[0]
    assert greedy(llm) == expected  # the batch whose decode steps leave the experts above idle
    assert_no_leaks(llm)


def test_mixtral_sliding_window_matches_transformers(smol_tokenizer, tmp_path):
    """Mistral's attention window, which Mixtral configs may set: prompts longer than it."""
    path = build(tmp_path, "mixtral", "MixtralForCausalLM", smol_tokenizer, **dict(MIXTRAL, sliding_window=8))
    expected, _ = hf_greedy(path, smol_tokenizer)
    assert resolve_model(str(path)).params().sliding_window == 8
    llm = engine(path)
    assert greedy(llm) == expected
    assert_no_leaks(llm)


# ---- GGUF ---------------------------------------------------------------------------------


def test_gguf_round_trip_gives_the_same_tokens(tiny, gguf_path, tmp_path):
    """The HF model written as llama.cpp's converter would (Mixtral as `llama` with experts and
    its Q/K rows permuted, experts stacked into ffn_*_exps, Qwen2-MoE's shared-expert gate
    squeezed to (D,)), in F32, loads into the same family and gives the same tokens."""
    path, expected, _ = tiny
    out = write_gguf(path, gguf_path, tmp_path / "model.gguf")
    source = resolve_model(str(out))
    hf = resolve_model(str(path))
    assert source.family is hf.family
    got, want = vars(source.params()), vars(hf.params())
    assert got.pop("norm_eps") == pytest.approx(want.pop("norm_eps"))  # a float32 in the GGUF
    assert got == want  # experts, top-k, renormalisation, shared expert, sparse layers
    llm = engine(out)
    assert greedy(llm) == expected
    assert_no_leaks(llm)


@pytest.fixture(scope="module")
def qwen2_moe_dir(smol_tokenizer, tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen2_moe_q8"), "qwen2_moe", "Qwen2MoeForCausalLM", smol_tokenizer,
                 **QWEN2_MOE)


def test_quantised_experts_stay_blocks(qwen2_moe_dir, gguf_path, tmp_path):
    """Q8_0 experts are kept as (E, N, row bytes) blocks, which the graph's MoE nodes read,
    naming their format; the first token equals the model's with the same weights dequantised."""
    out = write_gguf(qwen2_moe_dir, gguf_path, tmp_path / "q8.gguf", experts_q8_0=True)
    source = resolve_model(str(out))
    blocks = source.linear_blocks()
    cfg = json.loads((qwen2_moe_dir / "config.json").read_text())
    d, f = cfg["hidden_size"], cfg["moe_intermediate_size"]
    row = lambda k: k // 32 * 34  # noqa: E731 - Q8_0: 32 weights in 34 bytes
    for layer in source.params().sparse_layers:
        for proj, shape in (("w1", (EXPERTS, f, row(d))), ("w3", (EXPERTS, f, row(d))), ("w2", (EXPERTS, d, row(f)))):
            fmt, b = blocks[f"layers.{layer}.feed_forward.experts.{proj}.weight"]
            assert (fmt, b.shape, b.dtype) == ("q8_0", shape, np.uint8)
    quantised = engine(out, quantization="gguf")
    moe = [n for n in quantised.llm_engine.runner.executor.runner.nodes if n.op_type == "MoE"]
    assert len(moe) == 2 and all(n.attrs.get(k) == "q8_0" for n in moe for k in ("gate_format", "up_format",
                                                                                  "down_format"))
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=1)
    got = quantised.generate(PROMPTS, params, use_tqdm=False)
    assert_no_leaks(quantised)
    dense = engine(out)
    want = dense.generate(PROMPTS, params, use_tqdm=False)
    assert_no_leaks(dense)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=0.05)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: Q/K rows to ggml's interleaved RoPE pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, tokenizer_gguf: Path, out: Path, experts_q8_0: bool = False) -> Path:
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[cfg["architectures"][0]]
    rope = cfg.get("rope_parameters") or {}
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if experts_q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    copy_gguf_tokenizer(w, tokenizer_gguf)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp",
             "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
             "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
    expert_names = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
                    "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
    state = {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, t in state.items():
        base, kind = name.rsplit(".", 1)
        data = t.float().numpy()
        if base.startswith("model.layers."):
            layer, rest = base.removeprefix("model.layers.").split(".", 1)
            if ".experts." in rest:  # the converter stacks a layer's experts: (E, N, K) per projection
                _, index, proj = rest.rsplit(".", 2)
                experts.setdefault(f"blk.{layer}.{expert_names[proj]}.{kind}", {})[int(index)] = data
                continue
            if arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                data = _permute(data, n_heads if rest == "self_attn.q_proj" else n_kv)
            gname = f"blk.{layer}.{names[rest]}.{kind}"
        else:
            gname = f"{names[base]}.{kind}"
        w.add_tensor(gname, data.squeeze() if data.shape[0] == 1 else data)  # the converter squeezes (1, D) to (D,)
    for gname, by_index in sorted(experts.items()):
        stacked = np.stack([by_index[i] for i in range(len(by_index))])
        if experts_q8_0:
            w.add_tensor(gname, gguf.quants.quantize(stacked, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, stacked)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---- refusals -----------------------------------------------------------------------------


def _variant(path: Path, tmp_path: Path, **config_changes) -> Path:
    """A copy of the model directory (weights linked) with config.json changed."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config_changes)
    for f in path.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported for {arch}; supported: \['silu'\]"),
    ({"num_experts_per_tok": 9}, r"{arch}: num_experts_per_tok 9 must be between 1 and the 8 experts"),
])
def test_a_bad_config_value_is_refused_by_name(tiny, tmp_path, no_weight_reads, change, message):
    path, _, _ = tiny
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    with pytest.raises(ValueError, match=message.format(arch=arch)):
        LLM(str(_variant(path, tmp_path, **change)), dtype="float32")


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
def test_qwen_moe_sliding_window_is_refused(qwen2_moe_dir, tmp_path, no_weight_reads, arch):
    shared = {} if arch == "Qwen2MoeForCausalLM" else {"shared_expert_intermediate_size": None}  # Qwen3-MoE has none
    bad = _variant(qwen2_moe_dir, tmp_path, architectures=[arch], use_sliding_window=True, sliding_window=16, **shared)
    with pytest.raises(ValueError, match=f"use_sliding_window=True is not supported for {arch}"):
        LLM(str(bad), dtype="float32")


def _rewrite_weights(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    state = {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(f).items()}
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(edit(state), dst / "model.safetensors")
    return dst


def test_a_checkpoint_missing_an_expert_is_refused(qwen2_moe_dir, tmp_path):
    def drop(state):
        del state["model.layers.2.mlp.experts.3.up_proj.weight"]
        return state
    bad = _rewrite_weights(qwen2_moe_dir, tmp_path / "gap", drop)
    with pytest.raises(ValueError, match=r"lacks expert\(s\) \[3\] of layers\.2\.feed_forward\.experts\.w3\.weight"):
        resolve_model(str(bad)).load_weights(torch.float32)

    def drop_last(state):
        del state["model.layers.0.mlp.experts.7.down_proj.weight"]
        return state
    bad = _rewrite_weights(qwen2_moe_dir, tmp_path / "last", drop_last)
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.experts\.w2\.weight has shape \(7, 64, 32\) "
                                         r"but Qwen2MoeForCausalLM expects \(8, 64, 32\)"):
        resolve_model(str(bad)).load_weights(torch.float32)


def test_an_expert_given_twice_is_refused(qwen2_moe_dir, tmp_path):
    def duplicate(state):
        again = state["model.layers.0.mlp.experts.3.gate_proj.weight"].clone()
        state["model.layers.0.mlp.experts.03.gate_proj.weight"] = again
        return state
    bad = _rewrite_weights(qwen2_moe_dir, tmp_path / "dup", duplicate)
    with pytest.raises(ValueError, match=r"expert 3 of layers\.0\.feed_forward\.experts\.w1\.weight is in the "
                                         r"checkpoint twice"):
        resolve_model(str(bad)).load_weights(torch.float32)
