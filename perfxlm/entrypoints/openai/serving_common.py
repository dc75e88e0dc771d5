"""What the completion, chat and tokenize handlers share: the served model (its names, the 404),
prompts checked against the context length, sampling defaults, logprobs in OpenAI's shapes,
errors in vLLM's JSON, and cancelling a handler when its client goes away."""

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from perfxlm.entrypoints.openai.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                                 ChatCompletionLogProbsContent, CompletionLogProbs, ErrorInfo,
                                                 ErrorResponse, PromptTokenUsageInfo, StreamOptions, UsageInfo,
                                                 structured_outputs_from_response_format)
from perfxlm.exceptions import EngineDeadError, EngineGenerateError, VLLMClientError, VLLMValidationError
from perfxlm.logprobs import Logprob
from perfxlm.sampling_params import RequestOutputKind, SamplingParams
from perfxlm.version import __version__

logger = logging.getLogger(__name__)

T = TypeVar("T")
_LOGPROB_FLOOR = -9999.0  # what OpenAI sends for -inf; JSON has no infinity
_DEFAULT_SAMPLING = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


class ModelNotFoundError(VLLMClientError):
    """The request named a model this server does not serve (404, param "model")."""


@dataclass
class ServerOptions:
    """The frontend flags the handlers read."""

    served_model_names: list[str]
    response_role: str = "assistant"
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    enable_force_include_usage: bool = False
    enable_prompt_tokens_details: bool = False
    return_tokens_as_token_ids: bool = False
    enable_log_requests: bool = False
    max_log_len: int | None = None


