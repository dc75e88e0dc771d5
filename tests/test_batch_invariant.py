"""Batch-invariant mode (PERFXLM_BATCH_INVARIANT=1, or vLLM's VLLM_BATCH_INVARIANT=1): a
prompt's tokens and logprobs are bitwise the same alone or inside a batch of 32."""

import random

import pytest

from perfxlm import LLM, SamplingParams
from tests.conftest import SMALL_KV, repacks_gguf_blocks

TARGET = "The capital of France is"


def _batch(llm: LLM, n: int, seed: int = 0) -> list[dict]:
    """n - 1 random prompts of 5 to 60 tokens around TARGET (the 10th), in token ids."""
    rng = random.Random(seed)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(rng.randrange(5, 60))]}
               for _ in range(n - 1)]
    prompts.insert(9, {"prompt_token_ids": tok.encode(TARGET)})
    return prompts


def _signature(out) -> tuple:
    """Everything a logprob-sensitive user reads: tokens, sampled and prompt logprobs, exactly."""
    comp = out.outputs[0]
    sampled = [sorted((t, lp.logprob) for t, lp in step.items()) for step in comp.logprobs]
    prompt = [None if step is None else sorted((t, lp.logprob) for t, lp in step.items())
              for step in out.prompt_logprobs]
    return tuple(comp.token_ids), sampled, prompt


def _alone_and_batched(llm: LLM, params: SamplingParams) -> tuple[tuple, tuple]:
    batch = _batch(llm, 32)
    alone = llm.generate(batch[9], params, use_tqdm=False)[0]
    together = llm.generate(batch, params, use_tqdm=False)[9]
    return _signature(alone), _signature(together)


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5, prompt_logprobs=5, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, logprobs=5, prompt_logprobs=5,
                        ignore_eos=True)


@pytest.mark.parametrize("dtype,quantization", [("auto", None), ("float32", None)],
                         ids=["bf16-gguf-blocks", "float32"])
def test_alone_equals_batch_of_32(gguf_path, monkeypatch, dtype, quantization):
    """dtype auto on the Q4_1 GGUF: bf16 activations on the GGUF blocks; float32: dense."""
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "1")
    llm = LLM(str(gguf_path), dtype=dtype, quantization=quantization, kv_cache_memory_bytes=SMALL_KV,
              max_model_len=1024, enable_prefix_caching=False)
    assert llm.llm_engine.config.batch_invariant
    for params in (GREEDY, SEEDED):
        alone, together = _alone_and_batched(llm, params)
        assert alone == together, params


def test_repacked_blocks_are_invariant_without_the_mode(gguf_path, monkeypatch):
    """Where the kernel set repacks the GGUF blocks 16 rows at a time (AVX-512), quantised Linear
    on int8 x (the default without AMX; PERFXLM_QUANT_ACTIVATIONS=int8, which AMX prefill
    would otherwise leave for bf16 tiles) runs the same dot products at every T: invariant even
    without the mode."""
    if not repacks_gguf_blocks():
        pytest.skip("this CPU's kernel set keeps GGUF's block layout")
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "0")
    monkeypatch.setenv("PERFXLM_QUANT_ACTIVATIONS", "int8")
    llm = LLM(str(gguf_path), kv_cache_memory_bytes=SMALL_KV, max_model_len=1024, enable_prefix_caching=False)
    assert not llm.llm_engine.config.batch_invariant
    for params in (GREEDY, SEEDED):
        alone, together = _alone_and_batched(llm, params)
        assert alone == together, params


def test_each_engine_keeps_its_own_mode(gguf_path, monkeypatch, gguf_layout_kernels):
    """The library's flag is per process: an engine started later without the mode must not
    take it away from one started with it."""
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "1")
    invariant = LLM(str(gguf_path), kv_cache_memory_bytes=SMALL_KV, max_model_len=1024, enable_prefix_caching=False)
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "0")
    other = LLM(str(gguf_path), kv_cache_memory_bytes=SMALL_KV, max_model_len=1024, enable_prefix_caching=False)
    alone, together = _alone_and_batched(other, GREEDY)
    assert alone[1] != together[1]  # the later engine runs without the mode
    alone, together = _alone_and_batched(invariant, GREEDY)
    assert alone == together


def test_vllm_variable_is_honoured_and_validated(gguf_path, monkeypatch):
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    llm = LLM(str(gguf_path), kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
    assert llm.llm_engine.config.batch_invariant
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "yes")
    with pytest.raises(ValueError, match="PERFXLM_BATCH_INVARIANT must be 0 or 1, got 'yes'"):
        LLM(str(gguf_path), kv_cache_memory_bytes=SMALL_KV, max_model_len=256)


def test_without_the_mode_quantised_decode_depends_on_the_batch(gguf_path, monkeypatch, gguf_layout_kernels):
    """The control: by default a lone decode step (T = 1) takes the int8 dot products and a
    batch of 32 the fp32 panels, so the same prompt's logprobs differ. The mode is what
    makes them equal."""
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "0")
    llm = LLM(str(gguf_path), kv_cache_memory_bytes=SMALL_KV, max_model_len=1024, enable_prefix_caching=False)
    alone, together = _alone_and_batched(llm, GREEDY)
    assert alone[1] != together[1]


def test_a_plugin_that_cannot_says_so(gguf_path, monkeypatch):
    monkeypatch.setenv("PERFXLM_BATCH_INVARIANT", "1")
    with pytest.raises(ValueError, match="hw_plugin 'torch' runs nodes here but cannot make them batch invariant"):
        LLM(str(gguf_path), dtype="float32", hw_plugin="torch", kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
