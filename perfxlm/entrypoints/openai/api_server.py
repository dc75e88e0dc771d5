"""`perfxlm serve`: vLLM's OpenAI-compatible server on FastAPI + uvicorn.

`python -m perfxlm.entrypoints.openai.api_server MODEL [flags]` runs it too. The engine (an
AsyncLLM, its loop on its own thread) is built before uvicorn starts, so /health answers 200
only once the model is loaded."""

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from perfxlm.entrypoints.openai.cli_args import FlexibleArgumentParser, make_arg_parser, validate_parsed_serve_args
from perfxlm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                 DetokenizeResponse, ErrorInfo, ErrorResponse, ModelCard, ModelList,
                                                 ModelPermission, TokenizeChatRequest, TokenizeRequest,
                                                 TokenizeResponse)
from perfxlm.entrypoints.openai.serving_chat import OpenAIServingChat
from perfxlm.entrypoints.openai.serving_common import ServerOptions, error_json, run_until_disconnect
from perfxlm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from perfxlm.entrypoints.openai.serving_pooling import OpenAIServingPooling, add_pooling_routes
from perfxlm.exceptions import EngineDeadError, VLLMError, VLLMValidationError
from perfxlm.version import __version__

logger = logging.getLogger(__name__)

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
_GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")  # vLLM 0.32's API-key rule
_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_INPUT_CHARS = 200


async def validate_json_request(raw_request: Request) -> None:
    """vLLM's rule for every POST route: the body must be declared application/json."""
    media_type = raw_request.headers.get("content-type", "").lower().split(";", 1)[0].strip()
    if media_type != "application/json":
        raise RequestValidationError(errors=["Unsupported Media Type: Only 'application/json' is allowed"])


def build_app(args: argparse.Namespace, engine: Any) -> FastAPI:
    """The FastAPI app serving `engine`: routes, API-key and CORS middleware, error handlers."""
    names = args.served_model_name or [args.model]
    names = [names] if isinstance(names, str) else list(names)
    options = ServerOptions(
        served_model_names=names, response_role=args.response_role, chat_template=args.chat_template,
        trust_request_chat_template=args.trust_request_chat_template,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
        enable_force_include_usage=args.enable_force_include_usage,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_log_requests=args.enable_log_requests, max_log_len=args.max_log_len)
    completion = OpenAIServingCompletion(engine, options)
    chat = OpenAIServingChat(engine, options)
    docs = {} if not args.disable_fastapi_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="perfxlm", version=__version__, root_path=args.root_path or "",
                  lifespan=_lifespan(engine, args), **docs)
    app.state.engine, app.state.args = engine, args
    router = APIRouter()
    json_body = [Depends(validate_json_request)]

    @router.get("/health")
    async def health() -> Response:
        try:
            await engine.check_health()
        except EngineDeadError:
            return Response(status_code=HTTPStatus.SERVICE_UNAVAILABLE)
        return Response(status_code=HTTPStatus.OK)

    router.add_api_route("/ping", health, methods=["GET", "POST"])

    @router.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @router.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def show_models() -> JSONResponse:
        cards = [ModelCard(id=name, root=engine.model_config.model, max_model_len=completion.max_model_len,
                           permission=[ModelPermission()]) for name in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response | None:
        return await run_until_disconnect(raw_request, _answer(completion.create_completion(request, raw_request)))

    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Response | None:
        return await run_until_disconnect(raw_request,
                                          _answer(chat.create_chat_completion(request, raw_request)))

    # vLLM serves each kind of route only to a model with its task: the others answer 404
    if "generate" in engine.engine.get_supported_tasks():
        router.add_api_route("/v1/completions", create_completion, methods=["POST"], dependencies=json_body,
                             response_model=None)
        router.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                             dependencies=json_body, response_model=None)
    else:
        add_pooling_routes(router, OpenAIServingPooling(engine, options), json_body, _answer)

    @router.post("/tokenize", dependencies=json_body)
    async def tokenize(request: TokenizeRequest) -> Response:
        async def run() -> TokenizeResponse:
            completion.check_model(request.model)
            tok = completion.require_tokenizer()
            if isinstance(request, TokenizeChatRequest):
                text = chat.render(request.messages, request.add_generation_prompt, request.continue_final_message,
                                   request.chat_template, request.chat_template_kwargs, request.tools)
            else:
                text = request.prompt
            ids = tok.encode(text, add_special_tokens=request.add_special_tokens)
            strs = tok.convert_ids_to_tokens(ids) if request.return_token_strs else None
            return TokenizeResponse(count=len(ids), max_model_len=completion.max_model_len, tokens=ids,
                                    token_strs=strs)
        return await _answer(run())

    @router.post("/detokenize", dependencies=json_body)
    async def detokenize(request: DetokenizeRequest) -> Response:
        async def run() -> DetokenizeResponse:
            completion.check_model(request.model)
            vocab = engine.model_config.vocab_size
            bad = next((t for t in request.tokens if t >= vocab), None)
            if bad is not None:
                raise VLLMValidationError(f"Token id {bad} is out of vocabulary", parameter="tokens", value=bad)
            return DetokenizeResponse(prompt=completion.require_tokenizer().decode(request.tokens))
        return await _answer(run())

    @router.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        if not CHAT_PAGE.is_file():
            return JSONResponse({"detail": "Not Found"}, status_code=HTTPStatus.NOT_FOUND)
        return FileResponse(CHAT_PAGE, media_type="text/html")

    app.include_router(router)
    _add_middleware(app, args)
    _add_exception_handlers(app)
    # vLLM's HTTP metrics (http_requests_total{handler,method,status}, sizes, durations) beside the
    # engine's, from the same library and with the same excluded routes
    from prometheus_client import REGISTRY
    try:
        from prometheus_fastapi_instrumentator import Instrumentator
    except ImportError as e:  # not packaged for every board (Debian has none): the engine's metrics remain
        logger.warning("HTTP request metrics (http_requests_total, ...) on /metrics need the "
                       "prometheus-fastapi-instrumentator package, which cannot be imported here (%s); "
                       "serving without them", e)
        return app
    Instrumentator(excluded_handlers=["/metrics", "/health", "/load", "/ping", "/version", "/server_info"],
                   registry=REGISTRY).add().instrument(app)
    return app


