"""Figures of `perfxlm bench serve`, computed and printed as vLLM's `bench serve` does.

Per successful request: TTFT; TPOT = (latency - TTFT) / (output tokens - 1) when more than
one token came back; ITL, the gaps between token events; E2EL, its latency. Throughputs
divide by the wall time of the whole run. Summary lines are `"{:<40} {:<10}"`, headers
centred in 50 columns, exactly as vLLM prints them.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from perfxlm.bench.serve_client import RequestFuncOutput

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el", "client_queue_time", "e2el_including_client_queue")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def send_offsets(n: int, request_rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """When, in seconds after the start, each of `n` requests is sent: all at 0 for an infinite
    rate, else after gamma-distributed gaps of shape `burstiness` and mean 1/rate (shape 1 is
    a Poisson process; below 1 burstier, above 1 more even)."""
    if burstiness <= 0:
        raise ValueError(f"A positive burstiness factor is expected, but given {burstiness}.")
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {request_rate}")
    if request_rate == float("inf"):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    return np.cumsum(gaps).tolist()


@dataclass
class BenchmarkMetrics:
    """The run's figures; the per-request lists hold successful requests only (seconds)."""
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    output_lens: list[int]  # per request, failed ones 0 (vLLM's actual_output_lens)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)  # requests with more than one output token
    itl: list[float] = field(default_factory=list)  # all requests' gaps together
    e2el: list[float] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)  # output tokens in each second of the run


def calculate_metrics(outputs: Sequence[RequestFuncOutput], duration: float, tokenizer: Any,
                      goodput: dict[str, float] | None = None) -> BenchmarkMetrics:
    """The figures of a run that took `duration` seconds; `goodput` maps ttft/tpot/e2el to an SLO
    in ms that a request must meet (all of them) to count as good."""
    output_lens: list[int] = []
    total_input = good = 0
    ttfts, tpots, all_tpots, itls, e2els = [], [], [], [], []
    for out in outputs:
        if not out.success:
            output_lens.append(0)
            continue
        n = out.output_tokens or len(tokenizer(out.generated_text, add_special_tokens=False).input_ids)
        output_lens.append(n)
        total_input += out.prompt_len
        tpot = (out.latency - out.ttft) / (n - 1) if n > 1 else 0.0
        if n > 1:
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls += out.itl
        ttfts.append(out.ttft)
        e2els.append(out.latency)
    if goodput:
        per_metric = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        slos = [(per_metric[k], v / 1000) for k, v in goodput.items()]
        good = sum(all(values[i] <= slo for values, slo in slos) for i in range(len(ttfts)))
    done = [o for o in outputs if o.success]
    total_output = sum(output_lens)
    per_second = tokens_per_second(done)
    return BenchmarkMetrics(
        completed=len(done), failed=len(outputs) - len(done), total_input=total_input, total_output=total_output,
        request_throughput=len(done) / duration, request_goodput=good / duration,
        output_throughput=total_output / duration, total_token_throughput=(total_input + total_output) / duration,
        max_output_tokens_per_s=max(per_second, default=0.0),
        max_concurrent_requests=peak_concurrency(done), output_lens=output_lens, ttft=ttfts, tpot=tpots, itl=itls,
        e2el=e2els, tokens_per_second=per_second)


def tokens_per_second(outputs: Sequence[RequestFuncOutput]) -> list[float]:
    """Token events in each whole second since the first request was sent."""
    if not outputs:
        return []
    t0 = min(o.start_time for o in outputs)
    end = max(o.start_time + o.latency for o in outputs)
    counts = np.zeros(int(np.ceil(end - t0)) + 1)
    for o in outputs:
        times = o.start_time + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)])
        np.add.at(counts, (times - t0).astype(int), 1)
    return counts.tolist()


def peak_concurrency(outputs: Sequence[RequestFuncOutput]) -> int:
    """The most requests in flight at one moment, each in flight over [start, start + latency)."""
    events = sorted([(o.start_time, 1) for o in outputs] + [(o.start_time + o.latency, -1) for o in outputs])
    peak = now = 0
    for _, step in events:  # at equal times, -1 sorts first: an end frees its slot before a start
        now += step
        peak = max(peak, now)
    return peak


