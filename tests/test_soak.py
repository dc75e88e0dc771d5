"""Soak and abuse of `perfxlm serve`: 1,000 requests at concurrency 32 over
127.0.0.1, a seeded mix of well-formed completions and chats (streaming and not, greedy, n=2
sampling, logprobs), client cancels, and bad requests (malformed JSON, wrong types, missing
fields, unknown models, huge max_tokens, prompts over max_model_len, a wrong content type).

Afterwards the server must answer /health, every greedy answer must equal the one the same server
gave to that request alone (batch-invariant mode makes a greedy request's tokens independent of
its batch), every bad request must get vLLM's 4xx with an error message, nothing a 5xx, every KV
block must be free, and /metrics must agree with what the client saw."""

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.server_util import RemoteServer

SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32"]
NUM_REQUESTS = 1000
CONCURRENCY = 32
SEED = 23
MAX_TOKENS = (1, 2, 4, 8, 16)  # greedy answers are short so that the soak fits in a few minutes
TOP_LOGPROBS = 2
LOGPROB_TOLERANCE = 1e-4       # batch-invariant logits: the same logprobs in any batch, up to printing
# A cancelled request asks for this many tokens with ignore_eos: it cannot finish in the second or
# so before its client goes away, so a cancel that reached the engine must end as an abort.
CANCEL_BUDGET = 480
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Count to three."}],
]
ROUTES = {"completion": "v1/completions", "chat": "v1/chat/completions"}
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass
class Call:
    """One request of the soak and what vLLM would answer it."""

    kind: str                     # what it exercises, e.g. "chat stream" or "bad: unknown model"
    api: str                      # "completion" or "chat"
    body: Any                     # a dict sent as JSON, or raw bytes sent as they are
    status: int = 200
    message: str = ""             # a fragment of vLLM's error message, for a bad request
    content_type: str = "application/json"
    ref: tuple[str, int, int] | None = None  # (api, prompt index, max_tokens) of a greedy request
    cancel_after: int = 0         # a stream the client drops after this many events
    timeout: float | None = None  # a non-streaming request the client gives up on after this long

    def describe(self) -> str:
        body = self.body.decode("utf-8", "replace") if isinstance(self.body, bytes) else json.dumps(self.body)
        return f"[{self.kind}] {self.api} {body[:240]}"


@dataclass
class Result:
    status: int | None = None
    body: Any = None                                   # a non-streaming answer's JSON
    events: list[dict] = field(default_factory=list)   # a stream's events, [DONE] excluded
    framing: str = ""                                  # what is wrong with the SSE framing, if anything
    cancelled: bool = False                            # the client left before the answer ended


@dataclass
class Choice:
    """One choice of an answer, streamed or not, in one shape."""

    text: str = ""
    token_ids: list[int] | None = None
    finish: list[str] = field(default_factory=list)   # every finish_reason sent for it
    logprobs: list[float] | None = None               # the sampled tokens' logprobs
    tops: list[list[float]] | None = None             # each position's top logprobs
    usage: list[int] = field(default_factory=list)    # completion_tokens of each chunk (continuous usage)
    events: int = 0


@dataclass
class Ref:
    text: str
    token_ids: list[int]
    finish: str
    prompt_tokens: int
    logprobs: list[float]


# ---- the mix ------------------------------------------------------------------------------------

