"""Generation and pooling outputs, field for field as in vLLM."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from perfxlm.logprobs import PromptLogprobs, SampleLogprobs

if TYPE_CHECKING:  # pooling outputs are tensors; generation needs no torch
    import torch


@dataclass
class CompletionOutput:
    """One completion of a request.

    index: which of the request's `n` completions this is.
    cumulative_logprob: sum of the chosen tokens' logprobs; None unless logprobs were asked.
    finish_reason: "stop", "length" or "abort"; None while unfinished.
    stop_reason: the stop string (str) or stop token id (int) that ended it, else None.
    """

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"CompletionOutput(index={self.index}, text={self.text!r}, "
                f"token_ids={list(self.token_ids)}, cumulative_logprob={self.cumulative_logprob}, "
                f"logprobs={self.logprobs}, finish_reason={self.finish_reason}, "
                f"stop_reason={self.stop_reason})")


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


class RequestOutput:
    """The output of one request: its prompt and its `n` completions."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: PromptLogprobs | None,
        outputs: list[CompletionOutput],
        finished: bool,
        metrics: RequestMetrics | None = None,
        lora_request: Any = None,
        encoder_prompt: str | None = None,
        encoder_prompt_token_ids: list[int] | None = None,
        num_cached_tokens: int | None = None,
        **kwargs: Any,  # vLLM accepts (and ignores) fields added in later versions
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.lora_request = lora_request
        self.encoder_prompt = encoder_prompt
        self.encoder_prompt_token_ids = encoder_prompt_token_ids
        self.num_cached_tokens = num_cached_tokens
        self.kv_transfer_params = kwargs.get("kv_transfer_params")

    def add(self, next_output: "RequestOutput", aggregate: bool) -> None:
        """Merge a later output of the same request into this one (streaming)."""
        self.finished |= next_output.finished
        self.prompt_logprobs = next_output.prompt_logprobs or self.prompt_logprobs
        for next_completion in next_output.outputs:
            for i, completion in enumerate(self.outputs):
                if completion.index != next_completion.index:
                    continue
                if aggregate:
                    completion.text += next_completion.text
                    if not isinstance(completion.token_ids, list):
                        completion.token_ids = list(completion.token_ids)
                    completion.token_ids.extend(next_completion.token_ids)
                    if next_completion.logprobs:
                        completion.logprobs = (completion.logprobs or []) + next_completion.logprobs
                    completion.cumulative_logprob = next_completion.cumulative_logprob
                    completion.finish_reason = next_completion.finish_reason
                    completion.stop_reason = next_completion.stop_reason
                else:
                    self.outputs[i] = next_completion
                break
            else:
                self.outputs.append(next_completion)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, "
                f"prompt_logprobs={self.prompt_logprobs}, outputs={self.outputs}, "
                f"finished={self.finished}, metrics={self.metrics}, "
                f"lora_request={self.lora_request}, num_cached_tokens={self.num_cached_tokens})")


@dataclass(frozen=True)
class RequestError:
    """A request-level error that does not mark the engine as unhealthy."""

    code: str
    message: str
    retryable: bool = False


@dataclass
class PoolingOutput:
    """The pooled data of one request: an embedding (D,), class probabilities (C,), a score
    (a 0-d or (1,) tensor), or one row per token (T, D) for the token tasks."""

    data: "torch.Tensor"

    def __repr__(self) -> str:
        return f"PoolingOutput(data={self.data})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, self.__class__) and bool((self.data == other.data).all())


_O = TypeVar("_O")


class PoolingRequestOutput(Generic[_O]):
    """The output of one pooling request (LLM.encode); `outputs` is a PoolingOutput, or the
    task's own output class in the subclasses LLM.embed / classify / score return."""

    def __init__(self, request_id: str, outputs: _O, prompt_token_ids: list[int], num_cached_tokens: int,
                 finished: bool, *, error: RequestError | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_cached_tokens = num_cached_tokens
        self.finished = finished
        self.outputs = outputs
        self.error = error

    def __repr__(self) -> str:
        error = f", error={self.error!r}" if self.error is not None else ""
        return (f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
                f"prompt_token_ids={self.prompt_token_ids}, num_cached_tokens={self.num_cached_tokens}, "
                f"finished={self.finished}{error})")

    @classmethod
    def _wrap(cls, base: "PoolingRequestOutput", outputs: Any) -> Any:
        return cls(request_id=base.request_id, outputs=outputs, prompt_token_ids=base.prompt_token_ids,
                   num_cached_tokens=base.num_cached_tokens, finished=base.finished, error=base.error)


@dataclass
class EmbeddingOutput:
    """One embedding vector (its length is the model's hidden size, or the dimensions asked)."""

    embedding: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> "EmbeddingOutput":
        pooled_data = pooling_output.data
        if pooled_data.ndim != 1:
            raise ValueError("pooled_data should be a 1-D embedding vector")
        return EmbeddingOutput(pooled_data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)

    def __repr__(self) -> str:
        return f"EmbeddingOutput(hidden_size={self.hidden_size})"


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> "EmbeddingRequestOutput":
        outputs = EmbeddingOutput([]) if request_output.error is not None else \
            EmbeddingOutput.from_base(request_output.outputs)
        return EmbeddingRequestOutput._wrap(request_output, outputs)


@dataclass
class ClassificationOutput:
    """One probability vector (one entry per class)."""

    probs: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> "ClassificationOutput":
        pooled_data = pooling_output.data
        if pooled_data.ndim != 1:
            raise ValueError("pooled_data should be a 1-D probability vector")
        return ClassificationOutput(pooled_data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)

    def __repr__(self) -> str:
        return f"ClassificationOutput(num_classes={self.num_classes})"


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> "ClassificationRequestOutput":
        outputs = ClassificationOutput([]) if request_output.error is not None else \
            ClassificationOutput.from_base(request_output.outputs)
        return ClassificationRequestOutput._wrap(request_output, outputs)


@dataclass
class ScoringOutput:
    """One similarity score: a cross-encoder's probability, or a bi-encoder's cosine."""

    score: float

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> "ScoringOutput":
        pooled_data = pooling_output.data.squeeze()  # classify: (1,); embed pairs: a scalar
        if pooled_data.ndim != 0:
            raise ValueError("pooled_data should be a scalar score")
        return ScoringOutput(pooled_data.item())

    def __repr__(self) -> str:
        return f"ScoringOutput(score={self.score})"


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def from_base(request_output: PoolingRequestOutput) -> "ScoringRequestOutput":
        outputs = ScoringOutput(0.0) if request_output.error is not None else \
            ScoringOutput.from_base(request_output.outputs)
        return ScoringRequestOutput._wrap(request_output, outputs)
