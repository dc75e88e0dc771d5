"""`perfxlm bench serve` (vLLM's `bench serve`): SSE parsing and request timing against a local
replaying server, the random dataset, arrival intervals, metric math, the printed summary,
result files, and a run against `perfxlm serve`."""

import argparse
import asyncio
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from perfxlm.bench import serve
from perfxlm.bench.serve_client import (REQUEST_FUNCS, RequestFuncInput, RequestFuncOutput, SSEParser,
                                        request_openai_chat_completions, request_openai_completions)
from perfxlm.bench.serve_dataset import length_bounds, parse_range_ratio, sample_random_requests
from perfxlm.bench.serve_metrics import calculate_metrics, peak_concurrency, send_offsets, summary

# A /v1/completions stream as vLLM frames it: 3 token chunks (one with "é", two bytes in UTF-8),
# a keep-alive comment, the usage chunk and [DONE].
COMPLETION_EVENTS = [
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" Caf",'
    b'"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n',
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"\xc3\xa9",'
    b'"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n',
    b": keep-alive\n\n",
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" au",'
    b'"logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n',
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3}}\n\n',
    b"data: [DONE]\n\n",
]


def test_sse_parser_splits_events_cut_anywhere():
    stream = b"".join(COMPLETION_EVENTS)
    whole = SSEParser().feed(stream)
    assert len(whole) == 5 and whole[-1] == "[DONE]"
    assert json.loads(whole[1])["choices"][0]["text"] == "é"
    for step in (1, 2, 7, 50):  # every cut, including inside "é" and inside "\n\n"
        parser, got = SSEParser(), []
        for i in range(0, len(stream), step):
            got += parser.feed(stream[i:i + step])
        assert got + parser.close() == whole, step
    # a last event without its blank line still counts; CRLF framing too
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}\r\n\r\ndata: [DONE]') == ['{"a":1}']
    assert parser.close() == ["[DONE]"]


