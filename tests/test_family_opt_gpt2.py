"""OPT and GPT-2: greedy float32 tokens of tiny random-weight models equal transformers', token for
token, on the default cpu plugin, under batching, chunked prefill and preemption; GPT-2 also from a
GGUF written the way llama.cpp's converter writes one; configs the families cannot run refused by name."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from perfxlm import LLM, SamplingParams
from perfxlm.models import registry
from perfxlm.models.gpt2 import GPT2LMHeadModel
from perfxlm.models.loader import resolve_model
from perfxlm.models.opt import OPTForCausalLM
from perfxlm.models.registry import ModelRegistry
from tests.conftest import SMALL_KV, assert_no_leaks
from tests.test_transformers_parity import MAX_TOKENS, PROMPTS, hf_greedy

logger = logging.getLogger(__name__)
LAYERS, HIDDEN, HEADS = 3, 64, 4

CONFIGS = {
    # opt-125m's shape, scaled down: pre-norm, ReLU, tied head; head_dim 16 (a power-of-two scale)
    "opt": ("OPTForCausalLM", "opt", dict(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS, max_position_embeddings=256)),
    # opt-350m's quirks: post-norm, no final norm, a narrower word embedding (project_in/out);
    # head_dim 32 (a scale HF applies to q that is not a power of two: the Scale op)
    "opt_350m_like": ("OPTForCausalLM", "opt", dict(hidden_size=HIDDEN, ffn_dim=128, num_hidden_layers=LAYERS,
                                                    num_attention_heads=2, max_position_embeddings=256,
                                                    do_layer_norm_before=False, word_embed_proj_dim=32)),
    "gpt2": ("GPT2LMHeadModel", "gpt2", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                                             n_inner=160, activation_function="gelu_new")),
}


@pytest.fixture(autouse=True)
def families(monkeypatch):
    """OPT and GPT-2 registered for this module's tests, whether or not the registry lists them."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    ModelRegistry.register_model("OPTForCausalLM", OPTForCausalLM)
    ModelRegistry.register_model("GPT2LMHeadModel", GPT2LMHeadModel)


def build_tiny(path: Path, name: str, tokenizer) -> Path:
    """A seeded random-weight HF model of CONFIGS[name] with the SmolLM2 tokenizer: every weight,
    bias and LayerNorm scale random, so that a misplaced bias or norm changes the tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM
    arch, model_type, kw = CONFIGS[name]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **kw)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # post-norm stacks of large random weights collapse to one token whatever the prompt: smaller
    # projections, and wide embeddings, keep opt-350m-like outputs varied
    weight_std, embedding_std, bias_std = (0.05, 1.0, 0.1) if name == "opt_350m_like" else (0.2, 0.2, 0.5)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, embedding_std if "embed" in pname else weight_std)
            elif pname.endswith("bias"):
                p.normal_(0, bias_std)
            else:  # LayerNorm scales
                p.normal_(1, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, smol_tokenizer, tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp(request.param), request.param, smol_tokenizer)
    return request.param, path, hf_greedy(path, smol_tokenizer, PROMPTS, MAX_TOKENS)


def kv_block_bytes(config: dict) -> int:
    """One KV block of 16 slots over every layer, K and V, float32."""
    layers = config.get("num_hidden_layers") or config["n_layer"]
    hidden = config.get("hidden_size") or config["n_embd"]
    return layers * 2 * 16 * hidden * 4


def check_on_cpu_plugin(llm: LLM) -> None:
    """Where the cpu plugin is available (a library built for this checkout) the graph runs on it:
    every node once it has the LayerNorm and Activation kernels, else all but those (on torch)."""
    from hw_plugins.cpu.plugin import CpuPlugin
    cpu = CpuPlugin()
    if not cpu.is_available():
        logger.warning("cpu plugin unavailable (%s): checking the graph on the torch plugin only",
                       cpu.unavailable_reason())
        return
    new_ops = {op for op in ("LayerNorm", "Activation") if not cpu.supports(op, ("float32",) * 3)}
    placed = {(n.op_type, n.plugin.name) for n in llm.llm_engine.runner.executor.runner.nodes}
    assert {op for op, plugin in placed if plugin != "cpu"} <= new_ops, placed


ENGINE_VARIANTS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},  # prompts split across many steps
    # 8 blocks of 16 tokens cannot hold the batch: requests are preempted and recomputed
    "preemption": {"block_size": 16, "max_model_len": 128, "kv_cache_memory_bytes": "8 blocks"},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(tiny, variant):
    name, path, expected = tiny
    kw = dict(ENGINE_VARIANTS[variant])
    if kw.get("kv_cache_memory_bytes") == "8 blocks":
        kw["kv_cache_memory_bytes"] = 8 * kv_block_bytes(json.loads((path / "config.json").read_text()))
    kw.setdefault("kv_cache_memory_bytes", SMALL_KV)
    kw.setdefault("max_model_len", 256)  # the position table's length (GPT-2's config names it n_positions)
    llm = LLM(str(path), dtype="float32", **kw)
    check_on_cpu_plugin(llm)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    assert got == expected
    assert len({tuple(t) for t in got}) == len(PROMPTS)  # the prompts lead somewhere different
    if variant == "preemption":
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_graph_op_types(tiny):
    """The ops each family's graph needs; the checkpoint layout (Conv1D, fused c_attn, the position
    table's offset rows) is gone after load."""
    from graph_export.export import export_model, op_histogram
    name, path, _ = tiny
    model = resolve_model(str(path)).load_weights(torch.float32)
    hist = op_histogram(export_model(model))
    attention_scale = {"Scale": LAYERS} if name == "opt_350m_like" else {}
    projections = 2 if name == "opt_350m_like" else 0  # project_in, project_out
    norms = 2 * LAYERS + (0 if name == "opt_350m_like" else 1)
    assert hist == {"Linear": 6 * LAYERS + 1 + projections, "LayerNorm": norms, "Add": 2 * LAYERS + 1,
                    "PagedAttention": LAYERS, "Activation": LAYERS, "Gather": 3, **attention_scale}
    table = model.wpe.weight if name == "gpt2" else model.embed_positions.weight
    assert table.shape == (256, HIDDEN)
    assert not [n for n, _ in model.named_parameters() if "c_attn" in n or "c_fc" in n]


