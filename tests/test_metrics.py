"""The stat loggers fed hand-made engine statistics: the Prometheus families scraped back through
prometheus_client's own parser (vLLM's names, types, labels, buckets and the invariants its
server test pins), and the periodic log line read from the log records."""

import logging
import math

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from perfxlm.metrics.loggers import CachingMetrics, LoggingStatLogger, PrometheusStatLogger, build_1_2_5_buckets
from perfxlm.metrics.stats import FinishedRequestStats, IterationStats, SchedulerStats

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
TTFT, ITL = 0.05, 0.02  # seconds, the same for every request below

FAMILIES = {  # vLLM 0.32's families for a text model without KV connector, LoRA or spec decode
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_waiting_by_reason": "gauge", "vllm:engine_sleep_state": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:cache_config_info": "gauge",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:external_prefix_cache_queries": "counter", "vllm:external_prefix_cache_hits": "counter",
    "vllm:mm_cache_queries": "counter", "vllm:mm_cache_hits": "counter",
    "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter", "vllm:prompt_tokens_by_source": "counter",
    "vllm:prompt_tokens_cached": "counter", "vllm:prompt_tokens_cached_by_source": "counter",
    "vllm:generation_tokens": "counter", "vllm:request_success": "counter", "vllm:admission_rejections": "counter",
    **{f"vllm:{name}": "histogram" for name in (
        "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total",
        "request_max_num_generation_tokens", "request_params_n", "request_params_max_tokens",
        "time_to_first_token_seconds", "inter_token_latency_seconds", "request_time_per_output_token_seconds",
        "e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
        "request_prefill_time_seconds", "request_decode_time_seconds", "request_num_preemptions",
        "request_prefill_kv_computed_tokens")},
}


def scrape() -> dict:
    """The default registry's vllm: families, as a Prometheus server would parse /metrics (less the
    `<counter or histogram>_created` gauges that the text format adds beside each)."""
    text = generate_latest(REGISTRY).decode()
    return {f.name: f for f in text_string_to_metric_families(text)
            if f.name.startswith("vllm:") and not f.name.endswith("_created")}


