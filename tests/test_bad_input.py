"""Bad input fails early with vLLM's error type and message; nothing else is lost."""

import json
import re
import subprocess
import sys

import pytest

from perfxlm import LLM, SamplingParams, TokensPrompt
from perfxlm.exceptions import VLLMValidationError
from tests.conftest import assert_no_leaks

OK = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("prompt, params, message", [
    ("", OK, "The decoder prompt cannot be empty"),
    (TokensPrompt(prompt_token_ids=[]), OK, "The decoder prompt cannot be empty"),
    ([5, 10**6], OK, "Token id 1000000 is out of vocabulary"),
    ([5, -1], OK, "Token id -1 is out of vocabulary"),
    ([7] * 600, OK, "The decoder prompt (length 600) is longer than the maximum model length of 512."),
    ([7] * 512, OK, "The decoder prompt (length 512) plus the number of requested output tokens (at least 1)"),
    ("hi", SamplingParams(logprobs=21), "Requested sample logprobs of 21, which is greater than max allowed: 20"),
    ("hi", SamplingParams(prompt_logprobs=-1), "Requested prompt logprobs of 49152, which is greater than max"),
    ("hi", SamplingParams(stop_token_ids=[10**6]), "token_id(s) [1000000] in stop_token_ids contain out-of-vocab"),
    ("hi", SamplingParams(logit_bias={10**6: 1.0}), "token_id(s) [1000000] in logit_bias contain out-of-vocab"),
    ("hi", SamplingParams(allowed_token_ids=[]), "allowed_token_ids is not None and empty!"),
    ("hi", SamplingParams(seed=2**70), f"seed must be in [-2**63, 2**64 - n] (n=1), got {2**70}."),
    ("hi", SamplingParams(n=2, seed=2**64 - 1), f"seed must be in [-2**63, 2**64 - n] (n=2), got {2**64 - 1}."),
])
def test_rejected_at_add_time(tiny_llm, prompt, params, message):
    with pytest.raises(VLLMValidationError) as exc:
        tiny_llm.generate(["a good prompt", prompt], [OK, params], use_tqdm=False)
    assert str(exc.value).startswith(message)
    assert_no_leaks(tiny_llm)  # the good prompt of the same call was never queued
    out = tiny_llm.generate("a good prompt", OK, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_lora_priority_and_unsupported_features(tiny_llm):
    with pytest.raises(VLLMValidationError, match="but LoRA is not enabled!"):
        tiny_llm.generate("x", OK, lora_request=object(), use_tqdm=False)
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        tiny_llm.generate("x", OK, priority=[1], use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="thinking_token_budget is set but reasoning_config"):
        tiny_llm.generate("x", SamplingParams(thinking_token_budget=5), use_tqdm=False)
    with pytest.raises(ValueError, match="only supported for pooling models"):
        tiny_llm.embed("x")
    assert_no_leaks(tiny_llm)


def test_max_logprobs_engine_argument(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_logprobs=30, kv_cache_memory_bytes=8 << 20)
    out = llm.generate("x", SamplingParams(max_tokens=1, logprobs=30), use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs[0]) in (30, 31)
    uncapped = LLM(str(tiny_llama_dir), dtype="float32", max_logprobs=-1, kv_cache_memory_bytes=8 << 20)
    out = uncapped.generate("x", SamplingParams(max_tokens=1, logprobs=-1), use_tqdm=False)[0]  # -1: no cap
    assert len(out.outputs[0].logprobs[0]) == uncapped.llm_engine.vocab_size


@pytest.mark.parametrize("kwargs, error, message", [
    ({"not_a_vllm_arg": 1}, TypeError, "unexpected keyword argument 'not_a_vllm_arg'"),
    ({"tensor_parallel_size": 2}, NotImplementedError, "tensor_parallel_size=2"),
    ({"enable_lora": True, "max_lora_rank": 12}, ValueError, "max_lora_rank (12) must be one of"),
    ({"quantization": "awq"}, NotImplementedError, "quantization='awq'"),
    ({"quantization": "gguf"}, ValueError, "quantization='gguf' needs a .gguf model file"),
    ({"dtype": "float64"}, ValueError, "Unknown dtype 'float64'"),
    ({"max_model_len": 4096}, ValueError, "User-specified max_model_len (4096) is greater than the derived"),
    ({"kv_cache_memory_bytes": 1 << 12}, ValueError, "KV cache is needed, which is larger than the available"),
    ({"runner": "pooling", "convert": "none"}, ValueError, "This model does not support `--runner pooling`"),
    ({"kv_cache_dtype": "fp8_e5m2"}, NotImplementedError, "kv_cache_dtype='fp8_e5m2' (fp8 KV caches)"),
    ({"kv_cache_dtype": "float64"}, ValueError, "Invalid kv_cache_dtype 'float64'; choose one of"),
])
def test_bad_engine_arguments(tiny_llama_dir, kwargs, error, message):
    kwargs.setdefault("kv_cache_memory_bytes", 8 << 20)
    with pytest.raises(error) as exc:
        LLM(str(tiny_llama_dir), **kwargs)
    assert message in str(exc.value)


def test_accepted_vllm_arguments_without_effect(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", gpu_memory_utilization=0.5, enforce_eager=True,
              swap_space=4, disable_log_stats=True, trust_remote_code=True, kv_cache_memory_bytes=8 << 20)
    assert llm.generate("x", OK, use_tqdm=False)[0].finished


def test_missing_model_says_where_it_looked():
    with pytest.raises(ValueError) as exc:
        LLM("no-such-org/no-such-model")
    text = str(exc.value)
    assert "no-such-org/no-such-model" in text and "Hugging Face cache" in text and "embedded" in text


def test_default_sampling_params_from_generation_config(tiny_llama_dir, tmp_path):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.3, "top_k": 20, "top_p": 0.9, "max_new_tokens": 5, "eos_token_id": [2, 7]}))
    llm = LLM(str(model), dtype="float32", kv_cache_memory_bytes=8 << 20)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.3, 20, 0.9, 5)
    out = llm.generate("defaults apply", use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 5
    plain = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert plain.get_default_sampling_params() == SamplingParams()


SCRIPT = """
from perfxlm import LLM, SamplingParams
llm = LLM({model!r}, dtype="float32", kv_cache_memory_bytes=8 << 20)
out = llm.generate(["Hello", "World"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
print([len(o.outputs[0].token_ids) for o in out])
"""


def test_script_without_main_guard_runs(tiny_llama_dir, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT.format(model=str(tiny_llama_dir)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[3, 3]"


def test_kv_cache_budget_from_environment(tiny_llama_dir, monkeypatch):
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers * (k, v) * block_size * kv heads * head dim * fp32
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0.001")  # GiB
    llm = LLM(str(tiny_llama_dir), dtype="float32")
    assert llm.llm_engine.block_manager.num_blocks == int(0.001 * (1 << 30)) // per_block
    monkeypatch.setenv("PERFXLM_KVCACHE_SPACE", "0.002")   # perfxlm's own name wins
    assert LLM(str(tiny_llama_dir), dtype="float32").llm_engine.block_manager.num_blocks == \
        int(0.002 * (1 << 30)) // per_block


def test_hf_overrides_generation_config_and_reset_prefix_cache(tiny_llama_dir, tmp_path):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    llm = LLM(str(model), dtype="float32", kv_cache_memory_bytes=8 << 20, generation_config="vllm",
              hf_overrides={"max_position_embeddings": 64})
    assert llm.get_default_sampling_params() == SamplingParams()  # "vllm": ignore the model's file
    assert llm.llm_engine.config.max_model_len == 64
    prompt = [5] * 40
    llm.generate(TokensPrompt(prompt_token_ids=prompt), OK, use_tqdm=False)
    assert llm.generate(TokensPrompt(prompt_token_ids=prompt), OK, use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache()
    assert llm.generate(TokensPrompt(prompt_token_ids=prompt), OK, use_tqdm=False)[0].num_cached_tokens == 0


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_thread_count_is_named(monkeypatch, value):
    from hw_plugins.cpu.library import num_threads
    monkeypatch.setenv("PERFXLM_NUM_THREADS", value)
    with pytest.raises(ValueError, match=f"PERFXLM_NUM_THREADS must be a positive integer, got '{value}'"):
        num_threads()


@pytest.mark.parametrize("value,message", [
    ("0-x", "must be 'auto', 'nobind' or a CPU list such as '0-3,8', got '0-x'"),
    ("0|1", "one CPU list per tensor-parallel rank; perfxlm runs a single rank"),
    ("0,99999", "CPU 99999 is not in this process's CPU set"),
    ("0,0", "a CPU is listed twice"),
])
def test_bad_thread_binding_is_named(monkeypatch, value, message):
    from hw_plugins.cpu.library import thread_cpus
    monkeypatch.delenv("PERFXLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", value)  # vLLM's name is honoured, and named back
    with pytest.raises(ValueError, match="VLLM_CPU_OMP_THREADS_BIND.*" + re.escape(message)):
        thread_cpus()
