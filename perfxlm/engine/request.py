"""A request as the scheduler sees it: tokens so far, KV blocks, status."""

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from perfxlm.engine.structured_output import RequestGrammar
from perfxlm.logprobs import PromptLogprobs, SampleLogprobs
from perfxlm.lora.request import LoRARequest
from perfxlm.pooling_params import PoolingParams
from perfxlm.sampling_params import SamplingParams, SamplingType


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # everything from here on is finished
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6     # the grammar rejected a sampled token (vLLM: finish_reason "error")

    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH_CAPPED: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}.get(self)


@dataclass(eq=False)
class Request:
    """One sequence being generated (a prompt with n > 1 becomes n of these), or one prompt
    being pooled: then `pooling_params` is set, and `sampling_params` is a neutral one that
    only its prompt's scheduling reads (vLLM's engine requests likewise carry one or the other)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    max_tokens: int                      # resolved: params.max_tokens or room left in max_model_len
    parent_id: str | None = None         # the user's request id when n > 1
    index: int = 0                       # which of the parent's n completions
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)   # prompt + output, kept in step
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache
    num_cached_tokens: int = -1          # prompt tokens served by the prefix cache (set once)
    block_ids: list[int] = field(default_factory=list)      # KV blocks, in token order
    block_hashes: list[int] = field(default_factory=list)   # chained hashes of full blocks
    num_cached_blocks: int = 0           # leading block_ids already offered to the prefix cache
    stop_reason: int | str | None = None
    generator: np.random.Generator | None = None             # per-request RNG when seeded
    logprobs: SampleLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    cumulative_logprob: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    wants_prompt_logprobs: bool = False
    grammar: RequestGrammar | None = None  # structured outputs: fed every sampled token, masks the logits
    pooling_params: PoolingParams | None = None  # a pooling request's, verified (its task set)
    token_type_ids: list[int] | None = None  # a cross-encoder pair's segment ids, one per prompt token
    pooled_rows: dict[int, np.ndarray] = field(default_factory=dict)  # prompt position -> its (W,) output row
    lora_request: LoRARequest | None = None  # the adapter its rows run with
    plain_draw: bool = field(default=False, init=False)  # each token a draw from softmax(logits) as they are

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.plain_draw = _plain_draw(self.sampling_params)
        self.wants_prompt_logprobs = self.sampling_params.prompt_logprobs is not None
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.seed is not None:
            self.generator = np.random.default_rng(self.sampling_params.seed % (1 << 64))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished()

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


def _plain_draw(p: SamplingParams) -> bool:
    """Unseeded random sampling at temperature 1 with nothing that masks, biases, penalises or
    truncates the logits first, and no logprobs: the sampler's short path (a throughput
    bench's requests, vLLM's random-sampling defaults)."""
    return (p.sampling_type == SamplingType.RANDOM and p.temperature == 1.0 and p.logprobs is None
            and p.allowed_token_ids is None and not p.bad_words and not p.logit_bias
            and (p.min_tokens == 0 or not p.all_stop_token_ids)
            and p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
            and p.top_k <= 0 and p.top_p == 1.0 and p.min_p == 0.0)
