"""`perfxlm serve`'s errors, API key, flags and generation_config defaults, on a tiny random
Llama (fast to load): vLLM's error JSON and status codes (400, never 422; 404 for an unknown
model; 401 without the key), in-stream errors, aliases, X-Request-Id and CORS."""

import json
import shutil

import pytest
import requests

from perfxlm.entrypoints.openai.cli_args import FlexibleArgumentParser, make_arg_parser, validate_parsed_serve_args
from tests.server_util import RemoteServer

KEY = "sekret"
ORIGIN = "http://example.com"
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a generation_config.json that makes greedy, 7-token answers the default."""
    path = tmp_path_factory.mktemp("tiny_gen") / "model"
    shutil.copytree(tiny_llama_dir, path)
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen_path.write_text(json.dumps({**gen, "temperature": 0.0, "max_new_tokens": 7}))
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ["--max-model-len", "256", "--served-model-name", "tiny", "tiny-alias", "--max-logprobs", "5",
            "--enable-request-id-headers", "--allowed-origins", json.dumps([ORIGIN]),
            "--kv-cache-memory-bytes", str(32 << 20), "--root-path", "/llm"]
    srv = RemoteServer(args, model=str(model_dir), env={"VLLM_API_KEY": KEY},
                       log_path=tmp_path_factory.mktemp("server") / "server.log")
    srv.api_key = KEY  # the key comes from the environment, not --api-key
    with srv:
        yield srv


def post(server, route: str, body: dict | str, key: str | None = KEY, **headers: str) -> requests.Response:
    headers = {"Content-Type": "application/json", **headers}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(server.url_for(route), data=data, headers=headers, timeout=60)


# ---- the API key ---------------------------------------------------------------------------------

def test_api_key_guards_v1_only(server):
    body = {"prompt": "Hello", "max_tokens": 2}
    for key in (None, "wrong"):
        r = post(server, "v1/completions", body, key=key)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    assert requests.get(server.url_for("v1", "models"), timeout=10).status_code == 401
    assert post(server, "v1/completions", body).status_code == 200
    assert post(server, "v1/completions", body, key=None, Authorization=f"bearer {KEY}").status_code == 200
    for route in ("health", "version", "metrics", "ping"):
        assert requests.get(server.url_for(route), timeout=10).status_code == 200, route
    assert post(server, "tokenize", {"prompt": "Hello"}, key=None).status_code == 200


def test_root_path_prefix(server):
    """Behind a proxy that keeps the --root-path prefix, routes and the key check still apply."""
    url = server.url_for("llm", "v1", "models")
    assert requests.get(url, timeout=10).status_code == 401
    r = requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    assert requests.get(server.url_for("llm", "health"), timeout=10).status_code == 200


def test_cors_preflight_is_not_guarded(server):
    r = requests.options(server.url_for("v1", "completions"), timeout=10,
                         headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    other = post(server, "v1/completions", {"prompt": "Hi", "max_tokens": 1}, Origin="http://elsewhere.org")
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


# ---- names, ids, defaults ------------------------------------------------------------------------

def test_served_model_names_and_aliases(server, model_dir):
    cards = server.client().models.list().data
    assert [c.id for c in cards] == ["tiny", "tiny-alias"]
    assert {c.root for c in cards} == {str(model_dir)} and {c.max_model_len for c in cards} == {256}
    for name in ("tiny-alias", None, ""):
        body = {"prompt": "Hello", "max_tokens": 2} | ({"model": name} if name is not None else {})
        assert post(server, "v1/completions", body).json()["model"] == "tiny"  # always the first name
    r = post(server, "v1/completions", {"prompt": "Hello", "model": "gpt-4"})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "The model `gpt-4` does not exist. Valid aliases: tiny, tiny-alias.",
                                 "type": "NotFoundError", "param": "model", "code": 404}


def test_x_request_id(server):
    r = post(server, "v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}, **{"X-Request-Id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1" and r.json()["id"] == "chatcmpl-abc-1"
    fresh = post(server, "v1/completions", {"prompt": "Hi", "max_tokens": 1})
    assert len(fresh.headers["x-request-id"]) == 32 and fresh.json()["id"].startswith("cmpl-")


def test_generation_config_supplies_chat_defaults(server):
    """max_new_tokens (7) and temperature (0) come from generation_config.json; the request's
    own values win; completions keep vLLM's max_tokens default of 16."""
    client = server.client()
    answers = [client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"ignore_eos": True})
               for _ in range(2)]
    assert [a.usage.completion_tokens for a in answers] == [7, 7]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content  # greedy
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3,
                                          extra_body={"ignore_eos": True}).usage.completion_tokens == 3
    sampled = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, temperature=1.0, seed=5,
                                             extra_body={"ignore_eos": True})
    assert len(sampled.choices) == 2  # n=2 is refused for greedy: the request's temperature won
    done = client.completions.create(model="tiny", prompt="Hello", extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 16


# ---- errors --------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
BAD_REQUESTS = [
    ("v1/completions", "{not json", 400, "Bad Request", "body.1"),
    ("v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "Bad Request", "body.max_tokens"),
    ("v1/completions", {"prompt": "x", "temperature": -1}, 400, "BadRequestError", "temperature"),
    ("v1/completions", {"prompt": "x", "top_p": 0}, 400, "BadRequestError", "top_p"),
    ("v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "BadRequestError",
     "stream_options"),
    ("v1/completions", {"prompt": "x", "logprobs": 6}, 400, "BadRequestError", "logprobs"),
    ("v1/completions", {"prompt": "x", "logprobs": -2}, 400, "BadRequestError", "logprobs"),
    ("v1/completions", {"prompt": "x", "n": 2, "temperature": 0}, 400, "BadRequestError", None),
    ("v1/completions", {"prompt": "word " * 300}, 400, "BadRequestError", "input_tokens"),
    ("v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "BadRequestError", "max_tokens"),
    ("v1/completions", {"prompt": [10 ** 9]}, 400, "BadRequestError", "prompt"),
    ("v1/completions", {"prompt": ""}, 400, "BadRequestError", "prompt"),
    ("v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "BadRequestError",
     "prompt_logprobs"),
    ("v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "Bad Request", "body.stop"),
    ("v1/completions", {"prompt": "x", "use_beam_search": True}, 501, "NotImplementedError", None),
    ("v1/chat/completions", {"messages": "hi"}, 400, "Bad Request", "body.messages"),
    ("v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "BadRequestError", "messages"),
    ("v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, 400, "BadRequestError", "top_logprobs"),
    ("v1/chat/completions", {"messages": MESSAGES, "continue_final_message": True}, 400, "BadRequestError",
     "continue_final_message"),
    ("v1/chat/completions", {"messages": MESSAGES, "tools": TOOLS}, 400, "BadRequestError", "tool_choice"),
    ("v1/chat/completions", {"messages": MESSAGES, "chat_template": "{{ messages }}"}, 400, "BadRequestError",
     "chat_template"),
    ("v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "BadRequestError",
     "max_tokens"),
    ("v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}}, 400,
     "BadRequestError", "response_format"),
    ("tokenize", {"prompt": 5}, 400, "Bad Request", "body.prompt"),
    ("detokenize", {"tokens": [10 ** 9]}, 400, "BadRequestError", "tokens"),
]


@pytest.mark.parametrize("route,body,status,err_type,param", BAD_REQUESTS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_vllms_error_json(server, route, body, status, err_type, param):
    r = post(server, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert list(r.json()) == ["error"] and list(error) == ["message", "type", "param", "code"]
    assert (error["type"], error["param"], error["code"]) == (err_type, param, status)
    assert error["message"]


def test_wrong_content_type_unknown_path_and_method(server):
    r = requests.post(server.url_for("v1", "completions"), data='{"prompt": "x"}', timeout=10,
                      headers={"Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("1 validation error:\n  Unsupported Media Type: Only "
                                            "'application/json' is allowed")
    assert requests.get(server.url_for("nowhere"), timeout=10).json() == {"detail": "Not Found"}
    assert requests.get(server.url_for("tokenize"), timeout=10).status_code == 405


def test_error_after_the_stream_started_is_an_event(server):
    """An engine-side refusal (logprobs over --max-logprobs) once the 200 is sent: one error
    event in Python's json.dumps spacing, then [DONE], as vLLM."""
    r = post(server, "v1/completions", {"prompt": "x", "logprobs": 6, "stream": True})
    assert r.status_code == 200
    events = r.text.split("\n\n")
    assert events[0].startswith('data: {"error": {"message": ') and events[1:] == ["data: [DONE]", ""]
    error = json.loads(events[0].removeprefix("data: "))["error"]
    assert (error["type"], error["code"], error["param"]) == ("BadRequestError", 400, "logprobs")


def test_server_answers_after_the_errors(server):
    assert requests.get(server.url_for("health"), timeout=10).status_code == 200
    good = post(server, "v1/completions", {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4


# ---- flags ---------------------------------------------------------------------------------------

def parse(*argv: str):
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(list(argv))
    validate_parsed_serve_args(args)
    return args


def test_flags_take_vllms_spellings(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args = parse("--model", "some/model", "--max_model_len", "1k", "--no-enable-prefix-caching",
                 "--allowed-origins", '["*"]', "--api-key", "a", "b")
    assert (args.model, args.max_model_len, args.enable_prefix_caching) == ("some/model", 1000, False)
    assert (args.port, args.allowed_origins, args.api_key, args.uvicorn_log_level) == (8000, ["*"], ["a", "b"],
                                                                                       "info")
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert parse("m").api_key == ["from-env"]
    assert parse("m", "--chat-template", "{{ messages[0].content }}").chat_template == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        parse("m", "--chat-template", "{% if %}")
    with pytest.raises(SystemExit):  # argparse: a JSON list is required
        parse("m", "--allowed-origins", "*")