def greedy_body(api: str, idx: int, max_tokens: int, rng: random.Random) -> dict:
    if api == "completion":
        body: dict[str, Any] = {"prompt": PROMPTS[idx], "max_tokens": max_tokens, "temperature": 0}
    else:
        key = rng.choice(["max_tokens", "max_completion_tokens"])
        body = {"messages": CONVERSATIONS[idx], key: max_tokens, "temperature": 0}
    if rng.random() < 0.5:
        body["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return body


def well_formed(rng: random.Random, stream: bool) -> Call:
    api = rng.choice(["completion", "chat"])
    idx = rng.randrange(len(PROMPTS if api == "completion" else CONVERSATIONS))
    max_tokens = rng.choice(MAX_TOKENS)
    body = greedy_body(api, idx, max_tokens, rng)
    body["return_token_ids"] = rng.random() < 0.5
    if rng.random() < 0.25:
        body.update({"logprobs": TOP_LOGPROBS} if api == "completion" else {"logprobs": True,
                                                                             "top_logprobs": TOP_LOGPROBS})
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": rng.random() < 0.5}
    return Call(f"{api}{' stream' if stream else ''}", api, body, ref=(api, idx, max_tokens))


def sampled(rng: random.Random) -> Call:
    api = rng.choice(["completion", "chat"])
    idx = rng.randrange(len(PROMPTS if api == "completion" else CONVERSATIONS))
    body = greedy_body(api, idx, rng.choice(MAX_TOKENS), rng)
    body.update(n=2, temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 31), return_token_ids=True)
    if rng.random() < 0.5:
        body.update(stream=True, stream_options={"include_usage": True})
    return Call(f"{api} n=2 sampled{' stream' if body.get('stream') else ''}", api, body, ref=(api, idx, 0))


def cancelled(rng: random.Random, stream: bool) -> Call:
    api = rng.choice(["completion", "chat"])
    idx = rng.randrange(len(PROMPTS if api == "completion" else CONVERSATIONS))
    body = greedy_body(api, idx, CANCEL_BUDGET, rng)
    body.update(ignore_eos=True, return_token_ids=True)
    if stream:
        body["stream"] = True
        return Call(f"{api} stream cancelled", api, body, cancel_after=rng.randint(1, 3))
    return Call(f"{api} timed out", api, body, timeout=rng.uniform(0.05, 0.8))


def bad(rng: random.Random) -> Call:
    """One of the requests vLLM refuses, with the status and message fragment it answers."""
    stream = rng.random() < 0.5
    comp = {"prompt": rng.choice(PROMPTS), "max_tokens": 2, "temperature": 0, "stream": stream}
    chat = {"messages": rng.choice(CONVERSATIONS), "max_tokens": 2, "temperature": 0, "stream": stream}
    no_stream = {k: v for k, v in comp.items() if k != "stream"}
    choices = [
        Call("bad: malformed JSON", "completion", json.dumps(comp).encode()[:-4], 400, "JSON decode error"),
        Call("bad: malformed JSON", "chat", b'{"messages": [{"role": "user", "content": "hi"}', 400,
             "JSON decode error"),
        Call("bad: body not an object", "chat", b"[1, 2]", 400, "valid dictionary"),
        Call("bad: wrong type", "completion", {**comp, "max_tokens": "ten"}, 400, "valid integer"),
        Call("bad: wrong type", "completion", {**comp, "temperature": "hot"}, 400, "valid number"),
        Call("bad: wrong type", "chat", {**chat, "messages": 5}, 400, "valid list"),
        Call("bad: wrong type", "chat", {**chat, "messages": [5]}, 400, "valid dictionary"),
        Call("bad: missing field", "completion", {k: v for k, v in comp.items() if k != "prompt"}, 400,
             "prompt"),
        Call("bad: missing field", "chat", {k: v for k, v in chat.items() if k != "messages"}, 400,
             "Field required"),
        Call("bad: no messages", "chat", {**chat, "messages": []}, 400, "message"),
        Call("bad: unknown model", "completion", {**comp, "model": "no-such-model"}, 404, "does not exist"),
        Call("bad: unknown model", "chat", {**chat, "model": "gpt-4o"}, 404, "does not exist"),
        Call("bad: huge max_tokens", "completion", {**comp, "max_tokens": 10 ** 9}, 400,
             "cannot be greater than max_model_len"),
        Call("bad: huge max_tokens", "chat", {**chat, "max_completion_tokens": 10 ** 9}, 400,
             "cannot be greater than max_model_len"),
        Call("bad: prompt over max_model_len", "completion", {**comp, "prompt": "hello " * 600}, 400,
             "maximum context length"),
        Call("bad: prompt over max_model_len", "chat",
             {**chat, "messages": [{"role": "user", "content": "hi " * 600}]}, 400, "maximum context length"),
        Call("bad: prompt over max_model_len", "completion", {**comp, "prompt": "x" * 60000}, 400,
             "context length"),
        Call("bad: token out of vocabulary", "completion", {**comp, "prompt": [999999]}, 400, "out of vocabulary"),
        Call("bad: wrong content type", "completion", json.dumps(comp).encode(), 400,
             "Only 'application/json' is allowed", content_type="text/plain"),
        Call("bad: n=2 greedy", "completion", {**comp, "n": 2}, 400, "greedy"),
        # vLLM checks max_logprobs in the engine: a stream has sent its 200 and gets an error event
        Call("bad: too many logprobs", "completion", {**comp, "logprobs": 21}, 200 if stream else 400,
             "max allowed"),
        Call("bad: top_logprobs without logprobs", "chat", {**chat, "top_logprobs": 2}, 400, "logprobs"),
        Call("bad: negative temperature", "chat", {**chat, "temperature": -1}, 400, "temperature"),
        Call("bad: stream_options without stream", "completion",
             {**no_stream, "stream_options": {"include_usage": True}}, 400, "stream"),
    ]
    return rng.choice(choices)


