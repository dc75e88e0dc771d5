"""Structured outputs on `perfxlm serve`, through the openai client as a vLLM user writes them:
`response_format` (json_schema, json_object, structural_tag) and the `structured_outputs`
extension (json, regex, choice, grammar) on both routes, streaming, n > 1; a bad constraint is
a 400 with vLLM's message and nothing reaches the engine; unconstrained requests are unchanged."""

import asyncio
import json
import re

import jsonschema
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.server_util import RemoteServer

# at temperature 1 this small model now and then pads a JSON object with whitespace until max_tokens:
# sampled JSON requests use 0.7
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20)]
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "species": {"type": "string", "enum": ["cat", "dog", "bird"]},
        "weight": {"type": "number"},
        "owner": {"type": "object", "additionalProperties": False, "required": ["name", "vaccinated"],
                  "properties": {"name": {"type": "string", "maxLength": 16}, "vaccinated": {"type": "boolean"}}},
    },
    "required": ["name", "species", "weight", "owner"],
    "additionalProperties": False,
}
PET = [{"role": "user", "content": "Describe a pet as a JSON object with name, species, weight and owner."}]
AGE = [{"role": "user", "content": "How old is your grandmother?"}]
REGEX = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3} years old\."
CHOICES = ["London", "Berlin", "Madrid", "Lisbon"]
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RemoteServer(SERVER_ARGS, log_path=tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(server.url_for(route), json=body, timeout=300)


def prompt_tokens_total(server) -> float:
    """The engine's prefill token counter: it moves only when a request reached the engine."""
    text = requests.get(server.url_for("metrics"), timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "vllm:prompt_tokens_total")


def check_pet(text: str) -> None:
    jsonschema.validate(json.loads(text), PET_SCHEMA)


def test_json_schema_response_format_every_choice_valid(client):
    resp = client.chat.completions.create(model="", messages=PET, response_format=PET_FORMAT, n=4,
                                          temperature=0.7, seed=3, max_completion_tokens=200)
    assert len(resp.choices) == 4
    for choice in resp.choices:
        assert choice.finish_reason == "stop", choice.message.content
        check_pet(choice.message.content)
    assert len({c.message.content for c in resp.choices}) > 1  # sampled, not one forced answer


def test_json_schema_on_completions_route(client):
    resp = client.completions.create(model="", prompt="A pet, as JSON:", max_tokens=200, n=2, temperature=0.7,
                                     seed=1, extra_body={"response_format": PET_FORMAT})
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        check_pet(choice.text)


def test_json_object(client):
    book = [{"role": "user", "content": "Give me a JSON object describing a book with title and author."}]
    resp = client.chat.completions.create(model="", messages=book, response_format={"type": "json_object"},
                                          temperature=0, max_completion_tokens=300)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"  # greedy on this prompt closes the object well within 300
    assert isinstance(json.loads(choice.message.content), dict)
    text = client.completions.create(model="", prompt="A book as JSON:", temperature=0, max_tokens=300,
                                     extra_body={"structured_outputs": {"json_object": True}}).choices[0]
    if text.finish_reason == "stop":  # an open-ended object may run on; what is there must be JSON so far
        assert isinstance(json.loads(text.text), dict)
    assert text.text.lstrip().startswith("{")


def test_regex_through_structured_outputs(client):
    resp = client.completions.create(model="", prompt="My grandmother", max_tokens=40, n=3, temperature=1.0,
                                     seed=5, extra_body={"structured_outputs": {"regex": REGEX}})
    for choice in resp.choices:
        assert re.fullmatch(REGEX, choice.text), choice.text
        assert choice.finish_reason == "stop"
    chat = client.chat.completions.create(model="", messages=AGE, max_completion_tokens=40, temperature=0,
                                          extra_body={"structured_outputs": {"regex": REGEX}})
    assert re.fullmatch(REGEX, chat.choices[0].message.content)


def test_choice_through_structured_outputs(client):
    resp = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Name a European capital."}], n=6, temperature=1.0, seed=2,
        extra_body={"structured_outputs": {"choice": CHOICES}})
    assert all(c.message.content in CHOICES and c.finish_reason == "stop" for c in resp.choices)
    text = client.completions.create(model="", prompt="The capital of Germany is", temperature=0,
                                     extra_body={"structured_outputs": {"choice": [" Paris", " Berlin"]}})
    assert text.choices[0].text == " Berlin"


