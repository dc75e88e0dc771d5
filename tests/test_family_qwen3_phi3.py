"""Qwen3 and Phi-3 families: greedy float32 tokens equal transformers' on tiny random-weight
models built here (several layers, GQA, each family's quirks on), through the default cpu
plugin, with chunked prefill and preemption, and from a GGUF written with `gguf`'s writer;
and the RoPE scalings they rely on, checked against transformers' own tables."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from perfxlm import LLM, SamplingParams
from perfxlm.models.layers import RotaryTables, rope_frequencies
from perfxlm.models.loader import ModelSource
from tests.conftest import SMALL_KV, assert_no_leaks, copy_gguf_tokenizer

# every prompt is longer than the Phi-3 configs' 8-token pretraining context, so transformers
# (which picks LongRoPE's table per forward by the sequence length) uses the long table throughout
PROMPTS = ["Hello, my name is Ada and I live in Paris", "The capital of France is a city that many people",
           "1 2 3 4 5 6 7 8 9 10 11 12",
           ("A much longer prompt that keeps going so that it spans more than one KV block of sixteen tokens, "
            "which exercises the block table on the prefill path too.")]
MAX_TOKENS = 20
LAYERS, KV_HEADS = 3, 2

# LongRoPE on a 16-dim head rotating 3/4 of it (Phi-4-mini's partial_rotary_factor): 6 factors each
PHI3_LONGROPE = dict(
    hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.75,
    max_position_embeddings=512, original_max_position_embeddings=8,
    rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                  "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]})
# the short table (max_position_embeddings == original: the context never exceeds pretraining)
PHI3_SHORT = dict(
    hidden_size=64, num_attention_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
    rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.2, 2.4, 3.0, 4.0],
                  "long_factor": [2.0] * 8, "attention_factor": 1.3})
QWEN3 = dict(hidden_size=64, num_attention_heads=4, head_dim=32, tie_word_embeddings=True)  # head_dim != 64/4

CASES = {"phi3_longrope": ("phi3", "Phi3ForCausalLM", PHI3_LONGROPE),
         "phi3_short": ("phi3", "Phi3ForCausalLM", PHI3_SHORT),
         "qwen3": ("qwen3", "Qwen3ForCausalLM", QWEN3)}


def build(tmp_path: Path, model_type: str, arch: str, tokenizer, **overrides) -> Path:
    """A seeded random-weight HF model directory with the SmolLM2 tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(vocab_size=len(tokenizer), intermediate_size=96, num_hidden_layers=LAYERS,
              num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so that greedy outputs vary by prompt
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def hf_greedy(model_dir: Path, tokenizer) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    for p in PROMPTS:
        ids = torch.tensor([tokenizer.encode(p)])
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, smol_tokenizer, tmp_path_factory):
    model_type, arch, overrides = CASES[request.param]
    path = build(tmp_path_factory.mktemp(request.param), model_type, arch, smol_tokenizer, **overrides)
    assert min(len(smol_tokenizer.encode(p)) for p in PROMPTS) > 8
    return path, hf_greedy(path, smol_tokenizer)


