"""Structured outputs (xgrammar) on SmolLM2: JSON schema, regex, choice and EBNF grammar
constraints hold for every sampled output; greedy picks the likeliest choice; unconstrained
rows in the same batch are untouched; n > 1, chunked prefill and preemption keep the matchers
right; bad specs fail when added, with nothing queued."""

import json
import re

import pytest

from perfxlm import LLM, SamplingParams, TokensPrompt
from perfxlm.exceptions import VLLMValidationError
from perfxlm.sampling_params import StructuredOutputsParams
from tests.conftest import SMALL_KV, assert_no_leaks

EOS = 2
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "species": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number"},
        "owner": {"type": "object", "additionalProperties": False, "required": ["name", "vaccinated"],
                  "properties": {"name": {"type": "string", "maxLength": 20}, "vaccinated": {"type": "boolean"}}},
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "species", "age", "weight", "owner", "toys"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3} years old\."
# xgrammar's EBNF (GBNF): a sum of up to three products of up to two small numbers, and a result
GRAMMAR = r"""
root ::= expr "=" num
expr ::= term | term "+" term | term "+" term "+" term
term ::= num | num "*" num
num ::= [1-9] [0-9]?
"""
GRAMMAR_RE = re.compile(r"[1-9][0-9]?(\*[1-9][0-9]?)?(\+[1-9][0-9]?(\*[1-9][0-9]?)?){0,2}=[1-9][0-9]?")
CHOICES = ["London", "Berlin", "Madrid", "Lisbon"]


def check_pet(text: str) -> None:
    """text is one JSON object that SCHEMA accepts."""
    pet = json.loads(text)
    assert set(pet) == set(SCHEMA["required"])
    assert isinstance(pet["name"], str) and len(pet["name"]) <= 20
    assert pet["species"] in ("cat", "dog", "bird")
    assert type(pet["age"]) is int and 0 <= pet["age"] <= 30
    assert type(pet["weight"]) in (int, float)
    assert set(pet["owner"]) == {"name", "vaccinated"} and type(pet["owner"]["vaccinated"]) is bool
    assert isinstance(pet["toys"], list) and len(pet["toys"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 12 for t in pet["toys"])


def chat(llm: LLM, text: str) -> str:
    """The instruct model's chat prompt for one user message (it then answers to the point)."""
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)


PET = "Describe a pet as a JSON object with the fields name, species, age, weight, owner and toys."


def sampled(so: StructuredOutputsParams, n: int = 16, **kw) -> list[SamplingParams]:
    kw.setdefault("max_tokens", 200)
    return [SamplingParams(temperature=1.0, seed=1000 + i, structured_outputs=so, **kw) for i in range(n)]


def completions(outputs) -> list:
    return [c for o in outputs for c in o.outputs]


def assert_finished_by_grammar(c) -> None:
    """The grammar is complete, so only EOS was allowed: the request stopped on it."""
    assert c.finish_reason == "stop" and c.token_ids[-1] == EOS


@pytest.mark.parametrize("kind", ["json", "regex", "choice", "grammar"])
def test_every_sampled_output_matches(smol_llm, kind):
    spec = {"json": SCHEMA, "regex": REGEX, "choice": CHOICES, "grammar": GRAMMAR}[kind]
    prompt = {"json": PET, "regex": "How old is your grandmother?", "choice": "Name a European capital.",
              "grammar": "Write a small sum of products and its result."}[kind]
    outs = smol_llm.generate([chat(smol_llm, prompt)] * 16, sampled(StructuredOutputsParams(**{kind: spec})), use_tqdm=False)
    texts = []
    for c in completions(outs):
        assert_finished_by_grammar(c)
        texts.append(c.text)
        if kind == "json":
            check_pet(c.text)
        elif kind == "regex":
            assert re.fullmatch(REGEX, c.text), c.text
        elif kind == "choice":
            assert c.text in CHOICES
        else:
            assert GRAMMAR_RE.fullmatch(c.text), c.text
    assert len(set(texts)) > 1  # sampled at temperature 1: not one forced answer
    assert_no_leaks(smol_llm)


