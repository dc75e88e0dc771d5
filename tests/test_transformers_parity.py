"""Greedy tokens of tiny random-weight models equal transformers', token for token,
under every scheduling path: batching, chunked prefill, prefix caching, preemption."""

import pytest
import torch

from perfxlm import LLM, SamplingParams
from tests.conftest import SMALL_KV, assert_no_leaks, build_tiny_model

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12",
           ("A much longer prompt that keeps going so that it spans more than one KV block of sixteen tokens, "
            "which exercises the block table on the prefill path too.")]
MAX_TOKENS = 24


def hf_greedy(model_dir, tokenizer, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = torch.tensor([tokenizer.encode(p)])
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.fixture(scope="module", params=["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"])
def tiny(request, smol_tokenizer, tmp_path_factory):
    extra = {"tie_word_embeddings": True} if request.param == "Qwen2ForCausalLM" else {}
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, smol_tokenizer, **extra)
    return path, hf_greedy(path, smol_tokenizer, PROMPTS, MAX_TOKENS)


ENGINE_VARIANTS = {
    "default": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},  # prompts split across many steps
    "no_prefix_caching": {"enable_prefix_caching": False},
    "one_seq_at_a_time": {"max_num_seqs": 1},
    # 8 blocks of 16 tokens cannot hold the batch: requests are preempted and recomputed
    "preemption": {"block_size": 16, "max_model_len": 128, "kv_cache_memory_bytes": "8 blocks"},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_greedy_matches_transformers(tiny, variant):
    path, expected = tiny
    kw = dict(ENGINE_VARIANTS[variant])
    if kw.get("kv_cache_memory_bytes") == "8 blocks":
        # bytes per block: layers * (k, v) * block_size * kv_heads * head_dim * 4 bytes
        kw["kv_cache_memory_bytes"] = 8 * (2 * 2 * 16 * 2 * 16 * 4)
    kw.setdefault("kv_cache_memory_bytes", SMALL_KV)
    llm = LLM(str(path), dtype="float32", **kw)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    if variant == "preemption":
        assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_prefix_cache_hits_give_same_tokens(tiny):
    path, expected = tiny
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[3], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    # every full block of the prompt but the last token's is served from the cache
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 16 * 16 > 0
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids) == expected[3]
    assert_no_leaks(llm)


def test_sliding_window_matches_transformers(smol_tokenizer, tmp_path):
    """A Mistral window of 8 tokens, shorter than the prompts: the mask must cut keys."""
    path = build_tiny_model(tmp_path, "MistralForCausalLM", smol_tokenizer, sliding_window=8)
    expected = hf_greedy(path, smol_tokenizer, PROMPTS, MAX_TOKENS)
    for kw in ({}, {"max_num_batched_tokens": 5}):  # whole prefill, and chunks that cross the window
        llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV, **kw)
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                               use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
        assert_no_leaks(llm)