def kv_block_bytes(path: Path, block_size: int = 16) -> int:
    """layers * (k, v) * block_size * kv_heads * head_dim * 4 bytes."""
    cfg = json.loads((path / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * block_size * cfg["num_key_value_heads"] * head_dim * 4


ENGINE_VARIANTS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},  # prompts split across many steps
    # 8 blocks of 16 tokens cannot hold the batch: requests are preempted and recomputed
    "preemption": {"block_size": 16, "max_model_len": 128, "kv_cache_memory_bytes": "8 blocks"},
}


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(tiny, variant):
    path, expected = tiny
    kw = dict(ENGINE_VARIANTS[variant])
    if kw.get("kv_cache_memory_bytes") == "8 blocks":
        kw["kv_cache_memory_bytes"] = 8 * kv_block_bytes(path)
    kw.setdefault("kv_cache_memory_bytes", SMALL_KV)
    llm = LLM(str(path), dtype="float32", **kw)
    assert {n.plugin.name for n in llm.llm_engine.runner.executor.runner.nodes} == {"cpu"}
    assert greedy(llm) == expected
    if variant == "preemption":
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_gguf_round_trip_gives_the_same_tokens(tiny, gguf_path, tmp_path):
    """The HF model written as llama.cpp's converter would (its tensor names and metadata keys,
    Phi-3's fused tensors and LongRoPE factor tensors kept), in F32, loads and gives the same tokens."""
    path, expected = tiny
    out = write_gguf(path, gguf_path, tmp_path / "model.gguf")
    llm = LLM(str(out), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    assert greedy(llm) == expected
    assert_no_leaks(llm)


def write_gguf(hf_dir: Path, tokenizer_gguf: Path, out: Path) -> Path:
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"Phi3ForCausalLM": "phi3", "Qwen3ForCausalLM": "qwen3"}[cfg["architectures"][0]]
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:  # convert_hf_to_gguf.py's Phi3MiniModel
        rotary = int(head_dim * rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        original = cfg["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_dimension_count(rotary)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(rope.get("attention_factor") or
                                        (math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    copy_gguf_tokenizer(w, tokenizer_gguf)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name, t in state.items():
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            layer, rest = base.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{names[rest]}.{kind}"
        else:
            gname = f"{names[base]}.{kind}"
        w.add_tensor(gname, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---- RoPE scalings against transformers' own tables ------------------------------------


def hf_rope(rope_parameters: dict, seq_len: int | None = None, **config) -> tuple[torch.Tensor, float]:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=dict(rope_parameters), **config)
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},                    # Qwen
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 1024, "mscale": 0.707,
     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},                                          # DeepSeek
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048, "truncate": False},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 1024},
])
def test_scalings_equal_transformers(scaling):
    params = {**scaling, "rope_theta": 10000.0}
    want, want_factor = hf_rope(params, max_position_embeddings=4096)
    got, factor = rope_frequencies(64, 10000.0, params, 4096)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor)


def test_dynamic_ntk_takes_one_base_for_the_whole_context():
    """vLLM's DynamicNTKScalingRotaryEmbedding: transformers' formula at max_position * factor,
    fixed (transformers re-derives it per forward from the sequence length)."""
    params = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    want, _ = hf_rope(params, seq_len=2048 * 2, max_position_embeddings=2048)
    got, factor = rope_frequencies(64, 10000.0, params, 2048)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert factor == 1.0


def test_longrope_picks_the_table_by_the_context_length():
    short, long = [1.0 + i / 32 for i in range(32)], [2.0 + i for i in range(32)]
    params = {"rope_type": "longrope", "short_factor": short, "long_factor": long, "rope_theta": 10000.0,
              "original_max_position_embeddings": 1024}
    inv_long, mscale = rope_frequencies(64, 10000.0, params, 4096)
    torch.testing.assert_close(inv_long, hf_rope(params, seq_len=4096, max_position_embeddings=4096)[0])
    assert mscale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(1024)))
    inv_short, mscale = rope_frequencies(64, 10000.0, params, 1024)
    torch.testing.assert_close(inv_short, hf_rope(params, seq_len=1024, max_position_embeddings=1024)[0])
    assert mscale == 1.0


def test_partial_rotary_tables_pass_the_unrotated_features():
    t = RotaryTables(16, 10000.0, 32, None, rotary_dim=12)       # 6 rotated pairs, 2 passed, per half
    assert t.cos.shape == (32, 16)
    assert torch.equal(t.cos[:, 6:8], torch.ones(32, 2)) and torch.equal(t.sin[:, 14:16], torch.zeros(32, 2))
    torch.testing.assert_close(t.cos[:, :6], RotaryTables(12, 10000.0, 32, None).cos[:, :6])


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the bad model was refused")
    monkeypatch.setattr(ModelSource, "load_weights", refuse)


def test_an_unknown_rope_type_is_refused_by_name(tiny, tmp_path, no_weight_reads):
    path, _ = tiny
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "fancy", "factor": 2.0}
    for f in path.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"rope_scaling type 'fancy' is not supported for {cfg['architectures'][0]}; "
                                         r"supported: \['default', 'linear', 'llama3', 'yarn', 'longrope'"):
        LLM(str(tmp_path), dtype="float32")
