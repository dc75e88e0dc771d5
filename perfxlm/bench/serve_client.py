"""The HTTP side of `perfxlm bench serve`: one streamed request to an OpenAI-compatible
/v1/completions or /v1/chat/completions endpoint, timed as vLLM's endpoint_request_func does.

Each SSE event whose `choices` is non-empty is a token event: the first sets TTFT, each later
one appends its gap to ITL, and the last one ends the request (`latency`). A `choices: []`
event with `usage` gives the server's token counts.
"""

import codecs
import json
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=6 * 60 * 60)


class SSEParser:
    """Splits a byte stream of server-sent events into the payloads of their `data:` lines.

    Bytes may arrive cut anywhere, even inside a UTF-8 character; an event is complete at
    its blank line (`\\n\\n`). Comment lines (`: keep-alive`) carry no data and are dropped."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""

    def feed(self, chunk: bytes) -> list[str]:
        """The payloads of the events that `chunk` completes, in order."""
        self._buffer += self._decoder.decode(chunk).replace("\r\n", "\n")
        *events, self._buffer = self._buffer.split("\n\n")
        return [p for p in map(_event_data, events) if p is not None]

    def close(self) -> list[str]:
        """The payload of a last event the stream ended without a blank line after."""
        rest, self._buffer = self._buffer + self._decoder.decode(b"", final=True), ""
        data = _event_data(rest)
        return [] if data is None else [data]


class StreamError(Exception):
    """The server reported an error inside a 200 stream (`data: {"error": ...}`)."""


def _event_data(event: str) -> str | None:
    lines = [line.removeprefix("data:").removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None


@dataclass
class RequestFuncInput:
    """One benchmark request (vLLM's RequestFuncInput, text prompts only)."""
    prompt: str
    api_url: str
    prompt_len: int  # tokens, as the dataset measured them
    output_len: int  # max_tokens / max_completion_tokens
    model: str  # the model id (the server's `root`)
    model_name: str | None = None  # the served name sent as `model`, when it differs from `model`
    logprobs: int | None = None
    extra_headers: dict[str, str] | None = None
    extra_body: dict[str, Any] | None = None
    ignore_eos: bool = False
    request_id: str | None = None


@dataclass
class RequestFuncOutput:
    """What one request measured; times in seconds (vLLM's RequestFuncOutput)."""
    generated_text: str = ""
    success: bool = False
    latency: float = 0.0  # request start to the last token event
    output_tokens: int = 0  # usage.completion_tokens; 0 when the server sent no usage
    ttft: float = 0.0  # request start to the first token event
    itl: list[float] = field(default_factory=list)  # gaps between consecutive token events
    prompt_len: int = 0  # usage.prompt_tokens when sent, else the dataset's count
    error: str = ""
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    client_queue_time: float = 0.0  # time spent waiting for a --max-concurrency slot


RequestFunc = Callable[[RequestFuncInput, aiohttp.ClientSession, Any], Awaitable[RequestFuncOutput]]


def _headers(inp: RequestFuncInput) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    headers |= inp.extra_headers or {}
    if inp.request_id:
        headers["x-request-id"] = inp.request_id
    return headers


def _finish_payload(payload: dict[str, Any], inp: RequestFuncInput) -> dict[str, Any]:
    if inp.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(inp.extra_body or {})
    return payload


def completions_payload(inp: RequestFuncInput) -> dict[str, Any]:
    """The /v1/completions body vLLM's bench sends."""
    return _finish_payload({"model": inp.model_name or inp.model, "prompt": inp.prompt, "repetition_penalty": 1.0,
                            "max_tokens": inp.output_len, "logprobs": inp.logprobs, "stream": True,
                            "stream_options": {"include_usage": True}}, inp)


def chat_payload(inp: RequestFuncInput) -> dict[str, Any]:
    """The /v1/chat/completions body vLLM's bench sends: one user message of one text part."""
    return _finish_payload({"model": inp.model_name or inp.model,
                            "messages": [{"role": "user", "content": [{"type": "text", "text": inp.prompt}]}],
                            "max_completion_tokens": inp.output_len, "stream": True,
                            "stream_options": {"include_usage": True}}, inp)


def _completion_text(choice: dict[str, Any]) -> str:
    return choice.get("text") or ""


def _chat_text(choice: dict[str, Any]) -> str:
    return (choice.get("delta") or {}).get("content") or ""


async def _stream_request(inp: RequestFuncInput, session: aiohttp.ClientSession, pbar: Any,
                          payload: dict[str, Any], text_of: Callable[[dict[str, Any]], str]) -> RequestFuncOutput:
    out = RequestFuncOutput(prompt_len=inp.prompt_len)
    start = last = time.perf_counter()
    out.start_time = start
    text: list[str] = []
    try:
        async with session.post(url=inp.api_url, json=payload, headers=_headers(inp)) as response:
            if response.status != 200:
                body = (await response.text())[:500]
                out.error = f"{response.status} {response.reason or ''}: {body}".strip()
            else:
                parser = SSEParser()
                async for chunk in response.content.iter_any():
                    for data in parser.feed(chunk):
                        last = _on_event(data, out, text, start, last, text_of)
                for data in parser.close():
                    last = _on_event(data, out, text, start, last, text_of)
                out.generated_text = "".join(text)
                out.latency = last - start
                out.success = bool(text)
                if not out.success:
                    out.error = ("Never received a valid chunk to calculate TTFT. "
                                 "This response will be marked as failed!")
    except StreamError as e:
        out.error = str(e)
    except Exception:
        out.error = "".join(traceback.format_exception(*sys.exc_info()))
    if pbar is not None:
        pbar.update(1)
    return out


def _on_event(data: str, out: RequestFuncOutput, text: list[str], start: float, last: float,
              text_of: Callable[[dict[str, Any]], str]) -> float:
    """Record one SSE payload; returns the time of the latest token event."""
    if data == "[DONE]":
        return last
    now = time.perf_counter()
    chunk = json.loads(data)
    if "error" in chunk and not chunk.get("choices"):
        raise StreamError(f"error event in the stream after {len(text)} token events: {chunk['error']}")
    if choices := chunk.get("choices"):
        if text:
            out.itl.append(now - last)
        else:
            out.ttft = now - start
        text.append(text_of(choices[0]))
        return now
    if usage := chunk.get("usage"):
        out.output_tokens = usage.get("completion_tokens") or 0
        if usage.get("prompt_tokens") is not None:
            out.prompt_len = usage["prompt_tokens"]
    return last


async def request_openai_completions(inp: RequestFuncInput, session: aiohttp.ClientSession,
                                     pbar: Any = None) -> RequestFuncOutput:
    """One streamed /v1/completions request."""
    return await _stream_request(inp, session, pbar, completions_payload(inp), _completion_text)


async def request_openai_chat_completions(inp: RequestFuncInput, session: aiohttp.ClientSession,
                                          pbar: Any = None) -> RequestFuncOutput:
    """One streamed /v1/chat/completions request; the role chunk counts as the first token event."""
    return await _stream_request(inp, session, pbar, chat_payload(inp), _chat_text)


# backend name -> (request function, the suffix its URL must end with)
REQUEST_FUNCS: dict[str, tuple[RequestFunc, str]] = {
    "openai": (request_openai_completions, "completions"),
    "vllm": (request_openai_completions, "completions"),
    "openai-chat": (request_openai_chat_completions, "chat/completions"),
}


async def first_model(base_url: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """GET /v1/models: the first card's (id, root), i.e. the served name and the model id."""
    url = f"{base_url}/v1/models"
    headers = dict(headers or {})
    if api_key := os.environ.get("OPENAI_API_KEY"):
        headers.setdefault("Authorization", f"Bearer {api_key}")
    try:
        async with aiohttp.ClientSession(trust_env=True) as session, session.get(url, headers=headers) as response:
            response.raise_for_status()
            data = (await response.json()).get("data") or []
    except (aiohttp.ClientError, json.JSONDecodeError) as e:
        raise RuntimeError(f"Failed to fetch models from server at {url}. Check that:\n1. The server is running\n"
                           f"2. The server URL is correct\nError: {e}") from e
    if not data:
        raise ValueError(f"No models found on the server at {base_url}. "
                         "Make sure the server is running and has models loaded.")
    return data[0]["id"], data[0].get("root") or data[0]["id"]