class ReplayServer:
    """A real HTTP server on 127.0.0.1 that answers every POST with `events`, `gap` seconds apart,
    and keeps the requests it got (body and headers)."""

    def __init__(self, events: list[bytes], gap: float, status: int = 200) -> None:
        self.events, self.gap, self.status, self.seen = events, gap, status, []

    async def handle(self, request):
        from aiohttp import web
        self.seen.append((await request.json(), request.headers.copy()))
        if self.status != 200:
            return web.json_response({"error": {"message": "no", "code": self.status}}, status=self.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ev in self.events:
            await asyncio.sleep(self.gap)
            await resp.write(ev)
        return resp

    async def run(self, coro_fn):
        import aiohttp
        from aiohttp import web
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                return await coro_fn(f"http://127.0.0.1:{port}", session)
        finally:
            await runner.cleanup()


def test_completions_request_times_token_events(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = ReplayServer(COMPLETION_EVENTS, gap=0.05)
    inp = RequestFuncInput(prompt="hello", api_url="", prompt_len=5, output_len=3, model="org/m", model_name="m",
                           ignore_eos=True, extra_body={"temperature": 0.0}, request_id="bench-x-0",
                           extra_headers={"X-Extra": "1"})

    async def go(url, session):
        inp.api_url = url + "/v1/completions"
        return await request_openai_completions(inp, session)
    out = asyncio.run(server.run(go))
    assert out.success and out.error == ""
    assert out.generated_text == " Café au"
    assert (out.output_tokens, out.prompt_len) == (3, 7)  # from the usage chunk
    assert len(out.itl) == 2  # 3 token events; the comment, usage and [DONE] are not tokens
    assert 0.04 < out.ttft < 0.5
    assert out.itl[0] > 0.04 and out.itl[1] > 0.08  # the comment's gap falls inside the second ITL
    assert out.latency == pytest.approx(out.ttft + sum(out.itl))  # ends at the last token event, not [DONE]
    body, headers = server.seen[0]
    assert body == {"model": "m", "prompt": "hello", "repetition_penalty": 1.0, "max_tokens": 3, "logprobs": None,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                    "temperature": 0.0}
    assert headers["Authorization"] == "Bearer sk-test" and headers["x-request-id"] == "bench-x-0"
    assert headers["X-Extra"] == "1"


def test_chat_request_and_failures():
    chat = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
            b'data: {"choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}\n\n',
            b"data: [DONE]\n\n"]
    inp = RequestFuncInput(prompt="hey", api_url="", prompt_len=2, output_len=8, model="m")

    def call(events, status=200, func=request_openai_chat_completions):
        server = ReplayServer(events, gap=0.01, status=status)

        async def go(url, session):
            inp.api_url = url + "/v1/chat/completions"
            return await func(inp, session)
        return asyncio.run(server.run(go)), server.seen
    out, seen = call(chat)
    assert out.success and out.generated_text == "Hi!" and len(out.itl) == 2  # the role chunk is the first event
    assert out.output_tokens == 0  # no usage chunk: counted from the text later
    assert seen[0][0]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hey"}]}]
    assert seen[0][0]["max_completion_tokens"] == 8 and "ignore_eos" not in seen[0][0]
    out, _ = call(chat, status=400)
    assert not out.success and out.error.startswith("400 Bad Request")
    out, _ = call([b"data: [DONE]\n\n"])
    assert not out.success and "Never received a valid chunk" in out.error
    out, _ = call([chat[1], b'data: {"error": {"message": "boom", "code": 500}}\n\n', b"data: [DONE]\n\n"])
    assert not out.success and "boom" in out.error


def test_random_dataset_lengths(smol_tokenizer):
    tok = smol_tokenizer
    reqs = sample_random_requests(tok, 40, 64, 16, (0.25, 0.5), prefix_len=4, seed=3, request_id_prefix="p-")
    (in_lo, in_hi), (out_lo, out_hi) = length_bounds(64, 16, (0.25, 0.5))
    assert (in_lo, in_hi, out_lo, out_hi) == (48, 80, 8, 24)
    assert [r.request_id for r in reqs] == [f"p-{i}" for i in range(40)]
    assert all(4 + in_lo <= r.prompt_len <= 4 + in_hi and out_lo <= r.expected_output_len <= out_hi for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 5 and len({r.expected_output_len for r in reqs}) > 5
    special = set(tok.all_special_ids)
    for r in reqs:
        ids = tok.encode(r.prompt, add_special_tokens=False)
        assert len(ids) == r.prompt_len  # the re-encoded text is exactly as long as reported
        assert not special & set(ids[:4])
    assert len({tok.encode(r.prompt, add_special_tokens=False)[0] for r in reqs}) == 1  # the shared prefix
    again = sample_random_requests(tok, 40, 64, 16, (0.25, 0.5), prefix_len=4, seed=3, request_id_prefix="p-")
    assert again == reqs
    other = sample_random_requests(tok, 40, 64, 16, (0.25, 0.5), prefix_len=4, seed=4)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]
    fixed = sample_random_requests(tok, 5, 32, 8, seed=0)
    assert {(r.prompt_len, r.expected_output_len) for r in fixed} == {(32, 8)}
    assert parse_range_ratio("0.2") == (0.2, 0.2)
    assert parse_range_ratio('{"input": 0.1, "output": 0.3}') == (0.1, 0.3)
    for bad in ("1.0", "-0.1", "abc", '{"input": 2}'):
        with pytest.raises(ValueError):
            parse_range_ratio(bad)


def test_request_rate_intervals():
    rng = np.random.default_rng(0)
    assert send_offsets(5, float("inf"), 1.0, rng) == [0.0] * 5
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):
        t = np.asarray(send_offsets(20000, 8.0, burstiness, rng))
        gaps = np.diff(np.concatenate([[0.0], t]))
        assert (gaps >= 0).all()
        assert gaps.mean() == pytest.approx(1 / 8, rel=0.05)  # mean gap 1/rate whatever the burstiness
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)  # gamma(k): CV = 1/sqrt(k)
    with pytest.raises(ValueError):
        send_offsets(3, 1.0, 0.0, rng)