def soak_calls(rng: random.Random) -> list[Call]:
    makers = [(0.12, lambda: well_formed(rng, False)), (0.22, lambda: well_formed(rng, True)),
              (0.05, lambda: sampled(rng)), (0.08, lambda: cancelled(rng, True)),
              (0.05, lambda: cancelled(rng, False)), (0.48, lambda: bad(rng))]
    weights, funcs = zip(*makers)
    return [rng.choices(funcs, weights)[0]() for _ in range(NUM_REQUESTS)]


# ---- the client ---------------------------------------------------------------------------------

async def send(session: aiohttp.ClientSession, url: str, call: Call) -> Result:
    res = Result()
    data = call.body if isinstance(call.body, bytes) else json.dumps(call.body).encode()
    timeout = aiohttp.ClientTimeout(total=call.timeout or 300)
    try:
        async with session.post(url, data=data, headers={"Content-Type": call.content_type},
                                timeout=timeout) as resp:
            res.status = resp.status
            if resp.content_type != "text/event-stream":
                raw = await resp.read()
                try:
                    res.body = json.loads(raw)
                except ValueError:
                    res.body = raw.decode("utf-8", "replace")
            elif call.cancel_after:
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        res.events.append(json.loads(line[len(b"data: "):]))
                    if len(res.events) >= call.cancel_after:
                        res.cancelled = True
                        resp.close()  # the connection goes: the server sees a disconnect
                        break
            else:
                res.events, res.framing = parse_sse((await resp.read()).decode())
    except asyncio.TimeoutError:
        res.cancelled = True
    except aiohttp.ClientError as e:  # the server dropped the connection: reported with the request
        res.body = f"client error: {e!r}"
    return res


def parse_sse(raw: str) -> tuple[list[dict], str]:
    """vLLM's framing: `data: <json>\\n\\n` events, the last one `data: [DONE]\\n\\n`."""
    frames = raw.split("\n\n")
    if frames[-1] != "" or len(frames) < 2 or frames[-2] != "data: [DONE]":
        return [], f"stream does not end with 'data: [DONE]\\n\\n': {raw[-200:]!r}"
    bad_frames = [f for f in frames[:-2] if not f.startswith("data: {") or "\n" in f]
    if bad_frames:
        return [], f"frames outside vLLM's framing: {bad_frames[:2]!r}"
    return [json.loads(f[len("data: "):]) for f in frames[:-2]], ""


