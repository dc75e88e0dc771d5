"""`AsyncLLM` (alias `AsyncLLMEngine`): vLLM's asyncio engine, for servers and apps.

The LLMEngine runs on one background thread, the engine loop, so the event loop stays free
while a step computes (the native kernels release the GIL). Callers never touch the engine's
scheduler: `generate` validates and tokenizes on the caller's thread (so a bad request fails
at once, before any output), then hands the built request to the loop through a queue; aborts
go the same way. Between two steps the loop takes everything queued, so requests join and
leave the running batch at the next step. Each step's outputs go back to the event loop, one
collector per request.
"""

import asyncio
import logging
import queue
import secrets
import threading
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterable
from dataclasses import replace
from typing import Any

from perfxlm.config import ModelConfig
from perfxlm.engine.arg_utils import AsyncEngineArgs, UsageContext
from perfxlm.engine.llm_engine import LLMEngine
from perfxlm.engine.output_processor import RequestState
from perfxlm.exceptions import EngineDeadError
from perfxlm.inputs import PromptType
from perfxlm.outputs import PoolingRequestOutput, RequestOutput
from perfxlm.pooling_params import PoolingParams
from perfxlm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class RequestOutputCollector:
    """One request's outputs waiting for its consumer (vLLM's): a consumer that falls behind
    gets DELTA outputs merged into one and CUMULATIVE ones replaced by the newest."""

    def __init__(self, output_kind: RequestOutputKind) -> None:
        self.aggregate = output_kind == RequestOutputKind.DELTA
        self.output: RequestOutput | BaseException | None = None
        self.steps = 0  # engine steps merged into `output`
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | BaseException) -> None:
        if isinstance(self.output, RequestOutput) and isinstance(output, RequestOutput):
            self.output.add(output, aggregate=self.aggregate)
        elif not isinstance(self.output, BaseException):
            self.output = output
        self.steps += 1
        self.ready.set()

    async def get(self) -> tuple[RequestOutput, int]:
        """The output waiting (merged) and how many engine steps it holds."""
        while self.output is None:
            await self.ready.wait()
        output, steps, self.output, self.steps = self.output, self.steps, None, 0
        self.ready.clear()
        if isinstance(output, BaseException):
            raise output
        return output, steps


