"""Request and response bodies of the OpenAI-compatible server, with vLLM 0.32's field names,
defaults and key order (the key order is what a client sees in the JSON)."""

import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from perfxlm.exceptions import VLLMValidationError
from perfxlm.logprobs import Logprob
from perfxlm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_INT64 = (-(1 << 63), (1 << 63) - 1)
Int64 = Annotated[int, Field(ge=_INT64[0], le=_INT64[1])]
StopParam = str | Annotated[list[str], Field(max_length=int(os.environ.get("VLLM_MAX_STOP_STRINGS", "4")))] | None


def random_uuid() -> str:
    """16 hex characters, as vLLM's ids."""
    return uuid.uuid4().hex[:16]


class OpenAIBaseModel(BaseModel):
    """Unknown request fields are accepted and ignored, as the OpenAI API and vLLM do."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="wrap")
    @classmethod
    def _log_extra_fields(cls, data: Any, handler: Any) -> Any:
        result = handler(data)
        known = {f.alias or name for name, f in cls.model_fields.items()} | cls.model_fields.keys()
        if isinstance(data, dict) and (extra := data.keys() - known):
            logger.debug("The following fields were present in the request but ignored: %s", extra)
        return result


# ---- shared -------------------------------------------------------------------------------

class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class ModelPermission(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{random_uuid()}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class PromptTokenUsageInfo(OpenAIBaseModel):
    cached_tokens: int | None = None
    created_cache_tokens: int | None = None
    multimodal_tokens: dict[str, int] | None = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None
    completion_tokens_details: dict[str, int] | None = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


# ---- structured outputs (response_format, structured_outputs) -------------------------------

class JsonSchemaResponseFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    # OpenAI's key is "schema", which would shadow BaseModel.schema: hence the alias
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class LegacyStructuralTag(OpenAIBaseModel):
    begin: str
    structural_tag_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    end: str


class LegacyStructuralTagResponseFormat(OpenAIBaseModel):
    type: Literal["structural_tag"]
    structures: list[LegacyStructuralTag]
    triggers: list[str]


class StructuralTagResponseFormat(OpenAIBaseModel):
    type: Literal["structural_tag"]
    format: Any


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


AnyStructuralTagResponseFormat = LegacyStructuralTagResponseFormat | StructuralTagResponseFormat
AnyResponseFormat = ResponseFormat | StructuralTagResponseFormat | LegacyStructuralTagResponseFormat


def structured_outputs_from_response_format(structured_outputs: StructuredOutputsParams | None,
                                            response_format: AnyResponseFormat | None
                                            ) -> StructuredOutputsParams | None:
    """The request's constraint, as vLLM builds it: `response_format` (unless "text") overrides
    the matching field of `structured_outputs`; two kinds left set is vLLM's error."""
    if response_format is None or response_format.type == "text":
        return structured_outputs
    if response_format.type == "json_object":
        overrides: dict[str, Any] = {"json_object": True}
    elif response_format.type == "json_schema":
        overrides = {"json": response_format.json_schema.json_schema}  # the validator made sure it is set
    else:
        overrides = {"structural_tag": json.dumps(response_format.model_dump(by_alias=True))}
    if structured_outputs is None:
        return StructuredOutputsParams(**overrides)
    return dataclasses.replace(structured_outputs, **overrides)


def _check_structural_tag(payload: Any, parameter: str) -> None:
    """vLLM parses a structural tag when the request is read, so that a malformed one is a 400
    naming the field rather than a failed generation."""
    from perfxlm.engine.structured_output import validate_xgrammar_grammar, check_json_nesting
    message = f"Invalid {parameter} structural_tag specification."
    if isinstance(payload, str) and not payload:
        raise VLLMValidationError(message, parameter=parameter)
    if isinstance(payload, str):
        check_json_nesting(payload, structural_tag=True)  # its own message, not "malformed"
    try:
        validate_xgrammar_grammar(StructuredOutputsParams(structural_tag=payload))
    except (TypeError, ValueError) as e:
        raise VLLMValidationError(message, parameter=parameter) from e


def check_structured_outputs(data: dict[str, Any], count_parameter: str | None) -> None:
    """vLLM's request-time checks of `response_format` and `structured_outputs` (the raw body):
    a json_schema format needs its `json_schema`, a structural tag must parse, and at most one
    of json / regex / choice. The schema itself is checked when the request is added."""
    response_format = data.get("response_format")
    if isinstance(response_format, dict):
        if response_format.get("type") == "json_schema" and response_format.get("json_schema") is None:
            raise VLLMValidationError("When response_format type is 'json_schema', the 'json_schema' field must "
                                      "be provided.", parameter="response_format")
        if response_format.get("type") == "structural_tag":
            try:
                tag = TypeAdapter(AnyStructuralTagResponseFormat).validate_python(response_format)
                payload = json.dumps(tag.model_dump(by_alias=True))
            except (ValidationError, TypeError, ValueError) as e:
                raise VLLMValidationError("Invalid response_format structural_tag specification.",
                                          parameter="response_format") from e
            _check_structural_tag(payload, "response_format")
    structured_outputs = data.get("structured_outputs")
    if not isinstance(structured_outputs, dict):
        return  # None, or a type pydantic reports
    if sum(structured_outputs.get(k) is not None for k in ("json", "regex", "choice")) > 1:
        raise VLLMValidationError("You can only use one kind of constraints for structured outputs ('json', "
                                  "'regex' or 'choice').", parameter=count_parameter)
    if structured_outputs.get("structural_tag") is not None:
        _check_structural_tag(structured_outputs["structural_tag"], "structured_outputs")


