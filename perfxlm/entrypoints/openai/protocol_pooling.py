"""Request and response bodies of vLLM 0.32's pooling routes: /v1/embeddings, /pooling,
/classify, /score (/v1/score) and /rerank (/v1/rerank, /v2/rerank), field for field (the text
forms; chat-message inputs and multimodal parts are not supported here)."""

import time
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from perfxlm.entrypoints.openai.protocol import OpenAIBaseModel, UsageInfo, random_uuid
from perfxlm.exceptions import VLLMValidationError
from perfxlm.pooling_params import PoolingParams, check_removed_pooling_task

# a text, texts, a token prompt, or token prompts (a list of ints is ONE prompt)
PoolingInput = str | list[str] | list[int] | list[list[int]]



class PoolingBasicRequest(OpenAIBaseModel):
    """What every pooling request takes."""

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None  # keep the last k tokens (-1: max_model_len)
    request_id: str = Field(default_factory=random_uuid)
    priority: int = 0
    use_activation: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_removed(cls, data: Any) -> Any:
        """vLLM's reject_removed_pooling_parameters."""
        if isinstance(data, dict):
            if "normalize" in data:
                raise VLLMValidationError("Parameter `normalize` was removed; use `use_activation` instead.",
                                          parameter="normalize")
            check_removed_pooling_task(data.get("task"))
        return data


class InputRequest(PoolingBasicRequest):
    input: PoolingInput
    add_special_tokens: bool = True
    encoding_format: Literal["float", "base64"] = "float"


class EmbeddingRequest(InputRequest):
    dimensions: int | None = None

    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(task="embed", dimensions=self.dimensions, use_activation=self.use_activation)


class PoolingRequest(InputRequest):
    dimensions: int | None = None
    task: str | None = None

    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(task=self.task, use_activation=self.use_activation, dimensions=self.dimensions)


class ClassificationRequest(InputRequest):
    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(task="classify", use_activation=self.use_activation)


class ScoreRequest(PoolingBasicRequest):
    """vLLM's ScoreRequest forms: data_1 / data_2, queries / documents (or items), text_1 / text_2."""

    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None

    def pair(self) -> tuple[str | list[str], str | list[str]]:
        for first, second in ((self.data_1, self.data_2), (self.queries, self.documents),
                              (self.queries, self.items), (self.text_1, self.text_2)):
            if first is not None and second is not None:
                return first, second
        raise VLLMValidationError("A score request needs data_1 and data_2 (or queries and documents, or text_1 "
                                  "and text_2)")


class RerankRequest(PoolingBasicRequest):
    query: str
    documents: str | list[str]
    top_n: int = Field(default=0, ge=0)


class EmbeddingResponseData(OpenAIBaseModel):
    index: int
    object: str = "embedding"
    embedding: list[float] | str


class EmbeddingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"embd-{random_uuid()}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str | None = None
    data: list[EmbeddingResponseData]
    usage: UsageInfo


class PoolingResponseData(OpenAIBaseModel):
    index: int
    object: str = "pooling"
    data: list[list[float]] | list[float] | str


class PoolingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"pool-{random_uuid()}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ClassificationData(OpenAIBaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"classify-{random_uuid()}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreResponseData(OpenAIBaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"embd-{random_uuid()}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankDocument(OpenAIBaseModel):
    text: str | None = None


class RerankResult(OpenAIBaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
