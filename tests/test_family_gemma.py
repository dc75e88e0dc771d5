"""Gemma 2 and Gemma 3 (text) against transformers: greedy float32 token ids of tiny
random-weight models built here equal transformers' eager generate, with every Gemma quirk
switched on (soft-capping, a sliding window shorter than the prompts, sandwich and (1 + w)
norms with random weights, query_pre_attn_scalar != head_dim, Gemma 3's 5:1 local/global
pattern with q/k norms, a local RoPE base and linear scaling on the global layers), under
chunked prefill and preemption, and from a GGUF written with llama.cpp's `gguf` writer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perfxlm import LLM, SamplingParams
from perfxlm.models.loader import resolve_model
from tests.conftest import SMALL_KV, assert_no_leaks, copy_gguf_tokenizer

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12",
           ("A much longer prompt that keeps going so that it spans more than one KV block of sixteen tokens, "
            "which exercises the block table on the prefill path too.")]
MAX_TOKENS = 24
WINDOW = 8  # shorter than all but the first prompt, and than every prompt plus its output

COMMON = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=WINDOW, tie_word_embeddings=True)
FAMILIES = {
    # head_dim 32 != hidden / heads; query_pre_attn_scalar != head_dim; caps small enough to bite
    "Gemma2ForCausalLM": ("gemma2", dict(COMMON, num_hidden_layers=4, query_pre_attn_scalar=24,
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # layers 0-4 local (base 10000), layer 5 global (base 1e6, linear x2), then local again
    "Gemma3ForCausalLM": ("gemma3_text", dict(COMMON, num_hidden_layers=7, query_pre_attn_scalar=24,
                                              final_logit_softcapping=4.0, rope_parameters={
                                                  "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 1_000_000.0},
                                                  "sliding_attention": {"rope_type": "default",
                                                                        "rope_theta": 10000.0}})),
}


def build_gemma(path: Path, arch: str, tokenizer, **overrides) -> Path:
    """A seeded random-weight HF Gemma directory with the SmolLM2 tokenizer's vocabulary; norm
    weights random too (HF initialises them to 0, which would hide the (1 + w))."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, kw = FAMILIES[arch]
    kw = dict(kw, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **overrides)
    config = AutoConfig.for_model(model_type, **kw)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 0.3)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(model_dir: Path, tokenizer, prompts: list[str] = PROMPTS,
              max_tokens: int = MAX_TOKENS) -> tuple[list[list[int]], list[float]]:
    """transformers' greedy ids per prompt (eager attention, so soft-capping and the window
    apply) and the sum of their log-probabilities under its raw logits."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    ids_out, logprobs = [], []
    for p in prompts:
        ids = torch.tensor([tokenizer.encode(p)])
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[0, ids.shape[1]:]
        steps = torch.stack(gen.logits)[:, 0].log_softmax(-1)           # (max_tokens, V)
        ids_out.append(new.tolist())
        logprobs.append(float(steps.gather(1, new[:, None]).sum()))
    return ids_out, logprobs


@pytest.fixture(scope="module", params=list(FAMILIES))
def gemma(request, smol_tokenizer, tmp_path_factory):
    path = build_gemma(tmp_path_factory.mktemp(request.param), request.param, smol_tokenizer)
    return path, *hf_greedy(path, smol_tokenizer)


ENGINE_VARIANTS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 5},   # chunks shorter than the window cross it
    "one_seq_at_a_time": {"max_num_seqs": 1},
    "preemption": {"block_size": 16, "max_model_len": 128, "kv_cache_memory_bytes": "8 blocks"},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(gemma, variant):
    path, expected, expected_logprobs = gemma
    config = json.loads((path / "config.json").read_text())
    kw = dict(ENGINE_VARIANTS[variant])
    if kw.get("kv_cache_memory_bytes") == "8 blocks":  # layers * (k, v) * block_size * kv_heads * head_dim * 4 bytes
        kw["kv_cache_memory_bytes"] = 8 * config["num_hidden_layers"] * 2 * 16 * 2 * 32 * 4
    kw.setdefault("kv_cache_memory_bytes", SMALL_KV)
    llm = LLM(str(path), dtype="float32", **kw)
    # every op, GeluMul, Scale, Softcap and the capped, windowed attention included, runs natively
    assert {n.plugin.name for n in llm.llm_engine.runner.executor.runner.nodes} == {"cpu"}
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    # the final soft-cap leaves the argmax alone but not the log-probabilities
    got = [o.outputs[0].cumulative_logprob for o in outputs]
    assert got == pytest.approx(expected_logprobs, abs=2e-3)
    if variant == "preemption":
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_the_quirks_change_transformers_tokens(smol_tokenizer, tmp_path):
    """The parity above means something: without the window or the attention soft-cap,
    transformers itself generates other tokens from the same weights."""
    def tokens(name: str, **changes) -> list[list[int]]:
        path = build_gemma(tmp_path / name, "Gemma2ForCausalLM", smol_tokenizer, **changes)
        return hf_greedy(path, smol_tokenizer, PROMPTS[2:])[0]    # the two prompts longer than the window

    base = tokens("base")
    assert tokens("no_window", sliding_window=4096) != base
    assert tokens("no_cap", attn_logit_softcapping=None) != base


def test_layer_pattern_and_rope_from_the_config(gemma):
    path = gemma[0]
    model = resolve_model(str(path)).meta_model()
    p = model.params
    if p.qk_norm:   # Gemma 3: five local layers to one global
        assert p.sliding_layers == [True] * 5 + [False, True]
        assert (p.rope_local_theta, p.rope_theta, p.rope_scaling["factor"]) == (10000.0, 1e6, 2.0)
        assert p.attn_logit_softcapping is None
    else:           # Gemma 2: every other layer, the first local
        assert p.sliding_layers == [True, False, True, False] and p.rope_local_theta is None
        assert p.attn_logit_softcapping == 5.0
    assert (p.sliding_window, p.query_pre_attn_scalar, p.head_dim) == (WINDOW, 24.0, 32)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_activation": "relu"}, r"hidden_activation 'relu' is not supported for Gemma"),
    ({"rope_parameters": {"rope_type": "fancy", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope_scaling type 'fancy' is not supported"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]},
     r"layer_types .* are not 4 of"),
])
def test_unsupported_gemma_configs_are_refused_by_name(smol_tokenizer, tmp_path, changes, message):
    path = build_gemma(tmp_path / "m", "Gemma2ForCausalLM", smol_tokenizer)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        resolve_model(str(path))


# ---- GGUF -------------------------------------------------------------------------------

GGUF_NAMES = [  # HF name pattern -> llama.cpp tensor name (gguf's MODEL_TENSORS for gemma2 / gemma3)
    ("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
    ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
    ("post_attention_layernorm", "post_attention_norm"), ("input_layernorm", "attn_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
]


def write_gguf(hf_dir: Path, tokenizer_gguf: Path, out: Path) -> Path:
    """The HF model as llama.cpp's convert_hf_to_gguf.py writes it: float32 tensors under
    llama.cpp's names, norm weights with the 1 added, gemma2/gemma3 metadata, and the
    SmolLM2 GGUF's tokenizer fields copied over."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = "gemma3" if cfg["model_type"] == "gemma3_text" else "gemma2"
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_sliding_window(cfg["sliding_window"])
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    else:
        full = cfg["rope_parameters"]["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    copy_gguf_tokenizer(w, tokenizer_gguf)
    for name, t in sorted(load_file(hf_dir / "model.safetensors").items()):
        if name == "lm_head.weight":  # tied: llama.cpp skips it
            continue
        gname = name
        for hf, ll in GGUF_NAMES:
            if hf in name:
                layer = name.split(".")[2] if name.startswith("model.layers.") else None
                gname = f"blk.{layer}.{ll}.weight" if layer is not None else ll
                break
        data = t.float().numpy()
        if name.endswith("norm.weight"):  # convert_hf_to_gguf.py: Gemma norms are stored as 1 + w
            data = data + np.float32(1.0)
        w.add_tensor(gname, np.ascontiguousarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_gguf_round_trip_gives_transformers_tokens(arch, smol_tokenizer, gguf_path, tmp_path):
    # llama.cpp keeps no query_pre_attn_scalar: it scales by head_dim (but for the 27B sizes)
    hf_dir = build_gemma(tmp_path / "hf", arch, smol_tokenizer, query_pre_attn_scalar=32)
    expected, _ = hf_greedy(hf_dir, smol_tokenizer)
    path = write_gguf(hf_dir, gguf_path, tmp_path / f"{arch}.gguf")
    source = resolve_model(str(path))
    assert source.family.__name__ == arch
    want = resolve_model(str(hf_dir)).params()
    got = source.params()
    assert got.norm_eps == pytest.approx(want.norm_eps)  # stored as float32
    assert got == type(want)(**{**want.__dict__, "norm_offset": 0.0, "norm_eps": got.norm_eps})  # norms hold the 1
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    assert_no_leaks(llm)
