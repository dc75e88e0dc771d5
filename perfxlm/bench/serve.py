"""`perfxlm bench serve`: online serving throughput and latency, as `vllm bench serve` measures them.

Against any OpenAI-compatible server (perfxlm serve, vllm serve, ...):

    perfxlm serve HuggingFaceTB/SmolLM2-135M-Instruct &
    perfxlm bench serve --num-prompts 200 --request-rate inf --random-input-len 128 --random-output-len 128

Random prompts are sent at --request-rate (all at once for inf, else Poisson / gamma arrivals)
under an optional --max-concurrency cap, each streamed back over SSE. It prints vLLM's summary
block, and writes vLLM's result JSON with --save-result and latency CDFs plus output
throughput over time with --plot FILE.png. Flags, defaults, payloads, printed lines and JSON
keys are vLLM's; `perfxlm bench serve` results compare with `vllm bench serve` results.
"""

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np

from perfxlm.bench.serve_client import (REQUEST_FUNCS, REQUEST_TIMEOUT, RequestFunc, RequestFuncInput,
                                        RequestFuncOutput, first_model)
from perfxlm.bench.serve_dataset import (align_prompts_to_server, load_bench_tokenizer, parse_range_ratio,
                                         sample_random_requests)
from perfxlm.bench.serve_metrics import (GOODPUT_METRICS, PERCENTILE_METRICS, calculate_metrics, send_offsets,
                                         summary)

logger = logging.getLogger(__name__)