def value(families: dict, family: str, sample: str = "", **labels: str) -> float:
    """The one sample `family + sample` whose labels include `labels`."""
    found = [s.value for s in families[family].samples
             if s.name == family + sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, (family, sample, labels, found)
    return found[0]


def buckets(families: dict, family: str) -> list[float]:
    return [float(s.labels["le"]) for s in families[family].samples if s.name == family + "_bucket"]


def finished(reason: str, prompt: int, generated: int, max_tokens: int | None, cached: int = 0,
             preemptions: int = 0) -> FinishedRequestStats:
    decode = ITL * (generated - 1)
    return FinishedRequestStats(
        finish_reason=reason, e2e_latency=0.01 + TTFT + decode, num_prompt_tokens=prompt,
        num_generation_tokens=generated, max_tokens_param=max_tokens, n_param=1, queued_time=0.01,
        prefill_time=TTFT - 0.01, decode_time=decode, inference_time=TTFT - 0.01 + decode,
        mean_time_per_output_token=decode / (generated - 1) if generated > 1 else 0.0,
        num_preemptions=preemptions, num_cached_tokens=cached)


def run_request(loggers: list, prompt: int, generated: int, waiting_after: int = 0, cached: int = 0,
                reason: str = "length") -> None:
    """One request alone in the engine, step by step as LLMEngine reports it: the first step
    samples its first token, each later step one more; the last step finishes it."""
    for i in range(generated):
        it = IterationStats(iteration_timestamp=float(i), num_generation_tokens=1)
        if i == 0:
            it.num_prompt_tokens, it.num_prompt_tokens_cached = prompt, cached
            it.time_to_first_tokens_iter.append(TTFT)
            it.n_params_iter.append(1)
        else:
            it.inter_token_latencies_iter.append(ITL)
        last = i == generated - 1
        if last:
            it.finished_requests.append(finished(reason, prompt, generated, generated, cached))
            it.max_num_generation_tokens_iter.append(generated)
        sched = SchedulerStats(num_running_reqs=0 if last else 1, num_waiting_reqs=waiting_after,
                               kv_cache_usage=0.0 if last else 0.25, num_kv_blocks=64,
                               num_free_kv_blocks=64 if last else 48)
        if i == 0:
            sched.prefix_cache_requests, sched.prefix_cache_queries, sched.prefix_cache_hits = 1, prompt, cached
        for stat_logger in loggers:
            stat_logger.record(sched, it)


@pytest.fixture
def prom() -> PrometheusStatLogger:
    return PrometheusStatLogger(MODEL, MAX_MODEL_LEN, cache_config={"block_size": "16", "num_gpu_blocks": "64",
                                                                    "enable_prefix_caching": "True"})


def test_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert build_1_2_5_buckets(4) == [1, 2]


def test_families_names_types_and_labels(prom):
    families = scrape()
    assert {name: f.type for name, f in families.items()} == FAMILIES
    for name, family in families.items():
        for sample in family.samples:
            if name != "vllm:cache_config_info":  # vLLM labels it with the cache config and engine only
                assert sample.labels["model_name"] == MODEL, sample
            if name != "vllm:admission_rejections":  # vLLM labels it with model_name and reason only
                assert sample.labels["engine"] == "0", sample
    assert value(families, "vllm:cache_config_info", block_size="16", num_gpu_blocks="64",
                 enable_prefix_caching="True", engine="0") == 1
    assert value(families, "vllm:engine_sleep_state", sleep_state="awake") == 1
    assert value(families, "vllm:engine_sleep_state", sleep_state="discard_all") == 0


def test_bucket_boundaries(prom):
    """vLLM 0.32's buckets, written out here rather than read from the module's constants."""
    families = scrape()
    inf = [math.inf]
    ttft = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
            40.0, 80.0, 160.0, 640.0, 2560.0]
    itl = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
    latency = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
    assert buckets(families, "vllm:time_to_first_token_seconds") == ttft + inf
    for name in ("inter_token_latency_seconds", "request_time_per_output_token_seconds"):
        assert buckets(families, f"vllm:{name}") == itl + inf
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert buckets(families, f"vllm:{name}") == latency + inf
    one_two_five = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]  # max_model_len 2048
    for name in ("request_prompt_tokens", "request_generation_tokens", "request_max_num_generation_tokens",
                 "request_params_max_tokens", "request_prefill_kv_computed_tokens"):
        assert buckets(families, f"vllm:{name}") == one_two_five + inf
    assert buckets(families, "vllm:iteration_tokens_total") == [
        1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384] + inf
    assert buckets(families, "vllm:request_params_n") == [1, 2, 5, 10, 20] + inf
    assert buckets(families, "vllm:request_num_preemptions") == [1, 2, 3, 4, 5, 10, 20] + inf


def test_n_identical_requests_give_vllms_invariants(prom):
    """vLLM's server test: N requests of P prompt tokens, each generating T (max_tokens=T, no EOS)."""
    n, p, t = 3, 7, 5
    for _ in range(n):
        run_request([prom], p, t)
    f = scrape()
    assert value(f, "vllm:request_success", "_total", finished_reason="length") == n
    for reason in ("stop", "abort", "error", "repetition"):
        assert value(f, "vllm:request_success", "_total", finished_reason=reason) == 0
    assert value(f, "vllm:prompt_tokens", "_total") == n * p
    assert value(f, "vllm:generation_tokens", "_total") == n * t
    assert value(f, "vllm:time_to_first_token_seconds", "_count") == n
    assert value(f, "vllm:time_to_first_token_seconds", "_sum") == pytest.approx(n * TTFT)
    assert value(f, "vllm:inter_token_latency_seconds", "_count") == n * (t - 1)
    assert value(f, "vllm:inter_token_latency_seconds", "_sum") == pytest.approx(n * (t - 1) * ITL)
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_inference_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_time_per_output_token_seconds", "request_num_preemptions"):
        assert value(f, f"vllm:{name}", "_count") == n, name
    assert value(f, "vllm:request_time_per_output_token_seconds", "_sum") == pytest.approx(n * ITL)
    assert value(f, "vllm:request_prompt_tokens", "_sum") == n * p
    assert value(f, "vllm:request_generation_tokens", "_sum") == n * t
    assert value(f, "vllm:request_params_max_tokens", "_sum") == n * t
    assert value(f, "vllm:request_max_num_generation_tokens", "_sum") == n * t
    assert value(f, "vllm:request_params_n", "_count") == n
    assert value(f, "vllm:iteration_tokens_total", "_sum") == n * (p + t)
    assert value(f, "vllm:iteration_tokens_total", "_count") == n * t
    # cumulative buckets: every TTFT of 0.05 s lies above 0.04 and within 0.06
    assert value(f, "vllm:time_to_first_token_seconds", "_bucket", le="0.04") == 0
    assert value(f, "vllm:time_to_first_token_seconds", "_bucket", le="0.06") == n
    assert value(f, "vllm:request_prompt_tokens", "_bucket", le="5.0") == 0
    assert value(f, "vllm:request_prompt_tokens", "_bucket", le="10.0") == n
    # the engine drained: the gauges say so
    assert value(f, "vllm:num_requests_running") == 0
    assert value(f, "vllm:num_requests_waiting") == 0
    assert value(f, "vllm:kv_cache_usage_perc") == 0
    assert value(f, "vllm:prefix_cache_queries", "_total") == n * p
    assert value(f, "vllm:prefix_cache_hits", "_total") == 0