async def run_soak(server: RemoteServer, calls: list[Call]) -> list[Result]:
    results: list[Result | None] = [None] * len(calls)
    todo = iter(range(len(calls)))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in todo:
            results[i] = await send(session, server.url_for(ROUTES[calls[i].api]), calls[i])

    # a fresh connection per request, as separate clients (and no keep-alive race with uvicorn)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return results


# ---- reading answers ----------------------------------------------------------------------------

def choices_of(call: Call, res: Result) -> tuple[dict[int, Choice], dict | None, list[str]]:
    """The choices, the final usage and what is malformed, from a body or a stream."""
    chat, out, usage, problems = call.api == "chat", {}, None, []
    if res.events or res.framing:
        problems += [res.framing] if res.framing else []
        for ev in res.events:
            if "error" in ev:
                problems.append(f"error event in the stream: {ev['error']}")
                continue
            if not ev["choices"]:
                usage = ev.get("usage")
                continue
            for c in ev["choices"]:
                ch = out.setdefault(c["index"], Choice())
                if chat and ch.events == 0 and c["delta"].get("role") != "assistant":
                    problems.append(f"first chunk of choice {c['index']} is not the role chunk: {c}")
                if ch.finish:
                    problems.append(f"a chunk after choice {c['index']} finished: {c}")
                ch.events += 1
                if ev.get("usage"):
                    ch.usage.append(ev["usage"]["completion_tokens"])
                add_piece(ch, c, chat, (c["delta"].get("content") or "") if chat else c["text"])
    elif isinstance(res.body, dict) and "choices" in res.body:
        usage = res.body.get("usage")
        for c in res.body["choices"]:
            ch = out.setdefault(c["index"], Choice())
            add_piece(ch, c, chat, c["message"]["content"] if chat else c["text"])
    else:
        problems.append(f"no choices in the answer: {str(res.body)[:300]}")
    return out, usage, problems


def add_piece(ch: Choice, c: dict, chat: bool, text: str) -> None:
    ch.text += text
    if c.get("token_ids") is not None:
        ch.token_ids = (ch.token_ids or []) + c["token_ids"]
    if c.get("finish_reason") is not None:
        ch.finish.append(c["finish_reason"])
    lp = c.get("logprobs")
    if lp:
        if chat:
            ch.logprobs = (ch.logprobs or []) + [e["logprob"] for e in lp["content"]]
            ch.tops = (ch.tops or []) + [[t["logprob"] for t in e["top_logprobs"]] for e in lp["content"]]
        else:
            ch.logprobs = (ch.logprobs or []) + lp["token_logprobs"]
            ch.tops = (ch.tops or []) + [list(t.values()) for t in lp["top_logprobs"]]


def check_greedy(call: Call, res: Result, ref: Ref) -> list[str]:
    choices, usage, problems = choices_of(call, res)
    if set(choices) != {0}:
        return problems + [f"choices {sorted(choices)}, not [0]"]
    ch, body = choices[0], call.body
    if ch.text != ref.text:
        problems.append(f"text {ch.text!r} != reference {ref.text!r}")
    if ch.finish != [ref.finish]:
        problems.append(f"finish_reason(s) {ch.finish} != reference {ref.finish!r}")
    if body.get("return_token_ids") and ch.token_ids != ref.token_ids:
        problems.append(f"token_ids {ch.token_ids} != reference {ref.token_ids}")
    if body.get("logprobs"):
        got = ch.logprobs or []
        if len(got) != len(ref.logprobs) or any(abs(a - b) > LOGPROB_TOLERANCE for a, b in zip(got, ref.logprobs)):
            problems.append(f"logprobs {got} != reference {ref.logprobs}")
        sizes = {TOP_LOGPROBS} if call.api == "chat" else {TOP_LOGPROBS, TOP_LOGPROBS + 1}
        for pos, (lp, top) in enumerate(zip(got, ch.tops or [])):
            if len(top) not in sizes or lp < max(top) - LOGPROB_TOLERANCE:
                problems.append(f"position {pos}: greedy token's logprob {lp} under its top_logprobs {top}")
    options = body.get("stream_options") or {}
    if options.get("continuous_usage_stats") and (len(ch.usage) != ch.events or ch.usage != sorted(ch.usage)
                                                  or ch.usage[-1:] != [len(ref.token_ids)]):
        problems.append(f"continuous usage {ch.usage} over {ch.events} chunks, ending at {len(ref.token_ids)}")
    wants_usage = not body.get("stream") or options.get("include_usage")
    expected = {"prompt_tokens": ref.prompt_tokens, "completion_tokens": len(ref.token_ids),
                "total_tokens": ref.prompt_tokens + len(ref.token_ids)}
    if wants_usage and {k: (usage or {}).get(k) for k in expected} != expected:
        problems.append(f"usage {usage} != {expected}")
    return problems


