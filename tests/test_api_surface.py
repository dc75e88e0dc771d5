"""The import surface vLLM scripts use."""

import pytest


def test_top_level_names_and_submodules():
    import perfxlm
    from perfxlm import LLM, CompletionOutput, RequestOutput, SamplingParams, TextPrompt, TokensPrompt  # noqa: F401
    from perfxlm.entrypoints.llm import LLM as LLM2
    from perfxlm.exceptions import VLLMValidationError  # noqa: F401
    from perfxlm.inputs import PromptType  # noqa: F401
    from perfxlm.logprobs import Logprob
    from perfxlm.outputs import CompletionOutput as C2
    from perfxlm.sampling_params import RequestOutputKind
    from perfxlm.sampling_params import SamplingParams as S2
    assert LLM is LLM2 and SamplingParams is S2 and CompletionOutput is C2
    assert isinstance(perfxlm.__version__, str) and perfxlm.__version_tuple__[0] == 0
    assert {"LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "TokensPrompt"} <= set(perfxlm.__all__)
    assert [k.value for k in RequestOutputKind] == [0, 1, 2]
    assert Logprob(-1.5, 2, "x").rank == 2
    with pytest.raises(AttributeError):
        perfxlm.NoSuchThing


def test_prompt_typed_dicts_are_plain_dicts():
    from perfxlm import TextPrompt, TokensPrompt
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}
    assert type(TextPrompt(prompt="hi")) is dict


def test_request_output_add_aggregates_deltas():
    from perfxlm.outputs import CompletionOutput, RequestOutput
    a = RequestOutput("0", "p", [1], None, [CompletionOutput(0, "ab", [5], None, None)], False)
    b = RequestOutput("0", "p", [1], None, [CompletionOutput(0, "c", [6], None, None, "stop")], True,
                      some_future_field=1)
    a.add(b, aggregate=True)
    assert a.finished and a.outputs[0].text == "abc" and list(a.outputs[0].token_ids) == [5, 6]
    assert a.outputs[0].finish_reason == "stop" and a.outputs[0].finished()
