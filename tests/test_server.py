"""`perfxlm serve` with the openai client and raw HTTP: vLLM's routes, response shapes, SSE
framing, usage, logprobs, n>1, and greedy text equal to `LLM.generate` and to vLLM's golden
outputs. Errors, auth, flags and disconnects are in tests/test_server_errors.py."""

import json
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import perfxlm
from perfxlm import SamplingParams
from tests.conftest import golden
from tests.server_util import DEFAULT_MODEL, RemoteServer

# fp32 (the golden outputs' dtype) and a small KV cache: this module's requests are short
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(256 << 20)]
COMPLETION_CHOICE_KEYS = ["index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
                          "token_ids"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with RemoteServer(SERVER_ARGS, log_path=tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def post(server, route: str, body: dict, **kw) -> requests.Response:
    return requests.post(server.url_for(route), json=body, timeout=120, **kw)


def sse(response: requests.Response) -> list[dict]:
    """The events of an SSE body, checked against vLLM's framing: `data: <json>\\n\\n` each,
    ending with `data: [DONE]\\n\\n`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.content.decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    assert events[-1] == "data: [DONE]" and "[DONE]" not in "".join(events[:-1])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def metrics(server) -> dict[tuple[str, tuple], float]:
    """/metrics samples by (name, sorted labels)."""
    text = requests.get(server.url_for("metrics"), timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def wait_idle(server, timeout: float = 20) -> dict:
    """/metrics once no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout
    label = {"model_name": DEFAULT_MODEL}
    while True:
        now = metrics(server)
        idle = (sample(now, "vllm:num_requests_running", **label), sample(now, "vllm:num_requests_waiting", **label),
                sample(now, "vllm:kv_cache_usage_perc", **label)) == (0, 0, 0)
        if idle or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


# ---- routes that are not generation ---------------------------------------------------------

def test_health_ping_version(server):
    assert requests.get(server.url_for("health"), timeout=10).status_code == 200
    assert requests.get(server.url_for("ping"), timeout=10).status_code == 200
    assert requests.post(server.url_for("ping"), timeout=10).status_code == 200
    assert requests.get(server.url_for("version"), timeout=10).json() == {"version": perfxlm.__version__}


def test_models_card(server, client):
    body = requests.get(server.url_for("v1", "models"), timeout=10).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert list(card) == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
    assert (card["id"], card["root"], card["owned_by"], card["max_model_len"]) == (DEFAULT_MODEL, DEFAULT_MODEL,
                                                                                   "vllm", 2048)
    perm = card["permission"][0]
    assert perm["object"] == "model_permission" and perm["id"].startswith("modelperm-")
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]


def test_tokenize_detokenize_round_trip(server, smol_tokenizer):
    text = "The capital of France is Paris, 2024."
    tok = post(server, "tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert tok["tokens"] == smol_tokenizer.encode(text) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 2048
    assert tok["token_strs"] == smol_tokenizer.convert_ids_to_tokens(tok["tokens"])
    assert post(server, "detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": text}
    chat = post(server, "tokenize", {"messages": MESSAGES}).json()
    assert chat["tokens"] == smol_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)
    assert chat["token_strs"] is None


def test_chat_page_is_served_at_root(server):
    r = requests.get(server.url_for(""), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<html" in r.text.lower()


# ---- greedy text: vLLM's golden outputs and LLM.generate --------------------------------------

def test_greedy_completions_equal_vllm_golden(server):
    ref = golden("golden_greedy_vllm_float32.json")
    prompts = [r["prompt"] for r in ref["results"]]
    body = post(server, "v1/completions", {"prompt": prompts, "max_tokens": ref["max_tokens"], "temperature": 0,
                                           "return_token_ids": True}).json()
    assert [c["index"] for c in body["choices"]] == list(range(len(prompts)))
    for choice, r in zip(body["choices"], ref["results"]):
        assert choice["prompt_token_ids"] == r["prompt_token_ids"]
        assert choice["token_ids"] == r["token_ids"], r["prompt"]
        assert choice["text"] == r["text"]
        assert choice["finish_reason"] == r["finish_reason"]
    assert body["usage"]["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in ref["results"])
    assert body["usage"]["completion_tokens"] == sum(len(r["token_ids"]) for r in ref["results"])


def test_completions_equal_llm_generate(server, client, smol_llm):
    prompts = ["Hello, my name is", "The future of AI is"]
    params = SamplingParams(temperature=0, max_tokens=24, stop=["."], logprobs=2)
    expected = smol_llm.generate(prompts, params, use_tqdm=False)
    got = client.completions.create(model=DEFAULT_MODEL, prompt=prompts, max_tokens=24, temperature=0, stop=["."],
                                    logprobs=2, extra_body={"return_token_ids": True})
    for choice, out in zip(got.choices, expected):
        ours = out.outputs[0]
        assert (choice.text, choice.token_ids, choice.finish_reason) == (ours.text, ours.token_ids,
                                                                          ours.finish_reason)
        assert choice.stop_reason == ours.stop_reason
        lp = choice.logprobs
        assert lp.token_logprobs == pytest.approx([ours.logprobs[i][t].logprob for i, t in
                                                   enumerate(ours.token_ids)], abs=1e-4)
        assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)  # the sampled token plus the top 2
        assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_chat_equals_llm_chat(server, client, smol_llm):
    expected = smol_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    got = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion" and got.model == DEFAULT_MODEL
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_body_has_vllms_keys_and_nulls(server):
    r = post(server, "v1/completions", {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "kv_transfer_params", "ec_transfer_params", "metrics"]
    assert body["id"].startswith("cmpl-") and len(body["id"]) == len("cmpl-") + 16
    assert list(body["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                                        "prompt_logprobs", "prompt_token_ids", "routed_experts"]
    assert list(body["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
                                   "completion_tokens_details"]
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


# ---- streaming --------------------------------------------------------------------------------

def test_completion_stream_equals_non_stream(server):
    body = {"prompt": "The president of the United States is", "max_tokens": 20, "temperature": 0}
    whole = post(server, "v1/completions", body).json()["choices"][0]
    events = sse(post(server, "v1/completions", {**body, "stream": True}))
    assert all(list(e["choices"][0]) == COMPLETION_CHOICE_KEYS for e in events)
    assert all("usage" not in e for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    finishing = [e for e in events if e["choices"][0]["finish_reason"] is not None]
    assert len(finishing) == 1 and finishing[0] is events[-1]
    assert finishing[0]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert "system_fingerprint" in finishing[0] and "system_fingerprint" not in events[0]
    assert len({e["id"] for e in events}) == 1


def test_chat_stream_equals_non_stream_with_the_openai_client(client):
    kw = dict(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == whole.finish_reason and reasons.count(None) == len(chunks) - 1


@pytest.mark.parametrize("route", ["v1/completions", "v1/chat/completions"])
def test_stream_options_usage(server, route):
    body = {"max_tokens": 5, "temperature": 0, "stream": True}
    body |= {"prompt": "Hello, my name is"} if route == "v1/completions" else {"messages": MESSAGES}
    plain = sse(post(server, route, body))
    assert all("usage" not in e for e in plain)

    final_only = sse(post(server, route, {**body, "stream_options": {"include_usage": True}}))
    *chunks, last = final_only
    assert all("usage" not in e for e in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
    assert set(last["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}

    continuous = sse(post(server, route, {**body, "stream_options": {"include_usage": True,
                                                                      "continuous_usage_stats": True}}))
    *chunks, last = continuous
    counts = [e["usage"]["completion_tokens"] for e in chunks]
    assert counts == sorted(counts) and counts[-1] == 5 and last["usage"] == final_only[-1]["usage"]
    assert all(e["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for e in chunks)


def test_openai_client_stream_include_usage(client):
    chunks = list(client.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=4,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


# ---- n > 1, several prompts, logprobs -----------------------------------------------------------

def test_n2_completions_and_chat(client):
    got = client.completions.create(model=DEFAULT_MODEL, prompt=["Once upon a time", "My favourite food is"],
                                    n=2, max_tokens=6, temperature=1.0, seed=3)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]  # prompt-major: prompt p, sample j -> p*n + j
    assert got.usage.completion_tokens == 4 * 6
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, n=2, max_tokens=6, seed=3,
                                          temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 12


def test_n2_streams_one_finish_chunk_per_choice(server):
    events = sse(post(server, "v1/completions", {"prompt": ["Once upon a time", "My favourite food is"], "n": 2,
                                                 "max_tokens": 6, "temperature": 1.0, "seed": 7, "stream": True,
                                                 "stream_options": {"include_usage": True}}))
    *chunks, usage = events
    assert all(len(e["choices"]) == 1 for e in chunks)
    finished = sorted(e["choices"][0]["index"] for e in chunks if e["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3]
    assert usage["usage"]["completion_tokens"] == 24
    chat = sse(post(server, "v1/chat/completions", {"messages": MESSAGES, "n": 2, "max_tokens": 5, "seed": 7,
                                                    "temperature": 1.0, "stream": True}))
    roles = [e["choices"][0]["index"] for e in chat if e["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]
    assert sorted(e["choices"][0]["index"] for e in chat if e["choices"][0]["finish_reason"]) == [0, 1]


def test_seeded_sampling_repeats(client):
    kw = dict(model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_chat_logprobs_top_k(client):
    got = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert "".join(c.token for c in content) == got.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())
    none = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=2, temperature=0,
                                          logprobs=True, top_logprobs=0)
    assert all(c.top_logprobs == [] for c in none.choices[0].logprobs.content)


def test_echo_with_logprobs_covers_the_prompt(server):
    prompt = "The capital of France is"
    body = post(server, "v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True,
                                           "logprobs": 1}).json()
    choice = body["choices"][0]
    assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    n_prompt = body["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])
    echo_only = post(server, "v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True}).json()
    assert echo_only["choices"][0]["text"] == prompt


def test_prompt_logprobs_and_token_prompts(server, smol_tokenizer):
    ids = smol_tokenizer.encode("The capital of France is")
    body = post(server, "v1/completions", {"prompt": ids, "max_tokens": 2, "temperature": 0,
                                           "prompt_logprobs": 1}).json()
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    assert all(str(t) in entry for t, entry in zip(ids[1:], entries[1:]))
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_metrics_count_what_the_client_saw(server):
    before = wait_idle(server)
    r = post(server, "v1/completions", {"prompt": "Hello, my name is", "max_tokens": 7, "temperature": 0,
                                        "ignore_eos": True}).json()
    after = wait_idle(server)
    label = {"model_name": DEFAULT_MODEL}

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **label, **labels) - sample(before, name, **label, **labels)

    assert grew("vllm:request_success_total", finished_reason="length") == 1
    assert grew("vllm:generation_tokens_total") == 7
    assert grew("vllm:prompt_tokens_total") == r["usage"]["prompt_tokens"]
    assert grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert sample(after, "vllm:num_requests_running", **label) == 0
    assert sample(after, "vllm:kv_cache_usage_perc", **label) == 0
    http = {"handler": "/v1/completions", "method": "POST", "status": "2xx"}  # vLLM's HTTP metrics too

    def served(samples: dict) -> float:  # absent until the route has answered once
        return sum(v for (n, lab), v in samples.items()
                   if n == "http_requests_total" and set(http.items()) <= set(lab))

    assert served(after) - served(before) == 1


# ---- disconnects and bad requests beside good ones -----------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_and_frees_kv(server, stream):
    label = {"model_name": DEFAULT_MODEL, "finished_reason": "abort"}
    aborted = sample(wait_idle(server), "vllm:request_success_total", **label)
    long = {"prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True, "stream": stream}
    if stream:
        with post(server, "v1/completions", long, stream=True) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith(b"data: {")  # it is running
    else:
        with pytest.raises(requests.Timeout):
            requests.post(server.url_for("v1/completions"), json=long, timeout=2)
    after = wait_idle(server)
    assert sample(after, "vllm:num_requests_running", model_name=DEFAULT_MODEL) == 0
    assert sample(after, "vllm:kv_cache_usage_perc", model_name=DEFAULT_MODEL) == 0
    assert sample(after, "vllm:request_success_total", **label) == aborted + 1


def test_bad_requests_leave_a_running_stream_alone(server):
    body = {"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    alone = "".join(e["choices"][0]["text"] for e in sse(post(server, "v1/completions", body))[:-1])
    with post(server, "v1/completions", body, stream=True) as r:
        lines = r.iter_lines(delimiter=b"\n\n")
        first = next(lines)
        for bad in ({"prompt": "x", "temperature": -1}, {"prompt": [10 ** 9]}, {"prompt": "x", "model": "nope"},
                    {"prompt": "x", "logprobs": 99}):
            assert post(server, "v1/completions", bad).status_code in (400, 404)
        rest = [first, *lines]
    events = [json.loads(e.removeprefix(b"data: ")) for e in rest if e and e != b"data: [DONE]"]
    assert events[-1]["usage"]["completion_tokens"] == 40
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == alone