def check_sampled(call: Call, res: Result, prompt_tokens: int) -> list[str]:
    choices, usage, problems = choices_of(call, res)
    max_tokens = call.body.get("max_tokens") or call.body.get("max_completion_tokens")
    if set(choices) != {0, 1}:
        return problems + [f"choices {sorted(choices)}, not [0, 1]"]
    for i, ch in choices.items():
        n = len(ch.token_ids or [])
        # EOS may be the last token allowed: "stop" with max_tokens tokens is fine, "length" with fewer is not
        if len(ch.finish) != 1 or ch.finish[0] not in ("stop", "length") or not 1 <= n <= max_tokens or (
                ch.finish[0] == "length" and n != max_tokens):
            problems.append(f"choice {i}: finish_reason(s) {ch.finish} with {n} of {max_tokens} tokens")
    generated = sum(len(ch.token_ids or []) for ch in choices.values())
    expected = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated}
    if {k: (usage or {}).get(k) for k in expected} != expected:
        problems.append(f"usage {usage} != {expected}")
    return problems


def check_bad(call: Call, res: Result) -> list[str]:
    err = res.body.get("error") if isinstance(res.body, dict) else None
    if res.status == call.status == 200:  # refused once the stream began: one error event, then [DONE]
        if res.framing or len(res.events) != 1 or not isinstance(err := res.events[0].get("error"), dict):
            return [f"not one error event: {res.framing or res.events}"]
        return [] if call.message in str(err.get("message")) and err.get("code") == 400 else [f"error event {err}"]
    if res.status != call.status:
        return [f"HTTP {res.status}, not {call.status}: {str(res.body)[:300]}"]
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or err.get("code") != call.status:
        return [f"not vLLM's error JSON: {str(res.body)[:300]}"]
    if call.message not in err["message"]:
        return [f"error message {err['message'][:300]!r} lacks {call.message!r}"]
    return []


# ---- the soak -----------------------------------------------------------------------------------

def metrics(server: RemoteServer) -> dict[tuple[str, tuple], float]:
    text = requests.get(server.url_for("metrics"), timeout=30).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))):
            s.value for family in text_string_to_metric_families(text) for s in family.samples}


def references(server: RemoteServer) -> dict[tuple[str, int, int], Ref]:
    """Each greedy (api, prompt, max_tokens) answered alone, with its token ids and logprobs."""
    refs = {}
    for api, prompts in (("completion", PROMPTS), ("chat", CONVERSATIONS)):
        for idx in range(len(prompts)):
            for max_tokens in MAX_TOKENS:
                body = greedy_body(api, idx, max_tokens, random.Random(0))
                body.update({"return_token_ids": True, "logprobs": TOP_LOGPROBS} if api == "completion" else
                            {"return_token_ids": True, "logprobs": True, "top_logprobs": TOP_LOGPROBS})
                r = requests.post(server.url_for(ROUTES[api]), json=body, timeout=120)
                assert r.status_code == 200, f"reference {api} {body}: HTTP {r.status_code} {r.text[:300]}"
                c, usage = r.json()["choices"][0], r.json()["usage"]
                logprobs = ([e["logprob"] for e in c["logprobs"]["content"]] if api == "chat"
                            else c["logprobs"]["token_logprobs"])
                refs[api, idx, max_tokens] = Ref(c["message"]["content"] if api == "chat" else c["text"],
                                                 c["token_ids"], c["finish_reason"], usage["prompt_tokens"],
                                                 logprobs)
    return refs


