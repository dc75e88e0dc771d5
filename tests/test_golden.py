"""SmolLM2-135M-Instruct greedy outputs against vLLM 0.32's (and transformers') golden files."""

import torch

from perfxlm import LLM, SamplingParams
from tests.conftest import SMALL_KV, assert_no_leaks, golden


def _check_golden(llm: LLM, name: str) -> None:
    ref = golden(name)
    params = SamplingParams(temperature=0.0, max_tokens=ref["max_tokens"])
    outputs = llm.generate([r["prompt"] for r in ref["results"]], params, use_tqdm=False)
    for out, r in zip(outputs, ref["results"]):
        assert out.prompt_token_ids == r["prompt_token_ids"]
        assert list(out.outputs[0].token_ids) == r["token_ids"], r["prompt"]
        assert out.outputs[0].text == r["text"]
        assert out.outputs[0].finish_reason == r["finish_reason"]
    assert_no_leaks(llm)


def _plugins(llm: LLM) -> set[str]:
    return {node.plugin.name for node in llm.llm_engine.runner.executor.runner.nodes}


def test_gguf_float32_equals_vllm_golden(smol_llm):
    """On the default plugin: the native `cpu` kernels wherever they are built."""
    from hw_plugins.base import available_plugins
    if dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        assert _plugins(smol_llm) == {"cpu"}
    _check_golden(smol_llm, "golden_greedy_vllm_float32.json")


def test_torch_reference_plugin_float32_equals_vllm_golden(gguf_path):
    llm = LLM(str(gguf_path), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=1024, hw_plugin="torch")
    assert _plugins(llm) == {"torch"}
    _check_golden(llm, "golden_greedy_vllm_float32.json")


def test_gguf_float32_equals_transformers_golden(smol_llm):
    _check_golden(smol_llm, "golden_greedy_hf_float32.json")


def test_embedded_name_resolves_to_the_gguf(gguf_path):
    from perfxlm.models.loader import resolve_model
    source = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.is_gguf and source.path.name == gguf_path.name


def test_hf_directory_float32_equals_vllm_golden(smol_hf_dir):
    llm = LLM(str(smol_hf_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=1024)
    assert llm.llm_engine.source.is_gguf is False
    _check_golden(llm, "golden_greedy_vllm_float32.json")


def test_bfloat16_stays_close_to_float32(smol_llm, gguf_path):
    """bf16 tokens may differ from fp32 (vLLM's own bf16 output changes with thread count),
    so compare the fp32 greedy path's logprobs under bf16: each token fp32 chose must stay
    within 0.5 nats of bf16's best token over the first 16 steps (typical drift is < 0.1)."""
    ref = golden("golden_greedy_vllm_float32.json")
    bf16 = LLM(str(gguf_path), dtype="bfloat16", kv_cache_memory_bytes=SMALL_KV, max_model_len=1024)
    assert bf16.llm_engine.config.dtype == torch.bfloat16
    for r in ref["results"]:
        ids = r["prompt_token_ids"] + r["token_ids"][:16]
        out = bf16.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1),
                            use_tqdm=False)[0]
        for pos in range(len(r["prompt_token_ids"]), len(ids)):
            entry = out.prompt_logprobs[pos]
            chosen = entry[ids[pos]].logprob
            best = max(lp.logprob for lp in entry.values())
            assert best - chosen < 0.5, (r["prompt"], pos, best, chosen)