DETAILED_KEYS = ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors")
SAMPLING_FLAGS = ("top_p", "top_k", "min_p", "temperature", "frequency_penalty", "presence_penalty",
                  "repetition_penalty")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """`vllm bench serve`'s flags (the random dataset and the OpenAI backends), plus --plot."""
    p = parser.add_argument
    p("--backend", default="openai", choices=list(REQUEST_FUNCS),
      help="openai / vllm: /v1/completions; openai-chat: /v1/chat/completions (with --endpoint to match)")
    p("--base-url", default=None, help="server or API base URL, instead of http://HOST:PORT")
    p("--host", default="127.0.0.1")
    p("--port", type=int, default=8000)
    p("--endpoint", default="/v1/completions", help="API endpoint")
    p("--header", metavar="KEY=VALUE", nargs="*", help="headers sent with each request")
    p("--max-concurrency", type=int, default=None, help="most requests in flight at once (default: no cap)")
    p("--model", default=None, help="model id; default: the first model of GET /v1/models (its id and root)")
    p("--served-model-name", default=None, help="the name sent as `model` (default: --model)")
    p("--tokenizer", default=None, help="tokenizer name or path (default: the model id)")
    p("--logprobs", type=int, default=None, help="logprobs per token to request")
    p("--dataset-name", default="random", choices=["random"], help="the dataset (random token prompts)")
    p("--num-prompts", type=int, default=1000)
    p("--seed", type=int, default=0)
    p("--random-input-len", type=int, default=1024, help="prompt tokens per request")
    p("--random-output-len", type=int, default=128, help="max_tokens per request")
    p("--random-range-ratio", default="0.0",
      help='lengths uniform in [L(1-r), L(1+r)]; a float, or JSON {"input": r1, "output": r2}; in [0, 1)')
    p("--random-prefix-len", type=int, default=0, help="random tokens shared by every prompt, before its own")
    p("--request-rate", type=float, default=float("inf"),
      help="requests per second; inf (default) sends all at time 0, else Poisson/gamma arrivals")
    p("--burstiness", type=float, default=1.0,
      help="gamma shape of the arrival gaps: 1 = Poisson, below 1 burstier, above 1 more even")
    p("--disable-tqdm", action="store_true", help="no progress bar")
    p("--num-warmups", type=int, default=0, help="warm-up requests before the timed run")
    p("--save-result", action="store_true", help="write the result JSON")
    p("--save-detailed", action="store_true", help="keep per-request lists (lens, TTFTs, ITLs, texts) in it")
    p("--append-result", action="store_true", help="append the result JSON to the file as a new line")
    p("--metadata", metavar="KEY=VALUE", nargs="*", help="extra keys for the result JSON")
    p("--result-dir", default=None, help="directory of the result JSON (default: the current one)")
    p("--result-filename", default=None,
      help="default: {label}-{request_rate}qps[-concurrencyN]-{model basename}-{YYYYmmdd-HHMMSS}.json")
    p("--label", default=None, help="prefix of the result file name (default: --backend)")
    p("--ignore-eos", action="store_true", help="send ignore_eos, so every request runs to its max_tokens")
    p("--percentile-metrics", default=None,
      help=f"comma list of metrics to report: {', '.join(PERCENTILE_METRICS)} (default: ttft,tpot,itl)")
    p("--metric-percentiles", default="99", help='comma list of percentiles, e.g. "25,50,75" (default: 99)')
    p("--goodput", nargs="+", default=None, metavar="KEY:VALUE",
      help="SLOs in ms (ttft, tpot, e2el) a request must all meet to count in the goodput")
    p("--request-id-prefix", default=f"bench-{uuid.uuid4().hex[:8]}-", help="x-request-id of request i is PREFIXi")
    p("--ready-check-timeout-sec", type=int, default=0,
      help="seconds to retry a first test request until the server answers (0: skip the check)")
    p("--extra-body", type=json.loads, default=None, help="JSON object merged into every request body")
    sampling = parser.add_argument_group("sampling parameters", "sent only when given (else the server's defaults)")
    for name, kind in zip(SAMPLING_FLAGS, (float, int, float, float, float, float, float)):
        sampling.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    p("--plot", default=None, metavar="FILE.png",
      help="draw TTFT/TPOT/ITL/E2EL latency CDFs and output throughput over time (needs matplotlib)")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe; 0 when at least one request succeeded."""
    return 0 if asyncio.run(run(args))["completed"] > 0 else 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark, its printed report and result file; returns the result JSON."""
    print(argparse.Namespace(**{**vars(args), "header": [_redact(h) for h in args.header or []] or None}))
    request_func, percentiles, selected, goodput, ratios = _check_args(args)
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_url = base_url + args.endpoint
    headers, metadata = _pairs(args.header, "header"), _pairs(args.metadata, "metadata")
    if args.model is None:
        print("Model not specified, fetching first model from server...")
        model_name, model_id = await first_model(base_url, headers)
        print(f"First model name: {model_name}, first model id: {model_id}")
    else:
        model_name, model_id = args.served_model_name, args.model
    tokenizer_id = args.tokenizer or model_id
    tokenizer = load_bench_tokenizer(tokenizer_id)
    requests = sample_random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                      ratios, args.random_prefix_len, args.seed, args.request_id_prefix)
    requests = await align_prompts_to_server(base_url, model_id, requests, headers)
    sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if "temperature" not in sampling:
        print("WARNING: bench serve does not set temperature==0 (greedy) in requests by default, as vllm bench serve. "
              "The default will be determined on the server side and can be model/API specific. For greedy "
              "requests, include --temperature=0.")
    inputs = [RequestFuncInput(prompt=r.prompt, api_url=api_url, prompt_len=r.prompt_len,
                               output_len=r.expected_output_len, model=model_id, model_name=model_name,
                               logprobs=args.logprobs, extra_headers=headers,
                               extra_body={**sampling, **(args.extra_body or {})}, ignore_eos=args.ignore_eos,
                               request_id=r.request_id) for r in requests]
    gc.collect()
    gc.freeze()  # the prompts and inputs stay alive all run: keep them out of the collector's passes
    try:
        outputs, duration = await benchmark(request_func, inputs, args.request_rate, args.burstiness,
                                            args.max_concurrency, args.num_warmups, args.ready_check_timeout_sec,
                                            args.disable_tqdm, np.random.default_rng(args.seed))
    finally:
        gc.unfreeze()
    metrics = calculate_metrics(outputs, duration, tokenizer, goodput)
    failed = [o for o in outputs if not o.success]
    if failed:
        print("Failed requests during benchmark run detected (capping to 10):")
        for i, o in enumerate(failed[:10]):
            print(f"Error {i}: {o.error}")
    lines, figures = summary(metrics, outputs, duration, args.request_rate, args.max_concurrency, selected,
                             percentiles, goodput)
    print("\n".join(lines))
    now = datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {"date": now, "endpoint_type": args.backend, "backend": args.backend, "label": args.label,
              "model_id": model_id, "tokenizer_id": tokenizer_id, "num_prompts": args.num_prompts,
              **metadata,
              "request_rate": args.request_rate if args.request_rate < float("inf") else "inf",
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, **figures}
    if args.plot:
        from perfxlm.bench.serve_plot import plot
        plot(metrics, outputs, args.plot, f"{model_name or model_id}, {args.backend}, rate {args.request_rate}, "
                                          f"concurrency {args.max_concurrency}")
        print(f"Plot saved to {args.plot}")
    if not args.save_detailed:
        for key in DETAILED_KEYS:
            result.pop(key, None)
    if args.save_result or args.append_result:
        path = result_filename(args, model_id, now)
        with open(path, "a+" if args.append_result else "w", encoding="utf-8") as f:
            if args.append_result and f.tell() != 0:
                f.write("\n")
            json.dump(result, f)
        print(f"Result saved to {path}")
    return result