def test_json_object_and_json_schema_string(smol_llm):
    so_object = StructuredOutputsParams(json_object=True)
    so_string = StructuredOutputsParams(json=json.dumps(SCHEMA))
    outs = smol_llm.generate([chat(smol_llm, "Give me a JSON object.")] * 4 + [chat(smol_llm, PET)] * 4,
                             sampled(so_object, 4, max_tokens=300) + sampled(so_string, 4), use_tqdm=False)
    for i, c in enumerate(completions(outs)):
        if c.finish_reason == "stop":  # an open-ended object may run to max_tokens
            value = json.loads(c.text)
            assert isinstance(value, dict)
            if i >= 4:
                check_pet(c.text)
    assert all(c.finish_reason == "stop" for c in completions(outs)[4:])


def choice_logprob(llm: LLM, prompt_ids: list[int], choice: str) -> float:
    """log P(choice's tokens | prompt) under the model, from prompt logprobs."""
    ids = llm.get_tokenizer().encode(choice, add_special_tokens=False)
    out = llm.generate(TokensPrompt(prompt_token_ids=prompt_ids + ids),
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return sum(out.prompt_logprobs[len(prompt_ids) + k][t].logprob for k, t in enumerate(ids))


def test_greedy_choice_is_the_likeliest(smol_llm):
    prompt = "The capital of Italy is"
    prompt_ids = smol_llm.get_tokenizer().encode(prompt)
    choices = [" Paris", " Berlin", " Milan", " Madrid", " Florence"]  # not the unconstrained " Rome"
    scores = {c: choice_logprob(smol_llm, prompt_ids, c) for c in choices}
    best = max(scores, key=scores.get)
    so = StructuredOutputsParams(choice=choices)
    c = smol_llm.generate(prompt, SamplingParams(temperature=0, structured_outputs=so), use_tqdm=False)[0].outputs[0]
    assert c.text == best
    assert_finished_by_grammar(c)
    free = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].outputs[0]
    assert free.text not in choices  # unconstrained greedy would have said something else


def test_unconstrained_rows_are_untouched(smol_llm):
    prompts = ["The capital of France is", "Once upon a time", "My favourite food is"]
    plain = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=1.0, seed=7, max_tokens=24),
             SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=24, logprobs=2)]
    alone = smol_llm.generate(prompts, plain, use_tqdm=False)
    so = StructuredOutputsParams(regex=REGEX)
    mixed = smol_llm.generate([chat(smol_llm, PET), prompts[0], chat(smol_llm, "How old is he?"), prompts[1],
                               prompts[2]],
                              [sampled(StructuredOutputsParams(json=SCHEMA), 1)[0], plain[0], sampled(so, 1)[0],
                               plain[1], plain[2]], use_tqdm=False)
    for a, m in zip(alone, [mixed[1], mixed[3], mixed[4]]):
        assert m.outputs[0].token_ids == a.outputs[0].token_ids
    for (a_lp, m_lp) in zip(alone[2].outputs[0].logprobs, mixed[4].outputs[0].logprobs):
        assert {t: lp.logprob for t, lp in a_lp.items()} == {t: lp.logprob for t, lp in m_lp.items()}
    check_pet(mixed[0].outputs[0].text)
    assert re.fullmatch(REGEX, mixed[2].outputs[0].text)