def write_gpt2_gguf(hf_dir: Path, gguf_src: Path, out: Path) -> Path:
    """The tiny GPT-2 as llama.cpp's convert_hf_to_gguf.py writes it (gpt2.* metadata, Conv1D
    weights transposed to (out, in), the tied head written as `output`), F32, with the
    SmolLM2 GGUF's byte-level BPE vocabulary."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "gpt2")
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(cfg["n_inner"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    src = gguf.GGUFReader(str(gguf_src))

    def field(key: str):
        return src.fields[key].contents()

    w.add_tokenizer_model(field("tokenizer.ggml.model"))
    w.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    w.add_token_list(field("tokenizer.ggml.tokens"))
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    names = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "ln_1": "attn_norm",
             "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for key, t in state.items():
        key = key.removeprefix("transformer.")
        parts = key.split(".")
        layer = f"blk.{parts[1]}." if parts[0] == "h" else ""
        module = ".".join(parts[2:-1] if layer else parts[:-1])
        data = t.numpy()
        if module.startswith(("attn.", "mlp.")) and parts[-1] == "weight":
            data = data.T  # Conv1D (in, out) -> (out, in)
        w.add_tensor(f"{layer}{names[module]}.{parts[-1]}", np.ascontiguousarray(data, np.float32))
        if key == "wte.weight":
            w.add_tensor("output.weight", np.ascontiguousarray(data, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gpt2_gguf_round_trip(smol_tokenizer, gguf_path, tmp_path):
    hf_dir = build_tiny(tmp_path / "hf", "gpt2", smol_tokenizer)
    expected = hf_greedy(hf_dir, smol_tokenizer, PROMPTS, MAX_TOKENS)
    path = write_gpt2_gguf(hf_dir, gguf_path, tmp_path / "tiny-gpt2-f32.gguf")
    source = resolve_model(str(path))
    assert source.family is GPT2LMHeadModel and source.hf_config["n_inner"] == 160
    for kw in ({}, {"max_num_batched_tokens": 7}):
        llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV, **kw)
        assert llm.llm_engine.model_config.max_model_len == 256
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                               use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
        assert_no_leaks(llm)


@pytest.mark.parametrize("name, change, message", [
    ("opt", {"activation_function": "swish"}, r"activation_function 'swish' is not supported for OPTForCausalLM"),
    ("opt", {"layer_norm_elementwise_affine": False}, r"layer_norm_elementwise_affine=False is not supported"),
    ("opt", {"ffn_dim": None}, r"the config has no 'ffn_dim', which OPTForCausalLM needs"),
    ("gpt2", {"add_cross_attention": True}, r"add_cross_attention=True .* is not supported for GPT2LMHeadModel"),
    ("gpt2", {"n_embd": None}, r"the config has no 'n_embd', which GPT2LMHeadModel needs"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, name, change, message):
    arch, model_type, kw = CONFIGS[name]
    config = {"architectures": [arch], "model_type": model_type, "vocab_size": 100, **kw}
    for key, value in change.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        resolve_model(str(tmp_path))


def test_gpt2_checkpoint_with_mask_buffers_loads(smol_tokenizer, tmp_path):
    """openai-community/gpt2's checkpoint carries each layer's causal-mask buffers (attn.bias,
    attn.masked_bias) under names without 'transformer.': they are skipped, not refused."""
    from safetensors.torch import load_file, save_file
    path = build_tiny(tmp_path / "gpt2", "gpt2", smol_tokenizer)
    want = LLM(str(path), dtype="float32", max_model_len=256).generate(
        PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids
    (file,) = path.glob("*.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    layers = {int(k.split(".")[1]) for k in state if k.startswith("h.")}
    for i in layers:
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, file)
    got = LLM(str(path), dtype="float32", max_model_len=256).generate(
        PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids
    assert got == want
