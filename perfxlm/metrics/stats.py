"""What the engine reports after each step, as vLLM's v1/metrics/stats.py: the scheduler's state,
the step's tokens and latencies, and one record per finished request. Times are seconds."""

from dataclasses import dataclass, field


@dataclass
class SchedulerStats:
    """The scheduler after a step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0          # waiting to start, or preempted and waiting to resume
    kv_cache_usage: float = 0.0        # fraction of KV blocks held by requests, 0..1
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    prefix_cache_queries: int = 0      # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int = 0         # of those, tokens found


@dataclass
class FinishedRequestStats:
    """One sequence that ended this step (each of a request's n completions is one)."""

    finish_reason: str                 # "stop", "length" or "abort"
    e2e_latency: float                 # arrival -> finish
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens_param: int | None       # SamplingParams.max_tokens as given (None: up to max_model_len)
    n_param: int
    queued_time: float                 # arrival -> first scheduled
    prefill_time: float                # first scheduled -> first token
    decode_time: float                 # first token -> last token
    inference_time: float              # first scheduled -> last token
    mean_time_per_output_token: float  # decode_time / (tokens - 1); 0 for one token
    num_preemptions: int
    num_cached_tokens: int             # prompt tokens the prefix cache served


@dataclass
class IterationStats:
    """One engine step."""

    iteration_timestamp: float
    num_prompt_tokens: int = 0         # prompts whose first token came this step, all their tokens
    num_prompt_tokens_cached: int = 0  # of those, served by the prefix cache
    num_generation_tokens: int = 0     # tokens sampled this step
    num_iteration_tokens: int = 0      # tokens the model ran this step (prefill chunks + decodes)
    num_preempted_reqs: int = 0
    time_to_first_tokens_iter: list[float] = field(default_factory=list)
    inter_token_latencies_iter: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    n_params_iter: list[int] = field(default_factory=list)        # n of each request started this step
    max_num_generation_tokens_iter: list[int] = field(default_factory=list)  # per finished request: max over its n