async def benchmark(request_func: RequestFunc, inputs: Sequence[RequestFuncInput], request_rate: float,
                    burstiness: float, max_concurrency: int | None, num_warmups: int, ready_check_timeout: float,
                    disable_tqdm: bool, rng: np.random.Generator) -> tuple[list[RequestFuncOutput], float]:
    """Send `inputs` on vLLM's schedule; returns their outputs (in input order) and the run's wall time."""
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0,
                                     keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, trust_env=True, timeout=REQUEST_TIMEOUT) as session:
        print("Starting initial single prompt test run...")
        test = RequestFuncInput(**{**vars(inputs[0]), "request_id": None})
        if ready_check_timeout > 0:
            out = await wait_for_endpoint(request_func, test, session, ready_check_timeout)
            if not out.success:
                raise SystemExit("Initial test run failed - Please make sure benchmark arguments are correctly "
                                 f"specified. Error: {out.error}")
            print("Initial test run completed.")
        else:
            print("Skipping endpoint ready check.")
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
        if num_warmups > 0:
            print(f"Warming up with {num_warmups} requests...")
            bar = _progress(num_warmups, disable_tqdm)

            async def warm() -> RequestFuncOutput:
                async with limit:
                    return await request_func(test, session, bar)
            await asyncio.gather(*(warm() for _ in range(num_warmups)))
            if bar is not None:
                bar.close()
            print("Warmup run completed.")
        print("Starting main benchmark run...")
        print(f"Traffic request rate: {request_rate}")
        print(f"Burstiness factor: {burstiness} ({'Poisson process' if burstiness == 1.0 else 'Gamma distribution'})")
        print(f"Maximum request concurrency: {max_concurrency}")
        bar = _progress(len(inputs), disable_tqdm)

        async def limited(inp: RequestFuncInput) -> RequestFuncOutput:
            arrival = time.perf_counter()
            async with limit:
                out = await request_func(inp, session, bar)
            out.client_queue_time = out.start_time - arrival
            return out

        start = time.perf_counter()
        tasks = []
        for inp, offset in zip(inputs, send_offsets(len(inputs), request_rate, burstiness, rng)):
            if (delay := start + offset - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(inp)))
        outputs = await asyncio.gather(*tasks)
        if bar is not None:
            bar.close()
        return list(outputs), time.perf_counter() - start


async def wait_for_endpoint(request_func: RequestFunc, inp: RequestFuncInput, session: aiohttp.ClientSession,
                            timeout: float, retry_interval: float = 5.0) -> RequestFuncOutput:
    """Send `inp` until it succeeds or `timeout` seconds pass; the last output."""
    deadline = time.monotonic() + timeout
    while True:
        out = await request_func(inp, session, None)
        if out.success or time.monotonic() >= deadline:
            return out
        logger.info("endpoint not ready yet (%s); retrying", (out.error.strip().splitlines() or [""])[-1])
        await asyncio.sleep(min(retry_interval, max(0.0, deadline - time.monotonic())))


def result_filename(args: argparse.Namespace, model_id: str, date: str) -> str:
    """--result-dir/--result-filename, by default `{label}-{rate}qps[-concurrencyN]-{model}-{date}.json`."""
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (f"{args.label or args.backend}-{args.request_rate}qps{concurrency}-"
                                    f"{model_id.split('/')[-1]}-{date}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    return name


def _check_args(args: argparse.Namespace) -> tuple[RequestFunc, list[float], list[str], dict[str, float],
                                                   tuple[float, float]]:
    """Reject bad flags before anything is sent: (request function, percentiles, metrics, goodput SLOs, ratios)."""
    def fail(msg: str) -> SystemExit:
        return SystemExit(f"perfxlm bench serve: {msg}")
    request_func, suffix = REQUEST_FUNCS[args.backend]
    if not args.endpoint.endswith(suffix):
        raise fail(f"--backend {args.backend} needs an --endpoint that ends with {suffix!r}, got {args.endpoint!r}"
                   + (" (use --endpoint /v1/chat/completions)" if args.backend == "openai-chat" else ""))
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        raise fail("--max-concurrency must be greater than 0")
    if args.num_prompts < 1:
        raise fail("--num-prompts must be at least 1")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise fail("--request-rate and --burstiness must be positive")
    selected = (args.percentile_metrics or "ttft,tpot,itl").split(",")
    if bad := [m for m in selected if m not in PERCENTILE_METRICS]:
        raise fail(f"--percentile-metrics: unknown {bad}; choose from {', '.join(PERCENTILE_METRICS)}")
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
        ratios = parse_range_ratio(args.random_range_ratio)
        goodput = {k: float(v) for k, v in (s.split(":") for s in args.goodput or [])}
    except ValueError as e:
        raise fail(str(e) if "range-ratio" in str(e) else
                   f"--metric-percentiles must be numbers and --goodput KEY:VALUE pairs in ms ({e})") from e
    if not all(0 <= p <= 100 for p in percentiles):
        raise fail(f"--metric-percentiles must be in [0, 100], got {args.metric_percentiles}")
    if bad := {k: v for k, v in goodput.items() if k not in GOODPUT_METRICS or v < 0}:
        raise fail(f"--goodput: {bad}: the SLO names are {', '.join(GOODPUT_METRICS)}, values non-negative ms")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise fail("--plot needs matplotlib: pip install matplotlib")
    return request_func, percentiles, selected, goodput, ratios


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"perfxlm bench serve: --{flag} {item!r}: use KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _redact(header: str) -> str:
    return header.split("=", 1)[0] + "=***" if "=" in header else header


def _progress(total: int, disabled: bool) -> Any:
    if disabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total)
