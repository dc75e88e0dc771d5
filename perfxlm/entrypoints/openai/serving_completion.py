"""POST /v1/completions: one engine request per prompt, merged into one answer or one stream."""

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from perfxlm.entrypoints.openai.protocol import (CompletionRequest, CompletionResponse, CompletionResponseChoice,
                                                 CompletionResponseStreamChoice, CompletionStreamResponse,
                                                 UsageInfo)
from perfxlm.entrypoints.openai.serving_common import (OpenAIServing, clamp_prompt_logprobs,
                                                       merge_async_iterators, stream_error_event, usage_flags)
from perfxlm.exceptions import EngineGenerateError, VLLMValidationError
from perfxlm.outputs import RequestOutput

logger = logging.getLogger(__name__)

Prompt = tuple[list[int], str | None]  # token ids, and the text they came from (None for token prompts)


class OpenAIServingCompletion(OpenAIServing):
    """The legacy completions API, with vLLM's extensions."""

    async def create_completion(self, request: CompletionRequest,
                                raw_request: Request) -> CompletionResponse | StreamingResponse:
        """Check the request, start its engine requests and answer (a body, or an SSE stream).
        Errors found here raise (the route answers them with vLLM's error JSON)."""
        self.check_model(request.model)
        check_unsupported(request)
        response_id = f"cmpl-{raw_request.headers.get('X-Request-Id') or request.request_id}"
        prompts = [self._render(p, request) for p in _prompt_list(request.prompt)]
        generators = []
        for i, (ids, text) in enumerate(prompts):
            max_tokens = self.max_tokens(request.max_tokens, len(ids), "max_tokens")
            echo_only = request.echo and request.max_tokens == 0  # the engine still runs one step
            params = self.sampling_params(request, 1 if echo_only else max_tokens, request.logprobs)
            engine_id = f"{response_id}-{i}"
            self.log_request(engine_id, text if text is not None else ids, params)
            prompt = {"prompt_token_ids": ids} if text is None else {"prompt_token_ids": ids, "prompt": text}
            generators.append(self.engine.generate(prompt, params, engine_id, priority=request.priority))
        created = int(time.time())
        if request.stream:
            return StreamingResponse(self._stream(request, response_id, created, generators),
                                     media_type="text/event-stream")
        finals: list[RequestOutput | None] = [None] * len(generators)
        async for i, res in merge_async_iterators(*generators):
            finals[i] = res
        return self._response(request, response_id, created, prompts, finals)

    def _render(self, prompt: str | list[int], request: CompletionRequest) -> Prompt:
        if isinstance(prompt, str):
            return self.tokenize(prompt, request.add_special_tokens, request.truncate_prompt_tokens), prompt
        return self.check_prompt(list(prompt), request.truncate_prompt_tokens), None

    def _prompt_text(self, res: RequestOutput, request: CompletionRequest) -> str:
        if request.return_token_ids:  # vLLM echoes no text then: the ids say it
            return ""
        if res.prompt is not None:
            return res.prompt
        return self.require_tokenizer().decode(res.prompt_token_ids)

    def _response(self, request: CompletionRequest, response_id: str, created: int, prompts: list[Prompt],
                  finals: list[RequestOutput | None]) -> CompletionResponse:
        choices: list[CompletionResponseChoice] = []
        num_prompt_tokens = num_generated_tokens = 0
        as_id = self.tokens_as_ids(request)
        for (ids, _), res in zip(prompts, finals):
            if res is None:
                raise EngineGenerateError(f"the engine gave no output for request {response_id}")
            prompt_logprobs = clamp_prompt_logprobs(res.prompt_logprobs)
            for out in res.outputs:
                _check_not_error(out.finish_reason)
                token_ids, logprobs, text = list(out.token_ids), out.logprobs, out.text
                if request.echo:
                    prompt_text = self._prompt_text(res, request)
                    if request.max_tokens == 0:
                        token_ids, logprobs, text = list(ids), prompt_logprobs, prompt_text
                    else:
                        token_ids = [*ids, *out.token_ids]
                        logprobs = None if out.logprobs is None else [*(prompt_logprobs or [None] * len(ids)),
                                                                      *out.logprobs]
                        text = prompt_text + out.text
                choices.append(CompletionResponseChoice(
                    index=len(choices), text=text,
                    logprobs=None if request.logprobs is None else self.completion_logprobs(
                        token_ids, logprobs or [], request.logprobs, as_id=as_id),
                    finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                    token_ids=list(out.token_ids) if request.return_token_ids else None,
                    prompt_logprobs=prompt_logprobs,
                    prompt_token_ids=list(ids) if request.return_token_ids else None))
                num_generated_tokens += len(out.token_ids)
            num_prompt_tokens += len(res.prompt_token_ids)
        usage = self.usage(num_prompt_tokens, num_generated_tokens, finals[-1].num_cached_tokens)
        return CompletionResponse(id=response_id, created=created, model=self.model_name, choices=choices,
                                  system_fingerprint=self.system_fingerprint, usage=usage)

    async def _stream(self, request: CompletionRequest, response_id: str, created: int,
                      generators: list[AsyncGenerator[RequestOutput, None]]) -> AsyncIterator[str]:
        """SSE events: one choice per chunk (index = prompt * n + sample), a usage chunk if
        asked, then [DONE]. A failure once the 200 went out is sent as an error event."""
        n = request.n
        text_lens = [0] * (n * len(generators))
        num_tokens = [0] * (n * len(generators))
        sent_prompt = [False] * (n * len(generators))
        prompt_tokens = [0] * len(generators)
        num_cached = None
        include_usage, continuous = usage_flags(request.stream_options, self.options.enable_force_include_usage)
        as_id = self.tokens_as_ids(request)
        try:
            async for p, res in merge_async_iterators(*generators):
                if num_cached is None:
                    num_cached = res.num_cached_tokens
                if res.prompt_token_ids is not None:
                    prompt_tokens[p] = len(res.prompt_token_ids)
                for out in res.outputs:
                    _check_not_error(out.finish_reason)
                    i = out.index + p * n
                    text, token_ids, logprobs = out.text, list(out.token_ids), out.logprobs
                    prompt_ids = None
                    if request.echo and not sent_prompt[i]:
                        prompt_text = self._prompt_text(res, request)
                        prompt_lps = clamp_prompt_logprobs(res.prompt_logprobs)
                        if request.max_tokens == 0:
                            text, token_ids, logprobs = prompt_text, list(res.prompt_token_ids), prompt_lps
                        else:
                            text = prompt_text + text
                            token_ids = [*res.prompt_token_ids, *token_ids]
                            if logprobs is not None:
                                logprobs = [*(prompt_lps or [None] * len(res.prompt_token_ids)), *logprobs]
                        sent_prompt[i] = True
                    elif request.return_token_ids and not sent_prompt[i]:
                        prompt_ids = list(res.prompt_token_ids)
                        sent_prompt[i] = True
                    if not text and not token_ids and not num_tokens[i]:
                        continue  # a prefill step with nothing to say yet
                    choice_logprobs = None
                    if request.logprobs is not None:
                        choice_logprobs = self.completion_logprobs(token_ids, logprobs or [], request.logprobs,
                                                                   text_lens[i], as_id=as_id)
                    text_lens[i] += len(text)
                    num_tokens[i] += len(out.token_ids)
                    chunk = CompletionStreamResponse(
                        id=response_id, object="text_completion", created=created, model=self.model_name,
                        choices=[CompletionResponseStreamChoice(
                            index=i, text=text, logprobs=choice_logprobs, finish_reason=out.finish_reason,
                            stop_reason=out.stop_reason, prompt_token_ids=prompt_ids,
                            token_ids=list(out.token_ids) if request.return_token_ids else None)])
                    if continuous:
                        chunk.usage = UsageInfo(prompt_tokens=prompt_tokens[p], completion_tokens=num_tokens[i],
                                                total_tokens=prompt_tokens[p] + num_tokens[i])
                    if out.finish_reason is not None and not include_usage:
                        chunk.system_fingerprint = self.system_fingerprint
                    yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
            if include_usage:
                usage = self.usage(sum(prompt_tokens), sum(num_tokens), num_cached)
                final = CompletionStreamResponse(id=response_id, object="text_completion", created=created,
                                                 model=self.model_name, choices=[], usage=usage,
                                                 system_fingerprint=self.system_fingerprint)
                yield f"data: {final.model_dump_json(exclude_unset=True, exclude_none=True)}\n\n"
        except Exception as e:  # noqa: BLE001 - the 200 is sent: the error goes in the stream
            yield stream_error_event(e)
        yield "data: [DONE]\n\n"


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    """A str or a list of ints is one prompt; a list of those is many."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _check_not_error(finish_reason: str | None) -> None:
    if finish_reason == "error":
        raise EngineGenerateError("Internal server error")


def check_unsupported(request: Any) -> None:
    """What vLLM offers and perfxlm does not (yet): a 400 or 501 up front, not a silent no-op."""
    if getattr(request, "suffix", None) is not None:
        raise VLLMValidationError("suffix is not supported for this model: it has no fill-in-the-middle "
                                  "template.", parameter="suffix")
    if request.use_beam_search:
        raise NotImplementedError("perfxlm does not support beam search yet")