def stats_ms(values: Sequence[float], percentiles: Sequence[float]) -> tuple[float, float, float, list]:
    """(mean, median, std, [(p, value)]) in ms; all 0 for no values, as vLLM reports them."""
    v = np.asarray(values if len(values) else [0.0]) * 1000
    return float(np.mean(v)), float(np.median(v)), float(np.std(v)), [(p, float(np.percentile(v, p)))
                                                                      for p in percentiles]


def _line(label: str, value: Any, fmt: str = "") -> str:
    return ("{:<40} {:<10" + fmt + "}").format(label, value)


def summary(m: BenchmarkMetrics, outputs: Sequence[RequestFuncOutput], duration: float, request_rate: float,
            max_concurrency: int | None, selected: Sequence[str], percentiles: Sequence[float],
            goodput: dict[str, float] | None) -> tuple[list[str], dict[str, Any]]:
    """vLLM's printed result block, and the figures its result JSON holds."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             _line("Successful requests:", m.completed), _line("Failed requests:", m.failed)]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    if request_rate != float("inf"):
        lines.append(_line("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [_line("Benchmark duration (s):", duration, ".2f"), _line("Total input tokens:", m.total_input),
              _line("Total generated tokens:", m.total_output),
              _line("Request throughput (req/s):", m.request_throughput, ".2f")]
    if goodput:
        lines.append(_line("Request goodput (req/s):", m.request_goodput, ".2f"))
    lines += [_line("Output token throughput (tok/s):", m.output_throughput, ".2f"),
              _line("Peak output token throughput (tok/s):", m.max_output_tokens_per_s, ".2f"),
              _line("Peak concurrent requests:", m.max_concurrent_requests, ".2f"),
              _line("Total token throughput (tok/s):", m.total_token_throughput, ".2f")]
    done = [o for o in outputs if o.success]
    result: dict[str, Any] = {
        "duration": duration, "completed": m.completed, "failed": m.failed, "total_input_tokens": m.total_input,
        "total_output_tokens": m.total_output, "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput if goodput else None, "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput, "input_lens": [o.prompt_len for o in outputs],
        "output_lens": m.output_lens, "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs], "start_times": [o.start_time for o in outputs],
        "queue_times": [o.client_queue_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs],
        "max_output_tokens_per_s": m.max_output_tokens_per_s, "max_concurrent_requests": m.max_concurrent_requests,
        "rtfx": 0.0}
    blocks = [("ttft", "TTFT", "Time to First Token", m.ttft),
              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)", m.tpot),
              ("itl", "ITL", "Inter-token Latency", m.itl), ("e2el", "E2EL", "End-to-end Latency", m.e2el)]
    if max_concurrency is not None:  # waiting for a slot only exists under a concurrency cap
        blocks.append(("client_queue_time", "Client Queue Time", "Client-side Queueing",
                       [o.client_queue_time for o in done]))
        if request_rate != float("inf"):
            blocks.append(("e2el_including_client_queue", "E2EL incl. Client Queue",
                           "Queue-inclusive End-to-end Latency", [o.latency + o.client_queue_time for o in done]))
    for key, name, header, values in blocks:
        if key not in selected:
            continue
        mean, median, std, pcts = stats_ms(values, percentiles)
        lines += ["{s:{c}^{n}}".format(s=header, n=50, c="-"), _line(f"Mean {name} (ms):", mean, ".2f"),
                  _line(f"Median {name} (ms):", median, ".2f")]
        result |= {f"mean_{key}_ms": mean, f"median_{key}_ms": median, f"std_{key}_ms": std}
        for p, value in pcts:
            word = str(int(p)) if int(p) == p else str(p)
            lines.append(_line(f"P{word} {name} (ms):", value, ".2f"))
            result[f"p{word}_{key}_ms"] = value
    lines.append("=" * 50)
    return lines, result
