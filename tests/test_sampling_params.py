"""SamplingParams: vLLM 0.32's defaults, normalisation and every validation message."""

import pickle

import pytest

from perfxlm.exceptions import VLLMClientError, VLLMValidationError
from perfxlm.sampling_params import RequestOutputKind, SamplingParams, SamplingType, StructuredOutputsParams


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.output_kind == RequestOutputKind.CUMULATIVE
    assert p.sampling_type == SamplingType.RANDOM


def test_normalisation():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop_token_ids=[3, 1, 3]).stop_token_ids == [3, 1]
    assert SamplingParams(bad_words=["a", "b", "a"]).bad_words == ["a", "b"]
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(prompt_logprobs=True).prompt_logprobs == 1
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert greedy.sampling_type == SamplingType.GREEDY
    assert SamplingParams(seed=1).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.001).temperature == 0.01  # raised, with a warning
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None
    assert SamplingParams(prompt_logprobs=2).skip_reading_prefix_cache is True


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 1.5}, "n must be an int, but is of type <class 'float'>"),
    ({"n": 0}, "n must be at least 1, got 0."),
    ({"n": 16385}, "n must be at most 16384, got 16385."),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3."),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number, got inf."),
    ({"repetition_penalty": 0}, "repetition_penalty must be greater than zero, got 0."),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan."),
    ({"temperature": -1}, "temperature must be non-negative, got -1."),
    ({"temperature": 2.5}, "temperature must be in [0, 2], got 2.5."),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0."),
    ({"top_p": 1.1}, "top_p must be in (0, 1], got 1.1."),
    ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
    ({"top_k": 2.0}, "top_k must be an integer, got float"),
    ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
    ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
    ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be less than or equal to max_tokens=4, got 5."),
    ({"stream_interval": 0}, "stream_interval must be at least 1, got 0."),
    ({"logprobs": -2}, "logprobs must be non-negative or -1, got -2."),
    ({"prompt_logprobs": -5}, "prompt_logprobs must be non-negative or -1, got -5."),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids must contain only integers, got [1, '2']."),
    ({"stop": ["a", ""]}, "stop cannot contain an empty string."),
    ({"stop": "a", "detokenize": False}, "stop strings are only supported when detokenize is True."),
    ({"bad_words": [""]}, "bad_words cannot contain an empty string."),
    ({"n": 2, "temperature": 0}, "n must be 1 when using greedy sampling, got 2."),
    ({"thinking_token_budget": -3}, "`thinking_token_budget` must be a non-negative integer or -1"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(VLLMValidationError) as exc:
        SamplingParams(**kwargs)
    assert str(exc.value).startswith(message)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, VLLMClientError)


def test_first_failure_is_reported():
    with pytest.raises(VLLMValidationError, match="presence_penalty"):
        SamplingParams(presence_penalty=5, top_p=0)


def test_validation_error_carries_parameter_and_value():
    with pytest.raises(VLLMValidationError) as exc:
        SamplingParams(temperature=-1)
    assert exc.value.parameter == "temperature" and exc.value.value == -1


def test_max_n_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "4")
    with pytest.raises(VLLMValidationError, match="n must be at most 4"):
        SamplingParams(n=5)


def test_from_optional_defaults_and_logit_bias_clamp():
    p = SamplingParams.from_optional(n=None, temperature=None, top_p=None, logit_bias={"5": 500, 7: -1})
    assert p.n == 1 and p.temperature == 1.0 and p.top_p == 1.0
    assert p.logit_bias == {5: 100.0, 7: -1}
    with pytest.raises(VLLMValidationError, match="cannot be converted to integer token IDs"):
        SamplingParams.from_optional(logit_bias={"x": 1.0})


def test_clone_pickle_and_generation_config():
    p = SamplingParams(temperature=0.5, stop=["x"], stop_token_ids=[9])
    q = p.clone()
    assert q == p and q is not p and q.stop is not p.stop
    assert pickle.loads(pickle.dumps(p)) == p
    q.update_from_generation_config({"eos_token_id": [2, 5]}, eos_token_id=2)
    assert q.eos_token_id == 2 and sorted(q.stop_token_ids) == [5, 9]
    assert q.all_stop_token_ids == {2, 5, 9}
    r = SamplingParams(ignore_eos=True)
    r.update_from_generation_config({"eos_token_id": [2, 5]}, eos_token_id=2)
    assert r.eos_token_id is None and r.stop_token_ids == [] and r.all_stop_token_ids == {2, 5}


def test_repr_names_fields():
    text = repr(SamplingParams(temperature=0.3, max_tokens=7))
    assert text.startswith("SamplingParams(n=1,") and "temperature=0.3" in text and "max_tokens=7" in text


def test_structured_outputs_params_rules():
    StructuredOutputsParams(regex="a+")
    with pytest.raises(VLLMValidationError, match="only use one kind"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(VLLMValidationError, match="must use one kind"):
        StructuredOutputsParams()
