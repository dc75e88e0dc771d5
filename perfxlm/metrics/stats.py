"""What the engine reports after each step, as vLLM's v1/metrics/stats.py: the scheduler's state,
the step's tokens and latencies, and one record per finished request. Times are seconds."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine's types, for hints only: metrics does not import the engine
    from perfxlm.engine.output_processor import RequestState
    from perfxlm.engine.request import Request


@dataclass
class SchedulerStats:
    """The scheduler after a step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0          # waiting to start, or preempted and waiting to resume
    kv_cache_usage: float = 0.0        # fraction of KV blocks held by requests, 0..1
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    prefix_cache_requests: int = 0     # new requests that looked up the prefix cache this step
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
    num_preempted_reqs: int = 0
    time_to_first_tokens_iter: list[float] = field(default_factory=list)
    inter_token_latencies_iter: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    n_params_iter: list[int] = field(default_factory=list)        # n of each request started this step
    max_num_generation_tokens_iter: list[int] = field(default_factory=list)  # per finished request: max over its n

    def add_token(self, req: "Request", now: float) -> None:
        """Count req's token sampled at `now` (before the engine stamps the request's times)."""
        self.num_generation_tokens += 1
        if req.first_token_time is None:  # the prompt is done: its first token
            self.time_to_first_tokens_iter.append(now - req.arrival_time)
            self.num_prompt_tokens += req.num_prompt_tokens
            self.num_prompt_tokens_cached += max(req.num_cached_tokens, 0)
        else:
            self.inter_token_latencies_iter.append(now - req.last_token_time)


def finished_stats(req: "Request", state: "RequestState", now: float) -> FinishedRequestStats:
    """The record of a sequence that ended at `now` (an aborted one may lack later timestamps)."""
    scheduled = req.first_scheduled_time if req.first_scheduled_time is not None else now
    first = req.first_token_time if req.first_token_time is not None else now
    last = req.last_token_time if req.last_token_time is not None else now
    n = req.num_output_tokens
    return FinishedRequestStats(
        finish_reason=req.status.finish_reason() or "abort", e2e_latency=now - req.arrival_time,
        num_prompt_tokens=req.num_prompt_tokens, num_generation_tokens=n, max_tokens_param=state.max_tokens_param,
        n_param=len(state.children), queued_time=scheduled - req.arrival_time, prefill_time=first - scheduled,
        decode_time=last - first, inference_time=last - scheduled,
        mean_time_per_output_token=(last - first) / (n - 1) if n > 1 else 0.0,
        num_preemptions=req.num_preemptions, num_cached_tokens=max(req.num_cached_tokens, 0))