def test_n_children_each_keep_their_own_grammar(smol_llm):
    params = SamplingParams(n=6, temperature=1.0, seed=5, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    out = smol_llm.generate(chat(smol_llm, PET), params, use_tqdm=False)[0]
    assert len(out.outputs) == 6 and len({c.text for c in out.outputs}) > 1
    for c in out.outputs:
        assert_finished_by_grammar(c)
        check_pet(c.text)


def test_chunked_prefill_and_preemption_keep_outputs_valid(gguf_path):
    # 16-token prefill chunks, and a KV cache of 24 blocks of 16 tokens for 16 requests that
    # each need about 6: requests are preempted and recomputed while their grammars run
    llm = LLM(str(gguf_path), dtype="float32", max_model_len=256, block_size=16, max_num_batched_tokens=16,
              kv_cache_memory_bytes=24 * 16 * 30 * 2 * 3 * 64 * 4)
    outs = llm.generate([chat(llm, PET)] * 8 + [chat(llm, "How old is your grandmother?")] * 8,
                        sampled(StructuredOutputsParams(json=SCHEMA), 8) +
                        sampled(StructuredOutputsParams(regex=REGEX), 8), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    for i, c in enumerate(completions(outs)):
        assert_finished_by_grammar(c)
        if i < 8:
            check_pet(c.text)
        else:
            assert re.fullmatch(REGEX, c.text), c.text
    assert_no_leaks(llm)


def deep_schema(depth: int) -> dict:
    """An object schema nesting 2 * depth levels of objects (a schema and its properties)."""
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD_SPECS = [
    (dict(json="{not json"), "Invalid JSON grammar specification."),
    (dict(json={"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}}}),
     "The provided JSON schema contains features not supported by xgrammar."),
    (dict(regex="(ab"), "Failed to transform regex into a grammar"),
    (dict(regex="a\x00b"), "structured_outputs.regex must not contain a NUL character"),
    (dict(choice=[]), "Choice '[]' cannot be an empty list"),
    (dict(grammar="root ::= foo"), "Invalid grammar specification."),
    (dict(grammar="  "), "structured_outputs.grammar cannot be an empty string"),
    (dict(json_object=False), "structured_outputs.json_object must be True if set"),
    (dict(json=json.dumps(deep_schema(40))), "The JSON schema is nested too deeply"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[m[:30] for _, m in BAD_SPECS])
def test_bad_specs_fail_when_added(smol_llm, spec, message):
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**spec))
    engine = smol_llm.llm_engine
    with pytest.raises(VLLMValidationError, match=re.escape(message)):
        engine.add_request("bad", "Hello", params)
    assert not engine.requests and not engine.has_unfinished_requests()
    good = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(VLLMValidationError, match=re.escape(message)):  # the good one queued first is aborted
        smol_llm.generate(["Hello", "Hi"], [good, params], use_tqdm=False)
    assert_no_leaks(smol_llm)


def test_only_one_kind_of_constraint():
    with pytest.raises(VLLMValidationError, match="only use one kind"):
        StructuredOutputsParams(json=SCHEMA, regex=REGEX)
    with pytest.raises(VLLMValidationError, match="must use one kind"):
        StructuredOutputsParams()


@pytest.mark.parametrize("config, error, message", [
    ({"backend": "guidance"}, NotImplementedError, "backend 'guidance' is not supported"),
    ({"backend": "outlines"}, NotImplementedError, "backend 'outlines' is not supported"),
    ({"backend": "nope"}, ValueError, "must be one of"),
    ({"disable_any_whitespace": True}, ValueError, "only supported for xgrammar and guidance"),
    ({"backend": "xgrammar", "disable_additional_properties": True}, ValueError, "only supported for the guidance"),
    ({"reasoning_parser": "deepseek_r1"}, NotImplementedError, "reasoning parser"),
])
def test_structured_outputs_config_is_checked_before_loading(config, error, message):
    with pytest.raises(error, match=message):
        LLM("/nonexistent/model", structured_outputs_config=config)


def test_disable_any_whitespace_gives_compact_json(gguf_path):
    from perfxlm.engine.structured_output import StructuredOutputsConfig
    config = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    llm = LLM(str(gguf_path), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=512,
              structured_outputs_config=config)
    assert llm.llm_engine.config.structured_outputs_config is config
    outs = llm.generate([chat(llm, PET)] * 6, sampled(StructuredOutputsParams(json=SCHEMA), 6),
                        use_tqdm=False)
    for c in completions(outs):
        assert_finished_by_grammar(c)
        check_pet(c.text)
        assert json.dumps(json.loads(c.text), separators=(",", ":"), ensure_ascii=False) == c.text