def test_gauges_follow_the_latest_scheduler_stats(prom):
    prom.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, kv_cache_usage=0.375), None)
    f = scrape()
    assert value(f, "vllm:num_requests_running") == 3
    assert value(f, "vllm:num_requests_waiting") == 2
    assert value(f, "vllm:num_requests_waiting_by_reason", reason="capacity") == 2
    assert value(f, "vllm:num_requests_waiting_by_reason", reason="deferred") == 0
    assert value(f, "vllm:kv_cache_usage_perc") == 0.375
    assert value(f, "vllm:prompt_tokens", "_total") == 0  # no iteration stats, no tokens


def test_prefix_cache_hits_split_prompt_tokens_by_source(prom):
    run_request([prom], prompt=32, generated=2, cached=16)
    f = scrape()
    assert value(f, "vllm:prompt_tokens", "_total") == 32
    assert value(f, "vllm:prompt_tokens_by_source", "_total", source="local_compute") == 16
    assert value(f, "vllm:prompt_tokens_by_source", "_total", source="local_cache_hit") == 16
    assert value(f, "vllm:prompt_tokens_by_source", "_total", source="external_kv_transfer") == 0
    assert value(f, "vllm:prompt_tokens_cached", "_total") == 16
    assert value(f, "vllm:prompt_tokens_cached_by_source", "_total", source="device") == 16
    assert value(f, "vllm:prompt_tokens_cached_by_source", "_total", source="disk") == 0
    assert value(f, "vllm:prefix_cache_queries", "_total") == 32
    assert value(f, "vllm:prefix_cache_hits", "_total") == 16
    assert value(f, "vllm:request_prefill_kv_computed_tokens", "_sum") == 16
    # a step's tokens count only what was computed: 16 prompt + 1 sampled, then 1
    assert value(f, "vllm:iteration_tokens_total", "_sum") == 16 + 1 + 1


def test_finish_reasons_and_preemptions(prom):
    it = IterationStats(iteration_timestamp=0.0, num_preempted_reqs=2)
    it.finished_requests += [finished("stop", 4, 3, 16), finished("stop", 4, 1, None),
                             finished("abort", 4, 2, 16, preemptions=2)]
    prom.record(None, it)
    f = scrape()
    assert value(f, "vllm:request_success", "_total", finished_reason="stop") == 2
    assert value(f, "vllm:request_success", "_total", finished_reason="abort") == 1
    assert value(f, "vllm:request_success", "_total", finished_reason="length") == 0
    assert value(f, "vllm:num_preemptions", "_total") == 2
    assert value(f, "vllm:request_num_preemptions", "_sum") == 2
    assert value(f, "vllm:request_num_preemptions", "_bucket", le="1.0") == 2
    assert value(f, "vllm:request_params_max_tokens", "_count") == 2  # max_tokens=None is not observed
    assert value(f, "vllm:e2e_request_latency_seconds", "_count") == 3