# ---- sampling fields both routes share ------------------------------------------------------

class SamplingFields(OpenAIBaseModel):
    """vLLM's sampling extensions, shared by completions and chat (in vLLM's order)."""

    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    bad_words: list[str] = Field(default_factory=list)
    priority: Int64 = 0
    request_id: str = Field(default_factory=random_uuid)
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_common(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("stream_options") and not data.get("stream"):
            raise VLLMValidationError("Stream options can only be defined when `stream=True`.",
                                      parameter="stream_options")
        for name in ("prompt_logprobs", "logprobs", "top_logprobs"):
            value = data.get(name)
            if value is None or isinstance(value, bool) and name == "logprobs":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise VLLMValidationError(f"`{name}` must be an integer.", parameter=name, value=value)
            if value < 0 and value != -1:
                raise VLLMValidationError(f"`{name}` must be a positive value or -1.", parameter=name,
                                          value=value)
        prompt_logprobs = data.get("prompt_logprobs")
        if prompt_logprobs is not None and data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise VLLMValidationError("`prompt_logprobs` are not available when `stream=True`.",
                                      parameter="prompt_logprobs")
        if data.get("use_beam_search") and data.get("stream"):
            raise VLLMValidationError("Streaming is not currently supported with beam search",
                                      parameter="stream")
        salt = data.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise VLLMValidationError("Parameter 'cache_salt' must be a non-empty string if provided.",
                                      parameter="cache_salt")
        return data


# ---- /v1/completions ------------------------------------------------------------------------

class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]] | str | list[str] | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    presence_penalty: float | None = None
    seed: Int64 | None = None
    stop: StopParam = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    add_special_tokens: bool = True
    response_format: AnyResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_prompt(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("max_tokens") is None:  # null means the default, 16
            data = {**data, "max_tokens": 16}
        check_structured_outputs(data, "structured_outputs")
        prompt = data.get("prompt")
        if prompt is None or prompt == "" or prompt == []:
            raise VLLMValidationError("Either prompt or prompt_embeds must be provided and non-empty.",
                                      parameter="prompt")
        max_prompts = int(os.environ.get("VLLM_MAX_COMPLETION_PROMPTS", "1024"))
        if isinstance(prompt, list) and not isinstance(prompt[0], int) and len(prompt) > max_prompts:
            raise VLLMValidationError(
                f"prompt list length {len(prompt)} exceeds the maximum allowed count of {max_prompts}. To "
                "increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS environment variable.",
                parameter="prompt")
        return data


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_token_ids: list[int] | None = None
    routed_experts: str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- /v1/chat/completions -------------------------------------------------------------------

class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    model: str | None = None
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    response_format: AnyResponseFormat | None = None
    seed: Int64 | None = None
    stop: StopParam = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = "none"
    parallel_tool_calls: bool | None = True
    user: str | None = None
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_chat(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        check_structured_outputs(data, None)
        so = data.get("structured_outputs")
        if (isinstance(so, dict) and any(so.get(k) is not None for k in ("json", "regex", "choice"))
                and data.get("tool_choice", "none") not in ("none", "auto", "required")):
            raise VLLMValidationError("You can only either use constraints for structured outputs or tools, not "
                                      "both.")
        top_logprobs = data.get("top_logprobs")
        if isinstance(top_logprobs, int) and (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
            raise VLLMValidationError("when using `top_logprobs`, `logprobs` must be set to true.",
                                      parameter="top_logprobs")
        if data.get("continue_final_message") and data.get("add_generation_prompt", True):
            raise VLLMValidationError("Cannot set both `continue_final_message` and `add_generation_prompt` to "
                                      "True.", parameter="continue_final_message")
        if data.get("tools") == []:
            raise VLLMValidationError("`tools` must not be an empty list.", parameter="tools")
        if "tool_choice" not in data and data.get("tools"):
            data = {**data, "tool_choice": "auto"}
        choice = data.get("tool_choice")
        if choice not in (None, "none") and not data.get("tools"):
            raise VLLMValidationError("When using `tool_choice`, `tools` must be set.", parameter="tool_choice")
        return data


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | None = None
    refusal: str | None = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    reasoning: str | None = None


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    routed_experts: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    service_tier: str | None = None
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


# ---- /tokenize, /detokenize -----------------------------------------------------------------

class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _check_generation_prompt(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("continue_final_message") and data.get("add_generation_prompt", True):
            raise VLLMValidationError("Cannot set both `continue_final_message` and `add_generation_prompt` to "
                                      "True.", parameter="continue_final_message")
        return data


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
