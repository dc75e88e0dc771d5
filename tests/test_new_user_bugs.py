"""What a new user hit: each test failed before its fix. A failing call leaves nothing queued;
threads sharing an LLM get their own outputs; bad biases, prompts, chat messages and engine
arguments fail early and clearly; a missing optional extra says which to install."""

import math
import sys
import threading

import pytest
import torch

from perfxlm import LLM, SamplingParams, TextPrompt
from perfxlm.exceptions import VLLMValidationError
from tests.conftest import assert_no_leaks

OK = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


class NoDeepCopy:
    def __deepcopy__(self, memo):
        raise TypeError("NoDeepCopy cannot be deep-copied")


def _generate_is_clean(llm) -> None:
    """No request left behind, and the next call returns one output per prompt."""
    assert_no_leaks(llm)
    out = llm.generate(["first prompt", "second prompt"], OK, use_tqdm=False)
    assert [o.prompt for o in out] == ["first prompt", "second prompt"]
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)


# ---- a. a request that fails while being queued takes the call's earlier requests with it ----

@pytest.mark.parametrize("bad", [
    SamplingParams(seed=2**70, max_tokens=2),               # torch's generator takes 64 bits
    SamplingParams(bad_words=["  "], max_tokens=2),         # nothing left to tokenize
    SamplingParams(n=2, seed=2**64 - 1, max_tokens=2),      # the second child's seed is 2**64
    SamplingParams(extra_args={"obj": NoDeepCopy()}, max_tokens=2),  # the engine clones the params
], ids=["seed-2**70", "bad-word-spaces", "n2-seed-uint64-max", "extra-args-no-deepcopy"])
def test_failed_add_aborts_the_calls_earlier_requests(tiny_llm, bad):
    with pytest.raises((ValueError, TypeError)):
        tiny_llm.generate(["a good prompt", "another good one", "the bad one"], [OK, OK, bad], use_tqdm=False)
    _generate_is_clean(tiny_llm)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_extra_args_integers_out_of_range_rejected_at_construction(value):
    with pytest.raises(VLLMValidationError, match="extra_args integers must be between"):
        SamplingParams(extra_args={"nested": [{"x": value}]})
    for ok in (2**64 - 1, -(2**63), True):  # vLLM's bounds, inclusive; bools are fine
        assert SamplingParams(extra_args={"nested": [{"x": ok}]}).extra_args == {"nested": [{"x": ok}]}


# ---- b. threads sharing one LLM -------------------------------------------------------

def test_concurrent_generate_calls_each_get_their_own_outputs(tiny_llm):
    prompts = {0: ["thread zero, prompt one", "thread zero, prompt two", "thread zero, prompt three"],
               1: ["thread one says hello", "thread one again", "thread one, last"]}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(k: int) -> None:
        try:
            barrier.wait()
            for _ in range(2):  # twice each, to overlap with the other thread's steps
                results.setdefault(k, []).append(tiny_llm.generate(prompts[k], params, use_tqdm=False))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for k, runs in results.items():
        assert len(runs) == 2
        for outs in runs:
            assert [o.prompt for o in outs] == prompts[k]
            assert all(o.finished and len(o.outputs[0].token_ids) == 12 for o in outs)
    assert_no_leaks(tiny_llm)


def test_generate_from_inside_a_running_call_is_refused(tiny_llm):
    def bar(**kwargs):  # a use_tqdm callable runs while the call's requests are queued
        tiny_llm.generate("nested", OK, use_tqdm=False)

    with pytest.raises(RuntimeError, match="while a call on the same LLM is running"):
        tiny_llm.generate(["outer one", "outer two"], OK, use_tqdm=bar)
    _generate_is_clean(tiny_llm)


# ---- c. non-finite logit_bias -----------------------------------------------------------

@pytest.mark.parametrize("bias", [float("nan"), math.inf, -math.inf, "1.0"])
def test_non_finite_logit_bias_rejected(bias):
    with pytest.raises(VLLMValidationError, match="logit_bias values must be finite numbers") as exc:
        SamplingParams(logit_bias={0: bias})
    assert exc.value.parameter == "logit_bias"


def test_from_optional_clamps_infinite_bias_but_rejects_nan():
    assert SamplingParams.from_optional(logit_bias={"5": -math.inf, 6: math.inf}).logit_bias == {5: -100.0, 6: 100.0}
    with pytest.raises(VLLMValidationError, match="logit_bias values must be finite numbers"):
        SamplingParams.from_optional(logit_bias={5: float("nan")})


# ---- d. a prompt that is not valid Unicode ------------------------------------------------

@pytest.mark.parametrize("bad", ["abc\ud800", TextPrompt(prompt="x\udfffy")])
def test_lone_surrogate_in_prompt_is_named(tiny_llm, bad):
    with pytest.raises(VLLMValidationError, match="is not valid Unicode text") as exc:
        tiny_llm.generate(["a good prompt", bad], OK, use_tqdm=False)
    text = bad if isinstance(bad, str) else bad["prompt"]
    assert repr(text) in str(exc.value)
    _generate_is_clean(tiny_llm)