@dataclass
class Soak:
    server: RemoteServer
    calls: list[Call]
    results: list[Result]
    refs: dict[tuple[str, int, int], Ref]
    before: dict[tuple[str, tuple], float]


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> Iterator[Soak]:
    log = tmp_path_factory.mktemp("soak") / "server.log"
    with RemoteServer(SERVER_ARGS, env={"PERFXLM_BATCH_INVARIANT": "1"}, log_path=log) as server:
        before = metrics(server)
        refs = references(server)
        calls = soak_calls(random.Random(SEED))
        yield Soak(server, calls, asyncio.run(run_soak(server, calls)), refs, before)


def test_references_are_greedy_prefixes(soak):
    """Alone, a greedy answer with fewer max_tokens is a prefix of the longer one."""
    longest = max(MAX_TOKENS)
    wrong = [f"{key}: {ref.token_ids} is not a prefix of {soak.refs[key[:2] + (longest,)].token_ids}"
             for key, ref in soak.refs.items()
             if ref.token_ids != soak.refs[key[:2] + (longest,)].token_ids[:key[2]]]
    assert not wrong, "\n".join(wrong)


def test_server_alive_and_no_5xx(soak):
    assert soak.server.proc.poll() is None, f"the server exited with {soak.server.proc.returncode}"
    assert requests.get(soak.server.url_for("health"), timeout=30).status_code == 200
    fives = [f"{c.describe()}: HTTP {r.status} {str(r.body)[:200]}" for c, r in zip(soak.calls, soak.results)
             if r.status is not None and r.status >= 500]
    assert not fives, f"{len(fives)} answers were 5xx:\n" + "\n".join(fives[:20])
    log = soak.server.log_path.read_text(errors="replace")
    bad_lines = [line for line in log.splitlines() if re.search(r'^(ERROR|CRITICAL)|Traceback|HTTP/1\.1" 5\d\d', line)]
    assert not bad_lines, "the server logged failures:\n" + "\n".join(bad_lines[:30])


def test_well_formed_requests_get_exact_answers(soak):
    problems, checked = [], 0
    prompt_tokens = {(api, idx): ref.prompt_tokens for (api, idx, _), ref in soak.refs.items()}
    for call, res in zip(soak.calls, soak.results):
        if call.ref is None or res.cancelled:
            continue
        if res.status != 200:
            found = [f"HTTP {res.status}: {str(res.body)[:300]}"]
        elif call.body.get("n") == 2:
            found = check_sampled(call, res, prompt_tokens[call.ref[:2]])
        else:
            found = check_greedy(call, res, soak.refs[call.ref])
        checked += 1
        problems += [f"{call.describe()}: {p}" for p in found]
    assert checked > NUM_REQUESTS // 3, f"only {checked} well-formed requests were checked"
    assert not problems, f"{len(problems)} problems with well-formed requests:\n" + "\n".join(problems[:20])


def test_bad_requests_get_4xx_with_a_message(soak):
    problems = [f"{call.describe()}: {p}" for call, res in zip(soak.calls, soak.results)
                if call.kind.startswith("bad:") for p in check_bad(call, res)]
    assert sum(c.kind.startswith("bad:") for c in soak.calls) > NUM_REQUESTS // 4
    assert not problems, f"{len(problems)} problems with bad requests:\n" + "\n".join(problems[:20])