async def _answer(handler: Any) -> Response:
    """Await a handler: a pydantic body becomes JSON (every null field kept, as vLLM), an
    exception becomes vLLM's error JSON with its status."""
    try:
        result = await handler
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - every failure gets vLLM's error JSON and status
        return error_json(e)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return result


# ---- middleware and error handlers ---------------------------------------------------------------

class AuthenticationMiddleware:
    """`Authorization: Bearer KEY` on /v1 (and vLLM's other API prefixes); 401 otherwise.
    Plain ASGI, so that streaming and disconnects pass through untouched."""

    def __init__(self, app: ASGIApp, tokens: list[str]) -> None:
        self.app = app
        self.digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    def _allowed(self, scope: Scope) -> bool:
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope.get("method") == "OPTIONS" or not path.startswith(_GUARDED_PREFIXES):
            return True
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()
        return scheme.lower() == "bearer" and any(hmac.compare_digest(digest, d) for d in self.digests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self._allowed(scope):
            await JSONResponse({"error": "Unauthorized"}, status_code=HTTPStatus.UNAUTHORIZED)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class XRequestIdMiddleware:
    """--enable-request-id-headers: one X-Request-Id on every response, the caller's or a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _add_middleware(app: FastAPI, args: argparse.Namespace) -> None:
    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_credentials=args.allow_credentials,
                       allow_methods=args.allowed_methods, allow_headers=args.allowed_headers)
    if args.api_key:
        app.add_middleware(AuthenticationMiddleware, tokens=list(args.api_key))
    if args.enable_request_id_headers:
        app.add_middleware(XRequestIdMiddleware)


def _validation_error_json(exc: RequestValidationError) -> JSONResponse:
    """A body that fails the schema: 400 (never FastAPI's 422). A vLLM validation rule broken
    inside a request model's validator is reported as that rule; anything else as vLLM lists
    pydantic's errors."""
    errors = exc.errors()
    for err in errors:
        cause = err.get("ctx", {}).get("error") if isinstance(err, dict) else None
        if isinstance(cause, VLLMValidationError):
            return error_json(cause)
    param = None
    if errors and isinstance(errors[0], dict) and errors[0].get("loc"):
        param = ".".join(str(p) for p in errors[0]["loc"] if not _is_internal_loc(str(p)))
    lines = []
    for err in errors[:_MAX_REPORTED_ERRORS]:
        if isinstance(err, dict):
            err = {k: v for k, v in err.items() if k not in ("ctx", "url")}
            text = repr(err.get("input"))
            if len(text) > _MAX_ERROR_INPUT_CHARS:
                err["input"] = text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
        lines.append(f"  {err}\n")
    if len(errors) > _MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {len(errors) - _MAX_REPORTED_ERRORS} more errors\n")
    label = "error" if len(errors) == 1 else "errors"
    message = (f"{len(errors)} validation {label}:\n" + "".join(lines)).rstrip() if errors else "Validation error"
    body = ErrorResponse(error=ErrorInfo(message=message, type=HTTPStatus.BAD_REQUEST.phrase, param=param,
                                         code=HTTPStatus.BAD_REQUEST))
    return JSONResponse(body.model_dump(), status_code=HTTPStatus.BAD_REQUEST)


def _is_internal_loc(segment: str) -> bool:
    """pydantic's union-branch and wrapper markers in an error's `loc` (not field names)."""
    return any(c in segment for c in "[](){}") or segment in {"str", "int", "float", "bool", "list", "dict",
                                                                "function-wrap", "function-after",
                                                                "function-before", "json-or-python"}


def _add_exception_handlers(app: FastAPI) -> None:
    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        return _validation_error_json(exc)

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        body = ErrorResponse(error=ErrorInfo(message=str(exc.detail), type=status.phrase, code=status.value))
        return JSONResponse(body.model_dump(), status_code=status.value)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        return error_json(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    for cls in (VLLMError, ValueError, TypeError, OverflowError, NotImplementedError, Exception):
        app.add_exception_handler(cls, on_error)


# ---- lifecycle ---------------------------------------------------------------------------------

def _lifespan(engine: Any, args: argparse.Namespace) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_watch_engine(engine))]
        if not args.disable_log_stats:
            tasks.append(asyncio.create_task(_log_stats(engine)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
    return lifespan


async def _log_stats(engine: Any) -> None:
    """vLLM's periodic line (throughput, running, waiting, KV cache usage)."""
    interval = float(os.environ.get("VLLM_LOG_STATS_INTERVAL", "10"))
    while True:
        await asyncio.sleep(interval)
        await engine.do_log_stats()


async def _watch_engine(engine: Any) -> None:
    """vLLM's watchdog: a dead engine stops the server (unless VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1)."""
    while True:
        await asyncio.sleep(5)
        if engine.errored and os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0") != "1":
            logger.error("The engine died; shutting down the server.")
            os.kill(os.getpid(), signal.SIGTERM)
            return


def run_server(args: argparse.Namespace) -> None:
    """Check the flags, load the model into an AsyncLLM, then serve until SIGINT / SIGTERM."""
    import uvicorn

    from perfxlm.engine.arg_utils import AsyncEngineArgs, UsageContext
    from perfxlm.engine.async_llm import AsyncLLM

    validate_parsed_serve_args(args)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args),
                                       usage_context=UsageContext.OPENAI_API_SERVER)
    try:
        app = build_app(args, engine)
        host = args.host or "0.0.0.0"
        logger.info("Starting perfxlm API server on %s", args.uds or f"http://{host}:{args.port}")
        uvicorn.run(app, host=host, port=args.port, uds=args.uds, log_level=args.uvicorn_log_level,
                    access_log=not args.disable_uvicorn_access_log, ssl_keyfile=args.ssl_keyfile,
                    ssl_certfile=args.ssl_certfile,
                    timeout_keep_alive=int(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5")),
                    timeout_graceful_shutdown=5)  # streams still open at shutdown do not hold it up
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    """`python -m perfxlm.entrypoints.openai.api_server MODEL [flags]`."""
    import perfxlm  # noqa: F401 - configures logging as vLLM does

    parser = make_arg_parser(FlexibleArgumentParser(prog="perfxlm serve",
                                                    description="perfxlm's OpenAI-compatible server"))
    run_server(parser.parse_args(argv))


if __name__ == "__main__":
    main()
