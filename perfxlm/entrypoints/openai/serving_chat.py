"""POST /v1/chat/completions: the conversation rendered by the chat template, then one engine
request whose n completions come back as one answer or one stream."""

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from perfxlm.entrypoints.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse,
                                                 ChatCompletionResponseChoice, ChatCompletionResponseStreamChoice,
                                                 ChatCompletionStreamResponse, ChatMessage, DeltaMessage,
                                                 UsageInfo)
from perfxlm.entrypoints.openai.serving_common import (OpenAIServing, clamp_prompt_logprobs, stream_error_event,
                                                       usage_flags)
from perfxlm.entrypoints.openai.serving_completion import check_unsupported
from perfxlm.exceptions import EngineGenerateError, VLLMValidationError
from perfxlm.outputs import RequestOutput

logger = logging.getLogger(__name__)

# keys the server sets itself; a request's chat_template_kwargs may not change them
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "chat_template", "return_dict", "tools"}


class OpenAIServingChat(OpenAIServing):
    """The chat completions API, with vLLM's extensions."""

    async def create_chat_completion(self, request: ChatCompletionRequest,
                                     raw_request: Request) -> ChatCompletionResponse | StreamingResponse:
        """Check and render the request, start it in the engine and answer (a body, or an SSE
        stream). Errors found here raise (the route answers them with vLLM's error JSON)."""
        self.check_model(request.model)
        check_unsupported(request)
        if not request.messages:
            raise VLLMValidationError("messages must contain at least one message", parameter="messages")
        if request.tool_choice not in (None, "none"):
            raise VLLMValidationError(f"{request.tool_choice!r} tool choice requires --enable-auto-tool-choice and "
                                      "--tool-call-parser to be set (perfxlm has no tool-call parser yet)",
                                      parameter="tool_choice")
        prompt_text = self.render(request.messages, request.add_generation_prompt, request.continue_final_message,
                                  request.chat_template, request.chat_template_kwargs, request.tools,
                                  request.documents)
        prompt_ids = self.tokenize(prompt_text, request.add_special_tokens, request.truncate_prompt_tokens)
        if request.max_completion_tokens is not None:
            max_tokens = self.max_tokens(request.max_completion_tokens, len(prompt_ids), "max_completion_tokens")
        else:
            max_tokens = self.max_tokens(request.max_tokens, len(prompt_ids), "max_tokens")
        params = self.sampling_params(request, max_tokens, request.top_logprobs if request.logprobs else None)
        response_id = f"chatcmpl-{raw_request.headers.get('X-Request-Id') or request.request_id}"
        self.log_request(response_id, prompt_text, params)
        generator = self.engine.generate({"prompt_token_ids": prompt_ids, "prompt": prompt_text}, params,
                                         response_id, priority=request.priority)
        role = self.options.response_role if request.add_generation_prompt else request.messages[-1]["role"]
        created = int(time.time())
        if request.stream:
            return StreamingResponse(self._stream(request, response_id, created, role, generator),
                                     media_type="text/event-stream")
        final = None
        async for res in generator:
            final = res
        if final is None:
            raise EngineGenerateError(f"the engine gave no output for request {response_id}")
        return self._response(request, response_id, created, role, final)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final_message: bool,
               chat_template: str | None, chat_template_kwargs: dict[str, Any] | None,
               tools: list[dict[str, Any]] | None = None,
               documents: list[dict[str, str]] | None = None) -> str:
        """A conversation -> the prompt text the chat template renders (chat route and /tokenize)."""
        tok = self.require_tokenizer()
        if chat_template is not None and not self.options.trust_request_chat_template:
            raise VLLMValidationError("Chat template is passed with request, but --trust-request-chat-template is "
                                      "not set. Refused request with untrusted chat template.",
                                      parameter="chat_template")
        template = chat_template or self.options.chat_template or tok.chat_template
        if template is None:
            raise VLLMValidationError("As of transformers v4.44, default chat template is no longer allowed, so "
                                      "you must provide a chat template if the tokenizer does not define one.")
        kwargs = {**self.options.default_chat_template_kwargs, **(chat_template_kwargs or {})}
        for key in _RESERVED_TEMPLATE_KWARGS & kwargs.keys():
            del kwargs[key]
        kwargs.update(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
        if documents is not None:
            kwargs["documents"] = documents
        conversation = [_text_message(m, i) for i, m in enumerate(messages)]
        return tok.apply_chat_template(conversation, tokenize=False, chat_template=template, tools=tools, **kwargs)

    def _echo(self, request: ChatCompletionRequest, role: str) -> str:
        """With echo, the last message's content when it has the reply's role (vLLM's rule)."""
        last = request.messages[-1] if request.messages else {}
        if request.echo and last.get("role") == role:
            return _text_message(last, len(request.messages) - 1)["content"]
        return ""

    def _response(self, request: ChatCompletionRequest, response_id: str, created: int, role: str,
                  final: RequestOutput) -> ChatCompletionResponse:
        echo = self._echo(request, role)
        as_id = self.tokens_as_ids(request)
        choices = []
        for out in final.outputs:
            if out.finish_reason == "error":
                raise EngineGenerateError("Internal server error")
            logprobs = None
            if request.logprobs and request.top_logprobs is not None:
                logprobs = self.chat_logprobs(list(out.token_ids), out.logprobs, request.top_logprobs, as_id)
            choices.append(ChatCompletionResponseChoice(
                index=out.index, message=ChatMessage(role=role, content=echo + out.text), logprobs=logprobs,
                finish_reason=out.finish_reason or "stop", stop_reason=out.stop_reason,
                token_ids=list(out.token_ids) if request.return_token_ids else None))
        prompt_tokens = len(final.prompt_token_ids)
        completion_tokens = sum(len(out.token_ids) for out in final.outputs)
        usage = self.usage(prompt_tokens, completion_tokens, final.num_cached_tokens)
        return ChatCompletionResponse(
            id=response_id, created=created, model=self.model_name, choices=choices,
            system_fingerprint=self.system_fingerprint, usage=usage,
            prompt_logprobs=clamp_prompt_logprobs(final.prompt_logprobs),
            prompt_token_ids=list(final.prompt_token_ids) if request.return_token_ids else None)

    def _chunk(self, response_id: str, created: int, choice: ChatCompletionResponseStreamChoice,
               **fields: Any) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(id=response_id, object="chat.completion.chunk", created=created,
                                            model=self.model_name, choices=[choice], **fields)

    async def _stream(self, request: ChatCompletionRequest, response_id: str, created: int, role: str,
                      generator: AsyncGenerator[RequestOutput, None]) -> AsyncIterator[str]:
        """SSE events: a role chunk per choice when the first token exists, content chunks, one
        finishing chunk per choice, a usage chunk if asked, then [DONE]."""
        n = request.n or 1
        num_tokens = [0] * n
        finished = [False] * n
        prompt_tokens = 0
        num_cached = None
        include_usage, continuous = usage_flags(request.stream_options, self.options.enable_force_include_usage)
        as_id = self.tokens_as_ids(request)

        def usage(i: int) -> UsageInfo:
            return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=num_tokens[i],
                             total_tokens=prompt_tokens + num_tokens[i])

        try:
            first = True
            async for res in generator:
                if res.prompt_token_ids is not None:
                    prompt_tokens = len(res.prompt_token_ids)
                if first:
                    num_cached = res.num_cached_tokens
                    prompt_ids = list(res.prompt_token_ids) if request.return_token_ids else None
                    for i in range(n):
                        chunk = self._chunk(response_id, created, ChatCompletionResponseStreamChoice(
                            index=i, delta=DeltaMessage(role=role, content=""), logprobs=None, finish_reason=None),
                            prompt_token_ids=prompt_ids, prompt_text=None)
                        if continuous:
                            chunk.usage = usage(i)
                        yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
                    if echo := self._echo(request, role):
                        for i in range(n):
                            chunk = self._chunk(response_id, created, ChatCompletionResponseStreamChoice(
                                index=i, delta=DeltaMessage(content=echo), logprobs=None, finish_reason=None))
                            if continuous:
                                chunk.usage = usage(i)
                            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
                    first = False
                for out in res.outputs:
                    i = out.index
                    if out.finish_reason == "error":
                        raise EngineGenerateError("Internal server error")
                    if finished[i] or (not out.text and not out.token_ids and not num_tokens[i]):
                        continue
                    logprobs = None
                    if request.logprobs and request.top_logprobs is not None:
                        logprobs = self.chat_logprobs(list(out.token_ids), out.logprobs, request.top_logprobs, as_id)
                    num_tokens[i] += len(out.token_ids)
                    token_ids = list(out.token_ids) if request.return_token_ids else None
                    extra: dict[str, Any] = {}
                    if out.finish_reason is None:
                        choice = ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(content=out.text),
                                                                    logprobs=logprobs, finish_reason=None,
                                                                    token_ids=token_ids)
                    else:
                        choice = ChatCompletionResponseStreamChoice(index=i, delta=DeltaMessage(content=out.text),
                                                                    logprobs=logprobs, finish_reason=out.finish_reason,
                                                                    stop_reason=out.stop_reason, token_ids=token_ids)
                        finished[i] = True
                        if not include_usage:
                            extra["system_fingerprint"] = self.system_fingerprint
                    chunk = self._chunk(response_id, created, choice, **extra)
                    if continuous:
                        chunk.usage = usage(i)
                    yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
            if include_usage:
                final_usage = self.usage(prompt_tokens, sum(num_tokens), num_cached)
                final = ChatCompletionStreamResponse(id=response_id, object="chat.completion.chunk", created=created,
                                                     model=self.model_name, choices=[], usage=final_usage,
                                                     system_fingerprint=self.system_fingerprint)
                yield f"data: {final.model_dump_json(exclude_unset=True, exclude_none=True)}\n\n"
        except Exception as e:  # noqa: BLE001 - the 200 is sent: the error goes in the stream
            yield stream_error_event(e)
        yield "data: [DONE]\n\n"


def _text_message(message: Any, index: int) -> dict[str, Any]:
    """A message as the template takes it: content parts joined into one string (vLLM's
    'string' content format), no content as "". This server runs text-only models."""
    if not isinstance(message, dict) or "role" not in message:
        raise VLLMValidationError(f"Invalid chat message {index}: expected an object with 'role' and 'content', "
                                  f"got {message!r}"[:500], parameter="messages")
    content = message.get("content")
    if content is None:
        return {**message, "content": ""}
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                texts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise VLLMValidationError(f"Invalid chat message {index}: content part type {kind!r} is not "
                                          "supported; this model takes text only", parameter="messages")
        return {**message, "content": "\n".join(texts)}
    if not isinstance(content, str):
        raise VLLMValidationError(f"Invalid chat message {index}: content must be a string or a list of parts, "
                                  f"got {type(content).__name__}", parameter="messages")
    return message