class OpenAIServing:
    """The served model and the checks every generate route runs before the engine sees a request."""

    def __init__(self, engine: Any, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.model_config = engine.model_config
        self.model_name = options.served_model_names[0]
        self.max_model_len: int = self.model_config.max_model_len
        self.tokenizer = engine.get_tokenizer()
        self.default_sampling_params: dict[str, Any] = dict(self.model_config.get_diff_sampling_param())
        config_id = f"{self.model_config.model}|{self.model_config.dtype}|{self.max_model_len}"
        self.system_fingerprint = f"perfxlm-{__version__}-{hashlib.sha256(config_id.encode()).hexdigest()[:8]}"
        # vLLM refuses text longer than this many characters before tokenizing it
        self.max_chars_per_token = _max_chars_per_token(self.tokenizer)
        # the engine's own checker (AsyncLLM -> LLMEngine -> InputProcessor), so the server and the
        # engine cannot disagree on what compiles
        self.structured_outputs = engine.engine.input_processor.structured_outputs

    # ---- requests -------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        """None or "" is the base model; any served name is accepted; anything else is a 404."""
        if name and name not in self.options.served_model_names:
            raise ModelNotFoundError(f"The model `{name}` does not exist. Valid aliases: "
                                     f"{', '.join(self.options.served_model_names)}.")

    def require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise VLLMValidationError("This route needs a tokenizer, but the server was started with "
                                      "--skip-tokenizer-init")
        return self.tokenizer

    def tokenize(self, text: str, add_special_tokens: bool, truncate: int | None = None) -> list[int]:
        tok = self.require_tokenizer()
        if truncate is None and len(text) > self.max_model_len * self.max_chars_per_token:
            raise VLLMValidationError(
                f"You passed {len(text)} input characters. However, the model's context length is only "
                f"{self.max_model_len} tokens (at most {self.max_model_len * self.max_chars_per_token} "
                "characters). Please reduce the length of the input prompt.",
                parameter="input_text", value=len(text))
        return self.check_prompt(tok.encode(text, add_special_tokens=add_special_tokens), truncate)

    def check_prompt(self, token_ids: list[int], truncate: int | None = None) -> list[int]:
        """Truncate (keeping the end, as vLLM) when asked, then refuse a prompt that leaves no room."""
        if truncate is not None:
            keep = self.max_model_len if truncate == -1 else truncate
            token_ids = token_ids[-keep:] if keep else []
        if not token_ids:
            raise VLLMValidationError("The decoder prompt cannot be empty", parameter="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if t >= vocab), None)
        if bad is not None:
            raise VLLMValidationError(f"Token id {bad} is out of vocabulary", parameter="prompt", value=bad)
        if len(token_ids) > self.max_model_len:
            raise VLLMValidationError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
                f"contains {len(token_ids)} input tokens, which is more than the model can take. Please reduce "
                "the length of the input prompt.", parameter="input_tokens", value=len(token_ids))
        return token_ids

    def max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """vLLM's rule: the request's value (else the generation_config's), clamped to what the
        context leaves; more than the whole context is an error."""
        if requested is not None and requested > self.max_model_len:
            raise VLLMValidationError(f"{param}={requested} cannot be greater than max_model_len="
                                      f"{self.max_model_len}. Please request fewer output tokens.",
                                      parameter=param, value=requested)
        fallback = requested if requested is not None else self.default_sampling_params.get("max_tokens")
        room = self.max_model_len - prompt_len
        return room if fallback is None else min(room, fallback)

    def sampling_defaults(self, request: Any) -> dict[str, Any]:
        """Request value, else the model's generation_config, else OpenAI's default."""
        return {name: value if (value := getattr(request, name)) is not None
                else self.default_sampling_params.get(name, default)
                for name, default in _DEFAULT_SAMPLING.items()}

    def stop_token_ids(self, request: Any) -> list[int]:
        defaults = self.default_sampling_params.get("stop_token_ids") or []
        return list(dict.fromkeys([*(request.stop_token_ids or []), *defaults]))

    def sampling_params(self, request: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """A completion or chat request's SamplingParams: its values over the server's defaults,
        DELTA for a stream and FINAL_ONLY for a whole answer, and the structured outputs
        constraint from `response_format` / `structured_outputs` (checked here: a bad schema or
        regex raises VLLMValidationError). With echo, the prompt's logprobs default to the
        requested logprobs, as in vLLM."""
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo:
            prompt_logprobs = logprobs
        params = SamplingParams.from_optional(
            n=request.n, presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            **self.sampling_defaults(request), seed=request.seed, stop=request.stop,
            stop_token_ids=self.stop_token_ids(request), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            ignore_eos=request.ignore_eos, max_tokens=max_tokens, min_tokens=request.min_tokens,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
            logit_bias=request.logit_bias, allowed_token_ids=request.allowed_token_ids,
            bad_words=request.bad_words,
            structured_outputs=structured_outputs_from_response_format(request.structured_outputs,
                                                                       request.response_format))
        # a constraint that cannot compile is a 400 before anything is queued, a stream's too (the
        # engine would report it only after the stream's 200 went out)
        self.structured_outputs.validate(params)
        return params

    def usage(self, prompt_tokens: int, completion_tokens: int, num_cached_tokens: int | None) -> UsageInfo:
        """`usage`, with `prompt_tokens_details` under --enable-prompt-tokens-details."""
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        if self.options.enable_prompt_tokens_details:
            usage.prompt_tokens_details = PromptTokenUsageInfo(cached_tokens=num_cached_tokens or 0)
        return usage

    def tokens_as_ids(self, request: Any) -> bool:
        return bool(request.return_tokens_as_token_ids or self.options.return_tokens_as_token_ids)

    def log_request(self, request_id: str, prompt: Any, params: Any) -> None:
        if not self.options.enable_log_requests:
            return
        logger.info("Received request %s: params: %s", request_id, params)
        if logger.isEnabledFor(logging.DEBUG):
            shown = prompt if self.options.max_log_len is None else str(prompt)[:self.options.max_log_len]
            logger.debug("Request %s prompt: %r", request_id, shown)

    # ---- logprobs ---------------------------------------------------------------------------

    def _token_text(self, lp: Logprob | None, token_id: int, as_id: bool) -> str:
        if as_id:
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob] | None], k: int,
                            initial_offset: int = 0, as_id: bool = False) -> CompletionLogProbs:
        """OpenAI's legacy shape: the sampled token and up to k+1 top entries per position."""
        # every field set at construction: a stream chunk is dumped with exclude_unset, and fields
        # only appended to would count as unset and vanish from it
        out = CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        last_len = 0
        for i, token_id in enumerate(token_ids):
            step = logprobs[i] if i < len(logprobs) else None
            if step is None or token_id not in step:
                token = self._token_text(None, token_id, as_id)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                token = self._token_text(step[token_id], token_id, as_id)
                out.token_logprobs.append(max(step[token_id].logprob, _LOGPROB_FLOOR))
                out.top_logprobs.append({self._token_text(lp, tid, as_id): max(lp.logprob, _LOGPROB_FLOOR)
                                         for j, (tid, lp) in enumerate(step.items()) if k == -1 or j <= k})
            out.tokens.append(token)
            out.text_offset.append(initial_offset if not out.text_offset else out.text_offset[-1] + last_len)
            last_len = len(token)
        return out

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, k: int,
                      as_id: bool = False) -> ChatCompletionLogProbs:
        """The chat shape: exactly the first k entries (sampled token first) under each token."""
        content = []
        for i, token_id in enumerate(token_ids):
            step = logprobs[i] if logprobs is not None and i < len(logprobs) else None
            if step is None or token_id not in step:
                token = self._token_text(None, token_id, as_id)
                content.append(ChatCompletionLogProbsContent(token=token, bytes=list(token.encode("utf-8",
                                                                                             "replace"))))
                continue
            chosen = step[token_id]
            top = [ChatCompletionLogProb(token=(t := self._token_text(lp, tid, as_id)),
                                         logprob=max(lp.logprob, _LOGPROB_FLOOR),
                                         bytes=list(t.encode("utf-8", "replace")))
                   for j, (tid, lp) in enumerate(step.items()) if (k and j < k) or k == -1]
            decoded = chosen.decoded_token
            content.append(ChatCompletionLogProbsContent(
                token=self._token_text(chosen, token_id, as_id), logprob=max(chosen.logprob, _LOGPROB_FLOOR),
                bytes=None if decoded is None else list(decoded.encode("utf-8", "replace")), top_logprobs=top))
        return ChatCompletionLogProbs(content=content)