class AsyncLLM:
    """An engine for asyncio apps, with vLLM's AsyncLLM methods. Build it with
    `AsyncLLM.from_engine_args(AsyncEngineArgs(model=...))`; `generate` is an async generator."""

    def __init__(self, engine: LLMEngine, served_model_name: str, log_requests: bool = False,
                 stream_interval: int = 1) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.log_requests = log_requests
        self.stream_interval = stream_interval  # default tokens per output (SamplingParams.stream_interval wins)
        self._model_config = replace(engine.model_config, served_model_name=served_model_name)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._collectors: dict[str, tuple[RequestOutputCollector, asyncio.AbstractEventLoop]] = {}
        self._internal_ids: dict[str, set[str]] = defaultdict(set)  # the caller's id -> engine ids
        self.dead_error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._engine_loop, name="perfxlm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True,
                         usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
                         stat_loggers: list[Any] | None = None) -> "AsyncLLM":
        """Load the model (seconds) and start the engine loop. Unless `disable_log_stats`, the
        engine logs vLLM's periodic stats line (see `do_log_stats`) and records Prometheus metrics
        in prometheus_client's default registry. The loop always starts (`start_engine_loop` is
        accepted for vLLM's signature)."""
        served = engine_args.served_model_names[0]
        config, source = engine_args.create_engine_config(usage_context)
        # vLLM passes logger factories, called with (config, engine index); instances work too
        loggers = [f if hasattr(f, "record") and not isinstance(f, type) else f(config, 0)
                   for f in stat_loggers or ()]
        engine = LLMEngine(config, source, loggers)
        if not engine_args.disable_log_stats:  # built once the KV cache is sized
            from perfxlm.metrics.loggers import LoggingStatLogger, PrometheusStatLogger
            bm = engine.block_manager
            cache_config = {"block_size": str(config.block_size), "num_gpu_blocks": str(bm.num_blocks),
                            "enable_prefix_caching": str(config.enable_prefix_caching),
                            "kv_cache_size_tokens": str(bm.num_blocks * config.block_size)}
            added = [LoggingStatLogger(kv_cache_device="CPU", num_kv_blocks=bm.num_blocks),
                     PrometheusStatLogger(served, config.max_model_len, cache_config)]
            for stat_logger in added:
                stat_logger.log_engine_initialized()
            engine.stat_loggers += added
        return cls(engine, served, getattr(engine_args, "enable_log_requests", False),
                   getattr(engine_args, "stream_interval", 1))

    # ---- what apps read -------------------------------------------------------------

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.engine.config.chat_template or getattr(self.engine.tokenizer, "chat_template", None)

    @property
    def eos_token_id(self) -> int | None:
        return self.engine.eos_token_id

    @property
    def is_running(self) -> bool:
        return self.dead_error is None and not self._stopped and self._thread.is_alive()

    @property
    def is_stopped(self) -> bool:
        return self._stopped

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self._collectors)

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return self.engine.get_supported_tasks()

    # ---- requests -------------------------------------------------------------------

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, *,
                       prompt_text: str | None = None, lora_request: Any = None,
                       tokenization_kwargs: dict[str, Any] | None = None, trace_headers: Any = None,
                       priority: int = 0, data_parallel_rank: int | None = None,
                       **kwargs: Any) -> AsyncGenerator[RequestOutput, None]:
        """Generate for one prompt, yielding RequestOutputs as `sampling_params.output_kind`
        says (the last has `finished=True`). A request vLLM rejects raises VLLMValidationError
        before anything is yielded. Closing the generator, or cancelling the task iterating it,
        aborts the request and frees its KV blocks."""
        self._check_alive()
        self.engine.check_options(lora_request, priority)
        # duplicate ids are the caller's business; inside the engine each request is unique
        internal_id = f"{request_id}-{secrets.token_hex(4)}"
        state = self.engine.input_processor.process(internal_id, prompt, sampling_params, prompt_text=prompt_text,
                                                    tokenization_kwargs=tokenization_kwargs)
        state.set_lora(lora_request)
        if self.log_requests:
            logger.info("Added request %s, params: %s", request_id, sampling_params)
            logger.debug("Request %s prompt: %r", request_id, state.prompt or state.prompt_token_ids)
        collector = RequestOutputCollector(state.output_kind)
        self._collectors[internal_id] = (collector, asyncio.get_running_loop())
        self._internal_ids[request_id].add(internal_id)
        try:  # a loop that died since the first check has swept the collectors already
            self._check_alive()
        except EngineDeadError:
            self._forget(request_id, internal_id)
            raise
        self._commands.put(("add", state))
        # stream_interval k: one output per k engine steps (k tokens a sequence); the first and
        # the last are sent at once, as in vLLM
        interval = sampling_params.stream_interval or self.stream_interval
        finished, first = False, True
        try:
            while not finished:
                output, steps = await collector.get()
                while not first and not output.finished and steps < interval:
                    more, n = await collector.get()
                    output.add(more, aggregate=collector.aggregate)
                    steps += n
                first = False
                output.request_id = request_id
                finished = output.finished
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                self._commands.put(("abort", [internal_id]))
                if self.log_requests:
                    logger.info("Aborted request %s.", request_id)
            raise
        finally:
            self._forget(request_id, internal_id)

    async def encode(self, prompt: PromptType, pooling_params: PoolingParams, request_id: str, *,
                     lora_request: Any = None, tokenization_kwargs: dict[str, Any] | None = None,
                     trace_headers: Any = None, priority: int = 0,
                     **kwargs: Any) -> AsyncGenerator[PoolingRequestOutput, None]:
        """Pool one prompt (a pooling model): yields its one PoolingRequestOutput. A request vLLM
        rejects raises VLLMValidationError first; closing the generator aborts the request."""
        self._check_alive()
        self.engine.check_options(lora_request, priority)
        internal_id = f"{request_id}-{secrets.token_hex(4)}"
        engine = self.engine
        tasks = engine.pooler.supported_tasks if engine.pooler is not None else ()
        state = engine.input_processor.process_pooling(internal_id, prompt, pooling_params, self._model_config, tasks,
                                                       tokenization_kwargs=tokenization_kwargs)
        collector = RequestOutputCollector(RequestOutputKind.FINAL_ONLY)
        self._collectors[internal_id] = (collector, asyncio.get_running_loop())
        self._internal_ids[request_id].add(internal_id)
        finished = False
        try:
            self._check_alive()
            self._commands.put(("add", state))
            output, _ = await collector.get()
            output.request_id = request_id
            finished = True
            yield output
        except (asyncio.CancelledError, GeneratorExit):
            if not finished:
                self._commands.put(("abort", [internal_id]))
            raise
        finally:
            self._forget(request_id, internal_id)

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        """Abort requests by the caller's id (every request sent with that id). A consumer still
        iterating gets a last output with finish_reason "abort"."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        internal_ids = [i for rid in ids for i in self._internal_ids.get(rid, ())]
        if internal_ids:
            self._commands.put(("abort", internal_ids))
        if self.log_requests:
            logger.info("Aborted request(s) %s.", ",".join(ids))

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine loop has stopped."""
        self._check_alive()

    async def do_log_stats(self) -> None:
        """Log vLLM's periodic line (throughput, running, waiting, KV cache usage)."""
        self._commands.put(("log", None))

    async def reset_prefix_cache(self) -> bool:
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._commands.put(("reset_prefix_cache", done))
        return await done

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the engine loop; requests still running get EngineDeadError."""
        if self._stopped:
            return
        self._stopped = True
        self._commands.put(("stop", None))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- the engine loop (its own thread) ---------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while True:
                # wait for work only when there is nothing to step
                if not self._drain(block=not self.engine.has_unfinished_requests()):
                    break
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - whatever killed the loop fails every request
            logger.exception("the engine loop died")
            self.dead_error = EngineDeadError(f"EngineCore encountered an issue: {e!r}. See the log above.")
            self.dead_error.__cause__ = e
        if self.dead_error is None:
            self.dead_error = EngineDeadError("the engine was shut down")
        for collector, loop in list(self._collectors.values()):
            self._deliver(loop, collector, self.dead_error)
        while True:  # commands nobody will run: fail the calls that wait on one
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                break
            if command == "reset_prefix_cache":
                error = self.dead_error
                arg.get_loop().call_soon_threadsafe(lambda f=arg: f.done() or f.set_exception(error))

    def _drain(self, block: bool) -> bool:
        """Run the queued commands; False when asked to stop."""
        try:
            command, arg = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command == "stop":
                return False
            if command == "add":
                self._add(arg)
            elif command == "abort":
                self._dispatch(self.engine.abort(arg))
            elif command == "log":
                self.engine.do_log_stats()
            elif command == "reset_prefix_cache":
                ok = self.engine.reset_prefix_cache()
                arg.get_loop().call_soon_threadsafe(lambda f=arg, r=ok: f.done() or f.set_result(r))
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, state: RequestState) -> None:
        if state.request_id not in self._collectors:  # its consumer went away before it was queued
            return
        try:
            self.engine.enqueue(state)
        except Exception as e:  # noqa: BLE001 - goes to the one request's consumer
            entry = self._collectors.get(state.request_id)
            if entry is not None:
                self._deliver(entry[1], entry[0], e)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            entry = self._collectors.get(output.request_id)
            if entry is not None:
                self._deliver(entry[1], entry[0], output)

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, collector: RequestOutputCollector,
                 item: RequestOutput | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(collector.put, item)
        except RuntimeError:  # the consumer's event loop is closed
            pass

    # ---- helpers ----------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if self._stopped:
            raise EngineDeadError("the engine was shut down")

    def _forget(self, request_id: str, internal_id: str) -> None:
        self._collectors.pop(internal_id, None)
        ids = self._internal_ids.get(request_id)
        if ids is not None:
            ids.discard(internal_id)
            if not ids:
                del self._internal_ids[request_id]


AsyncLLMEngine = AsyncLLM