def test_cancels_happened(soak):
    """The cancels must really leave mid-answer, or the abort checks below prove nothing."""
    streams = [(c, r) for c, r in zip(soak.calls, soak.results) if c.cancel_after]
    timeouts = [(c, r) for c, r in zip(soak.calls, soak.results) if c.timeout]
    wrong = [f"{c.describe()}: HTTP {r.status} {str(r.body)[:200]}" for c, r in streams + timeouts
             if r.status not in (None, 200)]
    assert not wrong, "cancelled requests got errors:\n" + "\n".join(wrong[:20])
    assert sum(r.cancelled for _, r in streams) > 40 and sum(r.cancelled for _, r in timeouts) > 20


def test_kv_blocks_freed_and_queues_empty(soak):
    deadline = time.monotonic() + 10
    while True:
        now = metrics(soak.server)
        gauges = {name: now.get((name, ())) for name in
                  ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")}
        if not any(gauges.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert gauges == dict.fromkeys(gauges, 0.0), f"once idle: {gauges} (every KV block should be free)"


def test_metrics_agree_with_the_client(soak):
    after = metrics(soak.server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - soak.before.get(key, 0.0)

    finished = Counter(ref.finish for ref in soak.refs.values())
    generated = sum(len(ref.token_ids) for ref in soak.refs.values())
    prompted = sum(ref.prompt_tokens for ref in soak.refs.values())
    stream_cancels = 0
    for call, res in zip(soak.calls, soak.results):
        if call.kind.startswith("bad:") or res.status != 200:
            continue  # a bad request never reaches the engine
        choices, usage, _ = choices_of(call, res)
        for ch in choices.values():
            finished.update(ch.finish)
        if res.cancelled or usage is None and call.ref is None:  # token ids were asked for
            generated += sum(len(ch.token_ids or []) for ch in choices.values())
            stream_cancels += res.cancelled and bool(call.cancel_after) and not any(c.finish for c in choices.values())
        elif usage is not None:
            generated += usage["completion_tokens"]
            prompted += usage["prompt_tokens"]
        else:  # a greedy stream without usage: its tokens are the reference's (checked above)
            generated += len(soak.refs[call.ref].token_ids)
            prompted += soak.refs[call.ref].prompt_tokens
    timeouts = sum(r.cancelled for c, r in zip(soak.calls, soak.results) if c.timeout)
    # Every sequence the client saw finish was counted under its reason, and nothing else
    # finished: a cancelled request cannot reach its CANCEL_BUDGET tokens before its client goes.
    counted = {reason: delta("vllm:request_success_total", finished_reason=reason) for reason in FINISH_REASONS}
    expected = {"stop": finished["stop"], "length": finished["length"], "error": 0, "repetition": 0}
    assert {r: counted[r] for r in expected} == expected, \
        f"vllm:request_success_total {counted}, but the client saw these sequences finish: {expected}"
    # A stream dropped mid-answer had reached the engine (it had sent tokens), so it is an abort.
    # A non-streaming request that timed out may have been dropped before the engine saw it.
    assert stream_cancels <= counted["abort"] <= stream_cancels + timeouts, \
        f"{counted['abort']} aborts counted for {stream_cancels} streams dropped mid-answer and {timeouts} timeouts"
    # Tokens of the greedy and sampled answers, plus those streamed before a cancel; the engine
    # also generated tokens no client read (aborted requests, streams without token ids).
    assert delta("vllm:generation_tokens_total") >= generated, \
        f"vllm:generation_tokens_total grew by {delta('vllm:generation_tokens_total')}; the client got {generated}"
    assert delta("vllm:prompt_tokens_total") >= prompted, \
        f"vllm:prompt_tokens_total grew by {delta('vllm:prompt_tokens_total')}; the client's usage says {prompted}"