def made_up_outputs() -> list[RequestFuncOutput]:
    return [RequestFuncOutput(success=True, start_time=100.0, ttft=0.1, itl=[0.02, 0.03, 0.05], latency=0.2,
                              output_tokens=4, prompt_len=10),
            RequestFuncOutput(success=True, start_time=100.5, ttft=0.3, itl=[], latency=0.3, output_tokens=1,
                              prompt_len=20),
            RequestFuncOutput(success=True, start_time=101.25, ttft=0.25, itl=[0.125] * 9, latency=1.375,
                              output_tokens=10, prompt_len=30),
            RequestFuncOutput(success=False, start_time=100.0, error="500 Internal Server Error")]


def test_metrics_from_made_up_timings(smol_tokenizer, tmp_path):
    outs = made_up_outputs()
    m = calculate_metrics(outs, duration=2.5, tokenizer=smol_tokenizer, goodput={"ttft": 250, "e2el": 1000})
    assert (m.completed, m.failed, m.total_input, m.total_output) == (3, 1, 60, 15)
    assert m.output_lens == [4, 1, 10, 0]
    assert m.tpot == pytest.approx([0.1 / 3, 0.125])  # (latency - ttft) / (n - 1); n = 1 has none
    assert m.itl == pytest.approx([0.02, 0.03, 0.05] + [0.125] * 9)
    assert m.request_throughput == pytest.approx(3 / 2.5) and m.output_throughput == pytest.approx(15 / 2.5)
    assert m.total_token_throughput == pytest.approx(75 / 2.5)
    assert m.request_goodput == pytest.approx(1 / 2.5)  # only the first meets TTFT <= 250 ms and E2EL <= 1 s
    # token events (s after 100.0): 0.1, .12, .15, .2 | 0.8 | 1.5, 1.625, ... 2.625: 5, then 4 and 6
    assert m.tokens_per_second == [5.0, 4.0, 6.0, 0.0]
    assert m.max_output_tokens_per_s == 6.0
    assert m.max_concurrent_requests == 1 and peak_concurrency(outs[:1] * 3) == 3
    no_usage = RequestFuncOutput(success=True, start_time=0.0, ttft=0.1, latency=0.3, itl=[0.2],
                                 generated_text=" Hello world")
    assert calculate_metrics([no_usage], 1.0, smol_tokenizer).output_lens == [2]  # re-tokenized text

    lines, result = summary(m, outs, 2.5, 4.0, 2, ["ttft", "tpot", "itl", "e2el", "client_queue_time"],
                            [50, 99.9], {"ttft": 250.0})
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert "Successful requests:" + " " * 21 + "3" + " " * 9 in lines
    assert "Maximum request concurrency:             2         " in lines
    assert "Request rate configured (RPS):           4.00      " in lines
    assert "Total generated tokens:                  15        " in lines
    assert "Request goodput (req/s):                 0.40      " in lines
    assert "Peak concurrent requests:                1.00      " in lines
    assert "---------------Time to First Token----------------" in lines
    assert "-----Time per Output Token (excl. 1st token)------" in lines
    assert "Mean TTFT (ms):                          216.67    " in lines
    assert "P99.9 ITL (ms):" in "\n".join(lines) and lines[-1] == "=" * 50
    assert "---------------Client-side Queueing---------------" in lines
    assert {len(line) for line in lines} == {50, 51}  # headers 50 wide, "{:<40} {:<10}" lines 51
    assert result["p50_ttft_ms"] == pytest.approx(250.0) and result["median_e2el_ms"] == pytest.approx(300.0)
    assert result["mean_tpot_ms"] == pytest.approx(1000 * (0.1 / 3 + 0.125) / 2)
    assert {"p99.9_itl_ms", "std_itl_ms", "mean_client_queue_time_ms"} <= set(result)
    assert result["request_goodput"] == pytest.approx(0.4) and result["errors"][3].startswith("500")
    lines, result = summary(m, outs, 2.5, float("inf"), None, ["ttft"], [99], {})
    text = "\n".join(lines)
    assert "Request rate" not in text and "Maximum request" not in text and "goodput" not in text
    assert "TPOT" not in text and result["request_goodput"] is None and "p99_ttft_ms" in result
    from perfxlm.bench.serve_plot import plot
    plot(m, outs, str(tmp_path / "p.png"), "made up")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_cli_args(parser)
    return parser.parse_args(list(argv))