def test_non_str_prompt_text_is_named(tiny_llm):
    with pytest.raises(VLLMValidationError, match="the text of a prompt must be a str, got int"):
        tiny_llm.generate(["a good prompt", {"prompt": 42}], OK, use_tqdm=False)
    _generate_is_clean(tiny_llm)


# ---- e. malformed chat messages -------------------------------------------------------

@pytest.mark.parametrize("messages, message", [
    ([{"content": "hi"}], "Invalid chat message (message 0): missing key 'role'"),
    ([{"role": "user", "content": "hi"}, "hi"], "Invalid chat message (message 1): expected a dict"),
    ([[{"role": "user", "content": "fine"}], [{"role": "system", "content": "s"}, {"content": "no role"}]],
     "Invalid chat message (conversation 1, message 1): missing key 'role'"),
    ([[{"role": "user", "content": "fine"}], "not a conversation"], "Invalid conversation 1"),
    ({"role": "user", "content": "a dict, not a list"}, "chat() takes a conversation"),
    ([{"role": "user", "content": "lone \ud800 surrogate"}], "rendered chat prompt"),
])
def test_malformed_chat_messages_are_named(tiny_llm, messages, message):
    with pytest.raises(VLLMValidationError) as exc:
        tiny_llm.chat(messages, OK, use_tqdm=False)
    assert message in str(exc.value)
    _generate_is_clean(tiny_llm)


def test_chat_message_without_content_renders_as_empty(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    out = tiny_llm.chat([{"role": "user"}], OK, use_tqdm=False)
    assert out[0].prompt == tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                                    add_generation_prompt=True)
    assert_no_leaks(tiny_llm)


# ---- f. bad engine arguments fail before the model is read ------------------------------------

@pytest.fixture
def no_model_reads(monkeypatch):
    """Reading the model (its config, tokenizer or weights) fails the test."""
    from perfxlm.engine import arg_utils
    from perfxlm.models import loader

    def read(*args, **kwargs):
        raise AssertionError("the model was read before the engine arguments were checked")

    monkeypatch.setattr(arg_utils, "resolve_model", read)
    for name in ("resolve_model", "load_tokenizer"):
        if hasattr(loader, name):
            monkeypatch.setattr(loader, name, read)
    if hasattr(loader.ModelSource, "load_weights"):
        monkeypatch.setattr(loader.ModelSource, "load_weights", read)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dtype": "float64"}, ValueError, "Unknown dtype 'float64'"),
    ({"dtype": torch.float64}, ValueError, "Unsupported dtype torch.float64"),
    ({"max_num_seqs": 0}, ValueError, "max_num_seqs must be at least 1, got 0."),
    ({"max_num_seqs": "4"}, ValueError, "max_num_seqs must be an integer, got '4'."),
    ({"max_num_batched_tokens": 0}, ValueError, "max_num_batched_tokens must be at least 1, got 0."),
    ({"block_size": 3}, ValueError, "block_size must be a power of two, got 3."),
    ({"block_size": 0}, ValueError, "block_size must be at least 1, got 0."),
    ({"max_model_len": -1}, ValueError, "max_model_len must be at least 1, got -1."),
    ({"hw_plugin": "nope"}, ValueError, "Unknown hw_plugin 'nope'"),
    ({"kv_cache_memory_bytes": -5}, ValueError, "kv_cache_memory_bytes must be at least 1, got -5."),
    ({"seed": 2**70}, ValueError, f"seed must be at most {2**64 - 1}, got {2**70}."),
    ({"max_logprobs": -2}, ValueError, "max_logprobs must be at least -1, got -2."),
    ({"enable_prefix_caching": "no"}, ValueError, "enable_prefix_caching must be True or False, got 'no'."),
    ({"generation_config": "/some/folder"}, NotImplementedError, "generation_config='/some/folder'"),
])
def test_bad_engine_argument_fails_before_the_model_is_read(no_model_reads, kwargs, error, message):
    with pytest.raises(error) as exc:
        LLM("any-model-name", **kwargs)
    assert message in str(exc.value)


def test_plugin_from_environment_is_checked_early(no_model_reads, monkeypatch):
    monkeypatch.setenv("PERFXLM_PLUGIN", "nope")
    with pytest.raises(ValueError, match="Unknown hw_plugin 'nope'"):
        LLM("any-model-name")


def test_good_engine_arguments_reach_the_model(no_model_reads):
    with pytest.raises(AssertionError, match="the model was read"):
        LLM("any-model-name", dtype="float32", seed=2**64 - 1, max_num_seqs=4, block_size=32, max_logprobs=-1,
            kv_cache_memory_bytes=1 << 20, enable_prefix_caching=False, generation_config="vllm", hw_plugin="torch")


# ---- packaging: the optional extras ----------------------------------------------------------

def test_missing_openblas_names_the_extra(monkeypatch):
    from perfxlm.bench import openblas
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # import fails as if not installed
    openblas.load.cache_clear()
    try:
        with pytest.raises(SystemExit, match=r"perfxlm bench gemv needs scipy-openblas32: "
                                              r"pip install 'perfxlm\[bench\]'"):
            openblas.set_threads(1)
    finally:
        openblas.load.cache_clear()