def test_a_new_logger_replaces_the_old_families():
    first = PrometheusStatLogger("first", 64)
    run_request([first], 4, 2)
    second = PrometheusStatLogger("second", 128)  # would raise "Duplicated timeseries" if not unregistered
    run_request([second], 5, 3)
    f = scrape()
    assert {s.labels["model_name"] for s in f["vllm:prompt_tokens"].samples} == {"second"}
    assert value(f, "vllm:prompt_tokens", "_total") == 5
    assert buckets(f, "vllm:request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100, math.inf]
    assert "vllm:cache_config_info" not in f  # neither was given a cache config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_records(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("perfxlm"), "propagate", True)  # perfxlm logs to its own handler
    caplog.set_level(logging.DEBUG, logger="perfxlm.metrics.loggers")
    return lambda: [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "perfxlm.metrics.loggers"]


def test_log_line_throughput_requests_kv_usage_and_hit_rate(log_records):
    clock = Clock()
    stat_logger = LoggingStatLogger(clock=clock)
    it = IterationStats(iteration_timestamp=0.0, num_prompt_tokens=100, num_prompt_tokens_cached=20,
                        num_generation_tokens=25)
    sched = SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.125, prefix_cache_requests=2,
                           prefix_cache_queries=100, prefix_cache_hits=50)
    stat_logger.record(sched, it)
    clock.now += 10
    stat_logger.log()
    assert log_records() == [(logging.INFO, "Engine 000: Avg prompt throughput: 8.0 tokens/s, "
                              "Avg generation throughput: 2.5 tokens/s, Running: 2 reqs, Waiting: 1 reqs, "
                              "CPU KV cache usage: 12.5%, Prefix cache hit rate: 50.0%")]


def test_idle_engine_logs_at_debug_after_one_quiet_interval(log_records):
    clock = Clock()
    stat_logger = LoggingStatLogger(engine_index=1, kv_cache_device="RVV", clock=clock)
    stat_logger.record(SchedulerStats(), IterationStats(iteration_timestamp=0.0, num_generation_tokens=40))
    for _ in range(3):
        clock.now += 10
        stat_logger.log()
    levels = [level for level, _ in log_records()]
    assert levels == [logging.INFO, logging.INFO, logging.DEBUG]
    assert [m.split(", ")[1] for _, m in log_records()] == ["Avg generation throughput: 4.0 tokens/s"] + [
        "Avg generation throughput: 0.0 tokens/s"] * 2
    # no request looked up the prefix cache: vLLM leaves the hit rate out
    assert log_records()[0][1] == ("Engine 001: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: "
                                   "4.0 tokens/s, Running: 0 reqs, Waiting: 0 reqs, RVV KV cache usage: 0.0%")


def test_preemptions_appear_in_the_interval_they_happen(log_records):
    clock = Clock()
    stat_logger = LoggingStatLogger(clock=clock)
    stat_logger.record(SchedulerStats(num_waiting_reqs=3, kv_cache_usage=1.0),
                       IterationStats(iteration_timestamp=0.0, num_generation_tokens=8, num_preempted_reqs=3))
    clock.now += 4
    stat_logger.log()
    clock.now += 4
    stat_logger.log()
    first, second = (m for _, m in log_records())
    assert "Waiting: 3 reqs, Preemptions: 3, CPU KV cache usage: 100.0%" in first
    assert "Preemptions" not in second


def test_log_engine_initialized_names_the_block_count(log_records):
    LoggingStatLogger(num_kv_blocks=512).log_engine_initialized()
    assert log_records() == [(logging.DEBUG, "Engine 000: vllm cache_config_info with initialization after "
                                             "num_gpu_blocks is: 512")]


def test_hit_rate_over_the_most_recent_requests():
    window = CachingMetrics(max_recent_requests=4)
    assert window.empty and window.hit_rate == 0.0
    window.observe(2, 100, 100)
    window.observe(0, 0, 0)  # a step without lookups changes nothing
    window.observe(2, 100, 0)
    assert window.hit_rate == 0.5
    window.observe(1, 100, 0)  # 5 requests: the oldest step leaves the window
    assert (window.requests, window.hit_rate) == (3, 0.0)
    window.observe(10, 40, 30)  # larger than the window on its own: kept, alone
    assert (window.requests, window.hit_rate) == (10, 0.75)
    window.reset()
    assert window.empty