def test_grammar_and_structural_tag(client):
    grammar = 'root ::= "yes" | "no"'
    resp = client.completions.create(model="", prompt="Is the sky blue?", temperature=0,
                                     extra_body={"structured_outputs": {"grammar": grammar}})
    assert resp.choices[0].text in ("yes", "no")
    # vLLM's structural tag format: here a tag that must wrap a schema-valid object
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<pet>", "end": "</pet>",
                                                "content": {"type": "json_schema", "json_schema": PET_SCHEMA}}}
    resp = client.chat.completions.create(model="", messages=PET, response_format=tag, temperature=0,
                                          max_completion_tokens=200)
    body = re.fullmatch(r"<pet>(.*)</pet>", resp.choices[0].message.content, re.S)
    assert body and resp.choices[0].finish_reason == "stop"
    check_pet(body.group(1))
    # the legacy form (structures + triggers) as a structured_outputs string: free text until a trigger
    legacy = {"structures": [{"begin": "<pet>", "schema": PET_SCHEMA, "end": "</pet>"}], "triggers": ["<pet>"]}
    resp = client.completions.create(model="", prompt="Hello", max_tokens=8, temperature=0,
                                     extra_body={"structured_outputs": {"structural_tag": json.dumps(legacy)}})
    assert resp.choices[0].text == client.completions.create(model="", prompt="Hello", max_tokens=8,
                                                             temperature=0).choices[0].text


def test_streaming_assembles_the_same_text(client):
    kw = dict(model="", messages=PET, response_format=PET_FORMAT, temperature=0, max_completion_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole and finish == "stop"
    check_pet(whole)
    # n > 1 streamed on the completions route, each index its own regex-valid text
    texts = [""] * 3
    for chunk in client.completions.create(model="", prompt="My grandmother", max_tokens=40, n=3,
                                           temperature=1.0, seed=9, stream=True,
                                           extra_body={"structured_outputs": {"regex": REGEX}}):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert all(re.fullmatch(REGEX, t) for t in texts), texts


BAD = [
    ("v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}}}}}},
     "The provided JSON schema contains features not supported by xgrammar.", None),
    ("v1/chat/completions", {"structured_outputs": {"json": "{not json"}}, "Invalid JSON grammar specification.",
     None),
    ("v1/completions", {"structured_outputs": {"regex": "(ab"}}, "Failed to transform regex into a grammar", None),
    ("v1/completions", {"structured_outputs": {"grammar": "root ::= foo"}}, "Invalid grammar specification.", None),
    ("v1/chat/completions", {"response_format": {"type": "json_schema"}},
     "When response_format type is 'json_schema', the 'json_schema' field must be provided.", "response_format"),
    ("v1/completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}},
     "You can only use one kind of constraints for structured outputs ('json', 'regex' or 'choice').",
     "structured_outputs"),
    ("v1/chat/completions", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "You can only use one kind of structured outputs constraint but multiple are specified", None),
    ("v1/chat/completions", {"structured_outputs": {}},
     "You must use one kind of structured outputs constraint but none are specified", None),
    ("v1/completions", {"response_format": {"type": "structural_tag", "format": {"type": "no such format"}}},
     "Invalid response_format structural_tag specification.", "response_format"),
    ("v1/chat/completions", {"structured_outputs": {"choice": ["a"]}, "tool_choice": {
        "type": "function", "function": {"name": "f"}}, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "You can only either use constraints for structured outputs or tools, not both.", None),
    # pydantic's errors, as the server reports any body that fails the schema
    ("v1/chat/completions", {"response_format": {"type": "xml"}}, "Input should be 'text', 'json_object' or "
     "'json_schema'", "body.response_format.type"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("route", "extra", "message", "param"), BAD)
def test_bad_constraint_is_a_400_and_nothing_is_queued(server, route, extra, message, param, stream):
    body = {"prompt": "x"} if route == "v1/completions" else {"messages": AGE}
    before = prompt_tokens_total(server)
    r = post(server, route, {**body, "max_tokens": 8, "stream": stream, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    err_type = "Bad Request" if param and param.startswith("body.") else "BadRequestError"
    assert (error["type"], error["code"], error["param"]) == (err_type, 400, param)
    assert prompt_tokens_total(server) == before


def test_bad_constraint_raises_in_the_openai_client(client):
    with pytest.raises(openai.BadRequestError, match="Failed to transform regex into a grammar"):
        client.chat.completions.create(model="", messages=AGE, extra_body={"structured_outputs": {"regex": "[z-a]"}})


def test_unconstrained_requests_are_unaffected(server, client):
    kw = dict(model="", prompt="The capital of France is", max_tokens=24, temperature=0)
    alone = client.completions.create(**kw).choices[0].text
    assert client.completions.create(extra_body={"response_format": {"type": "text"}}, **kw).choices[0].text == alone

    async def mixed() -> tuple[str, list[str]]:
        aclient = server.async_client()
        constrained = [aclient.chat.completions.create(model="", messages=PET, response_format=PET_FORMAT,
                                                       temperature=0.7, seed=s, max_completion_tokens=200)
                       for s in range(3)]
        results = await asyncio.gather(aclient.completions.create(**kw), *constrained)
        await aclient.close()
        return results[0].choices[0].text, [r.choices[0].message.content for r in results[1:]]

    plain, pets = asyncio.run(mixed())
    assert plain == alone  # batched with grammar rows, its row is not masked
    for pet in pets:
        check_pet(pet)
