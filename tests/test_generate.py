"""LLM.generate on a tiny random Llama: prompt forms, ids, order, n, seeds, logprobs, stops."""

import numpy as np
import pytest
import torch

from perfxlm import LLM, SamplingParams, TextPrompt, TokensPrompt
from perfxlm.sampling_params import RequestOutputKind
from tests.conftest import assert_no_leaks

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens(out, i=0) -> list[int]:
    return list(out.outputs[i].token_ids)


def test_prompt_forms_agree(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    ids = tok.encode("Hello there")
    outs = tiny_llm.generate(["Hello there", TextPrompt(prompt="Hello there"),
                              TokensPrompt(prompt_token_ids=ids), TokensPrompt(prompt_token_ids=ids, prompt="hi")],
                             GREEDY, use_tqdm=False)
    assert len({tuple(tokens(o)) for o in outs}) == 1
    assert [o.prompt for o in outs] == ["Hello there", "Hello there", None, "hi"]
    assert all(o.prompt_token_ids == ids and o.finished for o in outs)
    single_str = tiny_llm.generate("Hello there", GREEDY, use_tqdm=False)
    bare_ids = tiny_llm.generate(ids, GREEDY, use_tqdm=False)       # a list of ints is ONE prompt
    list_of_ids = tiny_llm.generate([ids, ids[:1]], GREEDY, use_tqdm=False)
    numpy_ids = tiny_llm.generate(TokensPrompt(prompt_token_ids=list(np.array(ids))), GREEDY, use_tqdm=False)
    assert tokens(numpy_ids[0]) == tokens(outs[0]) and numpy_ids[0].prompt_token_ids == ids
    assert len(single_str) == len(bare_ids) == 1 and len(list_of_ids) == 2
    assert tokens(bare_ids[0]) == tokens(single_str[0]) == tokens(list_of_ids[0]) == tokens(outs[0])


def test_request_ids_count_across_calls_and_output_order(tiny_llm):
    prompts = [f"prompt number {i}" for i in range(5)]
    first = tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    second = tiny_llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    ids = [int(o.request_id) for o in first + second]
    assert ids == list(range(ids[0], ids[0] + 7))
    assert [o.prompt for o in first] == prompts


def test_per_prompt_params_and_length_mismatch(tiny_llm):
    outs = tiny_llm.generate(["a b", "c d"], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                             SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                             use_tqdm=False)
    assert [len(tokens(o)) for o in outs] == [2, 5]
    assert outs[0].outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match=r"The lengths of prompts \(2\) and params \(1\) must be the same."):
        tiny_llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_output_kind_forced_to_final_only(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=2)
    tiny_llm.generate("x", params, use_tqdm=False)
    assert params.output_kind == RequestOutputKind.FINAL_ONLY


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = tiny_llm.generate("The weather today", p, use_tqdm=False)[0]
    batch = tiny_llm.generate(["other prompt", "The weather today", "a third one"],
                              [SamplingParams(temperature=1.0, max_tokens=8), p, SamplingParams(temperature=0.7)],
                              use_tqdm=False)
    assert tokens(batch[1]) == tokens(alone)
    other_seed = tiny_llm.generate("The weather today", SamplingParams(temperature=1.0, seed=99, max_tokens=12,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    assert tokens(other_seed) != tokens(alone)


def test_n_completions_use_seed_plus_index(tiny_llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = tiny_llm.generate("Once upon a time", p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i in range(3):
        single = tiny_llm.generate("Once upon a time", SamplingParams(temperature=1.0, seed=7 + i, max_tokens=8,
                                                                      ignore_eos=True), use_tqdm=False)[0]
        assert tokens(out, i) == tokens(single)
    assert len({tuple(tokens(out, i)) for i in range(3)}) > 1


def test_engine_seed_drives_unseeded_sampling(tiny_llama_dir):
    p = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    runs = [LLM(str(tiny_llama_dir), dtype="float32", seed=s, kv_cache_memory_bytes=8 << 20)
            .generate("seeded engine", p, use_tqdm=False)[0] for s in (3, 3, 4)]
    assert tokens(runs[0]) == tokens(runs[1]) != tokens(runs[2])


def hf_logits(model_dir, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_logprobs_ranks_and_cumulative(tiny_llm, tiny_llama_dir):
    out = tiny_llm.generate("Logprobs please", SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                               ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    for tok_id, entry in zip(c.token_ids, c.logprobs):
        assert tok_id in entry and entry[tok_id].rank == 1   # greedy picks the top token
        assert len(entry) == 3                              # the chosen token is among the top 3
        assert sorted(lp.rank for lp in entry.values()) == [1, 2, 3]
        assert entry[tok_id].decoded_token == tiny_llm.get_tokenizer().decode([tok_id])
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    # values are the raw log-softmax of the model's logits (transformers as reference)
    ref = torch.log_softmax(hf_logits(tiny_llama_dir, out.prompt_token_ids + list(c.token_ids))[-5], dim=-1)
    for tok_id, lp in c.logprobs[0].items():
        assert lp.logprob == pytest.approx(ref[tok_id].item(), abs=1e-4)
    plain = tiny_llm.generate("Logprobs please", GREEDY, use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None


def test_logprobs_zero_and_sampled_rank(tiny_llm):
    out = tiny_llm.generate("rank check", SamplingParams(temperature=2.0, seed=3, max_tokens=6, logprobs=0,
                                                          ignore_eos=True), use_tqdm=False)[0]
    for tok_id, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert list(entry) == [tok_id] and entry[tok_id].rank >= 1
    assert any(e[t].rank > 1 for t, e in zip(out.outputs[0].token_ids, out.outputs[0].logprobs))


def test_prompt_logprobs_match_transformers(tiny_llm, tiny_llama_dir):
    out = tiny_llm.generate("score this whole prompt please", SamplingParams(max_tokens=1, prompt_logprobs=2),
                            use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    ref = torch.log_softmax(hf_logits(tiny_llama_dir, ids), dim=-1)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert ids[pos] in entry and 2 <= len(entry) <= 3
        assert entry[ids[pos]].logprob == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        # rank = 1 + tokens scored higher; a 50k vocabulary has near-ties that another
        # summation order may swap, so the rank must fall within the tokens tied to 1e-5
        lp = ref[pos - 1, ids[pos]]
        assert int((ref[pos - 1] > lp + 1e-5).sum()) + 1 <= entry[ids[pos]].rank
        assert entry[ids[pos]].rank <= int((ref[pos - 1] >= lp - 1e-5).sum())


def test_prompt_logprobs_survive_chunked_prefill(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=5)
    whole = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20)
    prompt = "a prompt long enough to be split into several prefill chunks of five tokens"
    p = SamplingParams(max_tokens=1, prompt_logprobs=1)
    a = llm.generate(prompt, p, use_tqdm=False)[0].prompt_logprobs
    b = whole.generate(prompt, p, use_tqdm=False)[0].prompt_logprobs
    assert len(a) == len(b)
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        assert all(x[k].logprob == pytest.approx(y[k].logprob, abs=1e-5) for k in x)
    assert_no_leaks(llm)


def test_max_tokens_none_runs_to_max_model_len(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=40, kv_cache_memory_bytes=8 << 20)
    out = llm.generate("count to the end", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(tokens(out)) == 40
    assert out.outputs[0].finish_reason == "length"


def test_use_tqdm_callable(tiny_llm):
    import io

    from tqdm import tqdm
    made = []

    def bar(*args, **kwargs):
        made.append(tqdm(*args, **kwargs, file=io.StringIO()))
        return made[-1]
    tiny_llm.generate(["a", "b"], GREEDY, use_tqdm=bar)
    assert made and made[0].total == 2 and made[0].n == 2
    assert "est. speed input" in made[0].fp.getvalue() and "toks/s" in made[0].fp.getvalue()


def test_detokenize_false_and_skip_tokenizer_init(tiny_llm, tiny_llama_dir):
    out = tiny_llm.generate("no text", SamplingParams(temperature=0, max_tokens=3, detokenize=False),
                            use_tqdm=False)[0]
    assert out.outputs[0].text == "" and len(tokens(out)) == 3
    raw = LLM(str(tiny_llama_dir), dtype="float32", skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20)
    assert raw.get_tokenizer() is None
    ids = tiny_llm.get_tokenizer().encode("no text")
    out2 = raw.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(temperature=0, max_tokens=3),
                        use_tqdm=False)[0]
    assert out2.outputs[0].text == "" and tokens(out2) == tokens(out)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        raw.generate("text needs a tokenizer", use_tqdm=False)