# ---- errors -----------------------------------------------------------------------------------

def error_response(exc: BaseException | str, err_type: str = "BadRequestError",
                   status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None) -> ErrorResponse:
    """vLLM's mapping from an exception to the error JSON and its HTTP status."""
    if isinstance(exc, BaseException):
        if isinstance(exc, ModelNotFoundError):
            err_type, status, param = "NotFoundError", HTTPStatus.NOT_FOUND, "model"
        elif isinstance(exc, VLLMValidationError):
            err_type, status, param = "BadRequestError", HTTPStatus.BAD_REQUEST, exc.parameter
        elif isinstance(exc, (EngineDeadError, EngineGenerateError)):
            err_type, status, param = "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR, None
        elif isinstance(exc, (VLLMClientError, ValueError, TypeError, OverflowError)) or any(
                cls.__name__ == "TemplateError" for cls in type(exc).__mro__):
            err_type, status, param = "BadRequestError", HTTPStatus.BAD_REQUEST, None
        elif isinstance(exc, NotImplementedError):
            err_type, status, param = "NotImplementedError", HTTPStatus.NOT_IMPLEMENTED, None
        else:
            err_type, status, param = "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR, None
        if status == HTTPStatus.INTERNAL_SERVER_ERROR:
            logger.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        exc = sanitize_message(str(exc))
    return ErrorResponse(error=ErrorInfo(message=exc, type=err_type, param=param, code=status.value))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# file-system paths under the usual roots (not URL paths such as /v1/completions)
_PATH = re.compile(r"(?<![\w.:/])/(?:home|root|tmp|usr|opt|var|work|mnt|etc|srv|data|lib|app|proc)/[\w./+-]*")


def sanitize_message(message: str) -> str:
    """What vLLM's sanitize_message does before an error reaches a client: file paths become
    `<path>` and memory addresses go, so internals (the server's layout, object ids) do not leak."""
    return _PATH.sub("<path>", _ADDRESS.sub("", message))


def error_json(exc: BaseException | ErrorResponse) -> JSONResponse:
    err = exc if isinstance(exc, ErrorResponse) else error_response(exc)
    return JSONResponse(err.model_dump(), status_code=err.error.code)


def stream_error_event(exc: BaseException) -> str:
    """An error after the 200 went out: one event (Python's json.dumps spacing, as vLLM)."""
    return f"data: {json.dumps(error_response(exc).model_dump())}\n\n"


# ---- streams ----------------------------------------------------------------------------------

def usage_flags(stream_options: StreamOptions | None, force: bool) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk)."""
    if force:
        return True, True
    if stream_options is None or not stream_options.include_usage:
        return False, False
    return True, bool(stream_options.continuous_usage_stats)


def clamp_prompt_logprobs(prompt_logprobs: list[dict[int, Logprob] | None] | None) -> Any:
    """-inf (a token the model rules out) becomes -9999.0 so that the JSON stays valid."""
    if prompt_logprobs is None:
        return None
    for entry in prompt_logprobs:
        for lp in (entry or {}).values():
            if math.isinf(lp.logprob):
                lp.logprob = _LOGPROB_FLOOR
    return prompt_logprobs


async def merge_async_iterators(*iterators: AsyncGenerator[T, None]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async generators as they come, tagged with the generator's index. If the
    consumer stops early (or is cancelled) the generators still running are cancelled, which
    aborts their engine requests."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await iterators[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            with contextlib.suppress(Exception):
                await it.aclose()


async def run_until_disconnect(raw_request: Request, handler: Awaitable[T]) -> T | None:
    """Run a handler, cancelling it (which aborts its engine requests and frees their KV blocks)
    if the client disconnects first; then nothing is sent."""
    task = asyncio.ensure_future(handler)
    listener = asyncio.ensure_future(_disconnected(raw_request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        listener.cancel()
        raise
    if task in done:
        listener.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # lets the handler's cleanup (the engine abort) run before we return
    logger.info("client of %s %s disconnected; request aborted", raw_request.method, raw_request.url.path)
    return None


async def _disconnected(raw_request: Request) -> None:
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


def _max_chars_per_token(tokenizer: Any) -> int:
    if tokenizer is None:
        return 1 << 30
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 64
    return max((len(t) for t in vocab), default=64)