def test_cli_defaults_and_result_filename(tmp_path):
    a = cli()
    assert (a.backend, a.endpoint, a.host, a.port, a.num_prompts, a.random_input_len, a.random_output_len) == \
        ("openai", "/v1/completions", "127.0.0.1", 8000, 1000, 1024, 128)
    assert (a.request_rate, a.burstiness, a.metric_percentiles, a.ready_check_timeout_sec, a.seed) == \
        (float("inf"), 1.0, "99", 0, 0)
    assert re.fullmatch(r"bench-[0-9a-f]{8}-", a.request_id_prefix) and set(REQUEST_FUNCS) == {"openai", "vllm",
                                                                                               "openai-chat"}
    date = time.strftime("%Y%m%d-%H%M%S")
    assert serve.result_filename(a, "HuggingFaceTB/SmolLM2-135M-Instruct", date) == \
        f"openai-infqps-SmolLM2-135M-Instruct-{date}.json"
    a = cli("--request-rate", "4", "--max-concurrency", "8", "--label", "px", "--result-dir", str(tmp_path / "r"))
    assert serve.result_filename(a, "m", "D") == str(tmp_path / "r" / "px-4.0qps-concurrency8-m-D.json")
    assert (tmp_path / "r").is_dir()
    assert serve.result_filename(cli("--result-filename", "x.json"), "m", "D") == "x.json"
    for argv, msg in ((["--backend", "openai-chat"], "/v1/chat/completions"), (["--max-concurrency", "0"], "> 0"),
                      (["--percentile-metrics", "ttft,bogus"], "bogus"), (["--goodput", "itl:5"], "itl"),
                      (["--random-range-ratio", "1.5"], "range-ratio")):
        with pytest.raises(SystemExit, match=re.escape(msg.replace("> 0", "greater than 0"))):
            serve._check_args(cli(*argv))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (Path(__file__).resolve().parent.parent / "perfxlm/entrypoints/openai/api_server.py").is_file():
        pytest.skip("perfxlm.entrypoints.openai.api_server is not there yet")
    from tests.server_util import RemoteServer
    with RemoteServer(["--max-num-seqs", "8"], log_path=tmp_path_factory.mktemp("srv") / "server.log") as srv:
        yield srv


def test_bench_serve_against_perfxlm_serve(server, tmp_path, capsys):
    png = tmp_path / "x.png"
    args = cli("--base-url", server.url_root, "--num-prompts", "8", "--random-input-len", "16",
               "--random-output-len", "8", "--ignore-eos", "--save-result", "--result-dir", str(tmp_path),
               "--plot", str(png), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--metadata", "run=ci")
    assert serve.main(args) == 0
    out = capsys.readouterr().out
    assert "First model name: HuggingFaceTB/SmolLM2-135M-Instruct" in out
    assert "Traffic request rate: inf\nBurstiness factor: 1.0 (Poisson process)\nMaximum request concurrency: None" \
        in out
    assert "Successful requests:                     8         " in out
    assert "Failed requests:                         0         " in out
    assert "Total generated tokens:                  64        " in out
    assert "Total input tokens:                      128       " in out
    assert "WARNING: /tokenize unavailable" not in out
    for header in ("Time to First Token", "Time per Output Token", "Inter-token Latency", "End-to-end Latency"):
        assert header in out
    (path,) = tmp_path.glob("openai-infqps-SmolLM2-135M-Instruct-*.json")
    result = json.loads(path.read_text())
    assert list(result)[:8] == ["date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id",
                                "num_prompts", "run"]
    assert {"request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
            "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
            "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
            "rtfx", "latencies", "queue_times", "mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99_e2el_ms",
            } <= set(result)
    assert not {"ttfts", "itls", "generated_texts", "errors", "input_lens"} & set(result)  # no --save-detailed
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (8, 0, 64)
    assert result["request_rate"] == "inf" and result["run"] == "ci"
    assert 0 < result["mean_ttft_ms"] < result["mean_e2el_ms"] and result["mean_tpot_ms"] > 0
    assert 1 <= result["max_concurrent_requests"] <= 8
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
