"""The engine: owns tokenizer, model runner, scheduler and sampler; runs steps."""

import logging
import time
from typing import Any

import numpy as np

from perfxlm.config import EngineConfig, ModelConfig
from perfxlm.engine.arg_utils import EngineArgs, UsageContext
from perfxlm.engine.block_manager import BlockManager
from perfxlm.engine.executor_setup import build_executor, graph_spec, kv_cache_blocks
from perfxlm.engine.gc_heap import collector_paused, freeze_gc_heap
from perfxlm.engine.input_processor import InputProcessor
from perfxlm.engine.lora_manager import LoRAManager
from perfxlm.engine.model_runner import ModelRunner
from perfxlm.engine.output_processor import OutputProcessor, RequestState
from perfxlm.engine.pooler import Pooler
from perfxlm.engine.request import Request, RequestStatus
from perfxlm.engine.sampler import Sampler, log_softmax
from perfxlm.engine.scheduler import Scheduler, SchedulerOutput
from perfxlm.engine.sleep_mode import SleepMode, discard_kv_cache, recommit_kv_cache
from perfxlm.exceptions import VLLMValidationError
from perfxlm.inputs import PromptType
from perfxlm.metrics.stats import IterationStats, SchedulerStats, finished_stats
from perfxlm.models.deployable import DeployableSource
from perfxlm.models.loader import ModelSource, load_tokenizer
from perfxlm.outputs import PoolingRequestOutput, RequestOutput
from perfxlm.pooling_params import PoolingParams
from perfxlm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """vLLM's LLMEngine, in process: `add_request`, then `step()` until no request is unfinished.

    `stat_loggers` (perfxlm.metrics.loggers) get each step's statistics; without them the
    engine builds none."""

    def __init__(self, config: EngineConfig, source: ModelSource | DeployableSource,
                 stat_loggers: list[Any] | None = None) -> None:
        self.config = config
        self.source = source
        self.stat_loggers = list(stat_loggers or [])
        start = time.perf_counter()
        with collector_paused():  # (freeze_gc_heap collects once, after)
            self.tokenizer = None
            if not config.skip_tokenizer_init:
                self.tokenizer = load_tokenizer(source, config.tokenizer, trust_remote_code=config.trust_remote_code)
            # vLLM's rule: "vllm" drops the model's generation config, the override applies either way
            self.generation_config = {**(source.generation_config if config.generation_config != "vllm" else {}),
                                      **config.override_generation_config}
            self.eos_token_id = self._eos_token_id()

            # the model's shapes size the KV cache before any weight is read or graph exported
            spec = graph_spec(source, config.cache_dtype, lora=config.lora_config is not None)
            self.pooler = None  # a pooling model's: its graph's rows are hidden states or classes, not logits
            if config.runner_type == "pooling":
                self.pooler = Pooler(source.pooling_task, config.pooler_config, source.hf_config)
            # the token vocabulary (a pooling model's output is not one)
            self.vocab_size = spec.vocab_size if self.pooler is None else source.hf_config["vocab_size"]
            num_blocks = kv_cache_blocks(config, spec)
            executor = build_executor(config, source, spec, num_blocks)
            self.lora = None  # the LoRA slots' owner, with enable_lora
            if config.lora_config is not None:
                self.lora = LoRAManager.for_model(config.lora_config, source.meta_model(), executor.write_weights)
            self.runner = ModelRunner(executor, config.block_size, self.pooler, self.lora)
            self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
            self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                       config.max_model_len, config.enable_chunked_prefill,
                                       config.lora_config.max_loras if config.lora_config else 0)
            self.sampler = Sampler(config.seed, executor.native_sampler)
            self.outputs = OutputProcessor(self.tokenizer)
            self.input_processor = InputProcessor(config, self.vocab_size, self.tokenizer, self.generation_config,
                                                  self.eos_token_id)
            self.requests: dict[str, RequestState] = {}
            self._prefix_seen = (0, 0, 0)  # the block manager's prefix-cache counters at the last stats
            self._new_request_ns: list[int] = []  # n of each request queued since the last stats
            self._spec = spec
            self.sleep_mode = SleepMode()
        freeze_gc_heap()
        logger.info("engine ready in %.1f s: %s, %s%s", time.perf_counter() - start, source.path,
                    str(config.dtype).removeprefix("torch."),
                    f" ({str(config.weight_dtype).removeprefix('torch.')} weights)" if config.weight_dtype else "")

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, usage_context: UsageContext = UsageContext.ENGINE_CONTEXT,
                         stat_loggers: list[Any] | None = None) -> "LLMEngine":
        config, source = engine_args.create_engine_config(usage_context)
        return cls(config, source, stat_loggers)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(model=self.config.model, max_model_len=self.config.max_model_len,
                           dtype=self.config.model_dtype, hf_config=self.source.hf_config, vocab_size=self.vocab_size,
                           max_logprobs=self.config.max_logprobs, generation_config=self.generation_config,
                           runner_type=self.config.runner_type, convert_type=self.config.convert_type,
                           pooler_config=self.config.pooler_config, embedding_size=self._spec.vocab_size)

    def _eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        eos = self.source.hf_config.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos

    # ---- requests -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams,
                    arrival_time: float | None = None, lora_request: Any = None,
                    tokenization_kwargs: dict[str, Any] | None = None, trace_headers: Any = None,
                    priority: int = 0, prompt_text: str | None = None) -> str:
        """Validate and queue a request (a str, TextPrompt, TokensPrompt or token ids): to generate
        (SamplingParams; n > 1 fans out into n sequences) or to pool (PoolingParams, whose task the
        model must support). Raises VLLMValidationError (nothing queued) for what vLLM rejects,
        and ValueError for a request id that is already running. Returns the request id."""
        self.check_options(lora_request, priority)
        if isinstance(params, PoolingParams):
            pooling_tasks = self.pooler.supported_tasks if self.pooler is not None else ()
            state = self.input_processor.process_pooling(request_id, prompt, params, self.model_config, pooling_tasks,
                                                         tokenization_kwargs=tokenization_kwargs,
                                                         arrival_time=arrival_time)
            self.enqueue(state)
            return request_id
        if self.pooler is not None:
            raise VLLMValidationError("This model does not support generation")
        state = self.input_processor.process(request_id, prompt, params, prompt_text=prompt_text,
                                             tokenization_kwargs=tokenization_kwargs, arrival_time=arrival_time)
        state.set_lora(lora_request)
        self.enqueue(state)
        return request_id

    def check_options(self, lora_request: Any, priority: int) -> None:
        """What vLLM refuses before reading the prompt: a LoRA request when LoRA is off (with it
        on, the adapter is read here, so a bad one fails before anything is queued), a priority."""
        if lora_request is not None:
            if self.lora is None:
                raise VLLMValidationError(f"Got lora_request {lora_request} but LoRA is not enabled!")
            self.lora.load(lora_request)
        if priority:
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise VLLMValidationError for what vLLM rejects when a request is added."""
        self.input_processor.validate_request(prompt_token_ids, params)

    def enqueue(self, state: RequestState) -> None:
        """Queue a request InputProcessor.process built."""
        self.sleep_mode.check_awake()
        if state.request_id in self.requests:
            raise ValueError(f"Request id {state.request_id!r} is already running")
        self.requests[state.request_id] = state
        for req in state.children:
            self.scheduler.add_request(req)
        if self.stat_loggers:
            self._new_request_ns.append(len(state.children))

    def abort_request(self, request_ids: list[str] | str) -> None:
        """End requests (all n sequences) and free their KV blocks; unknown ids are ignored."""
        self.abort(request_ids)

    def abort(self, request_ids: list[str] | str) -> list[RequestOutput]:
        """abort_request, returning each aborted request's last output (finish_reason "abort") for
        whoever still streams it (AsyncLLM); LLMEngine.abort_request drops them, as vLLM's does."""
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        outputs, stats = [], IterationStats(time.monotonic())
        for rid in ids:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            aborted = [req for req in state.children if not req.is_finished]
            for req in aborted:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                state.finished_children.add(req.index)
                stats.finished_requests.append(finished_stats(req, state, stats.iteration_timestamp))
            final_only = state.output_kind == RequestOutputKind.FINAL_ONLY  # its one output has all n
            outputs.append(self.outputs.make_output(state, state.children if final_only else aborted))
        if self.stat_loggers and stats.finished_requests:
            self._record(stats)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def get_supported_tasks(self) -> tuple[str, ...]:
        return self.pooler.supported_tasks if self.pooler is not None else ("generate",)

    def get_metrics(self) -> list[Any]:
        """vLLM's metrics snapshot (perfxlm.metrics.reader), read from prometheus_client's registry."""
        from perfxlm.metrics.loggers import PrometheusStatLogger  # prometheus_client: only when asked
        from perfxlm.metrics.reader import get_metrics_snapshot
        assert any(isinstance(s, PrometheusStatLogger) for s in self.stat_loggers), "Stat logging disabled"
        return get_metrics_snapshot()

    # ---- sleep mode (engine/sleep_mode.py) --------------------------------------------

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Stop scheduling (level 0), also discard the KV cache (level 1), also release the weights
        (level 2). `mode` says what becomes of unfinished requests: "abort" ends them; "wait" and
        "keep" keep them queued, which only level 0 allows (levels 1 and 2 forget their KV cache).
        Adding a request fails until `wake_up`."""
        self.sleep_mode.check_sleep_args(level, mode, self.has_unfinished_requests())
        if mode == "abort":
            self.abort_request(list(self.requests))
        self.sleep_mode.paused = True
        if level >= 1:
            self.block_manager.reset_prefix_cache()  # the blocks' contents are about to be gone
            discard_kv_cache(self.runner.executor)
            self.sleep_mode.sleeping_tags.add("kv_cache")
        if level >= 2:
            self.runner.executor = None  # the graph runner's weights, caches and activation buffers
            self.sleep_mode.sleeping_tags.add("weights")
        self.sleep_mode.level = max(self.sleep_mode.level, level)
        self._record_sleep_state()
        logger.info("engine asleep at level %d", level)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Bring back what `sleep` released ("weights", "kv_cache"; None: all) and, once all of it
        is back, resume scheduling ("scheduling" resumes a level 0 sleep). Returns whether the
        engine is fully awake."""
        wanted = self.sleep_mode.take_tags(tags)
        if "weights" in wanted:  # a fresh executor: weights reloaded, KV cache zero-filled
            self.runner.executor = build_executor(self.config, self.source, self._spec, self.block_manager.num_blocks)
        elif "kv_cache" in wanted:
            recommit_kv_cache(self.runner.executor)
        fully_awake = self.sleep_mode.resume_if_awake()
        if fully_awake:
            self._record_sleep_state()
        return fully_awake

    def is_sleeping(self) -> bool:
        return self.sleep_mode.is_sleeping()

    def _record_sleep_state(self) -> None:
        for stat_logger in self.stat_loggers:
            record = getattr(stat_logger, "record_sleep_state", None)  # vLLM's PrometheusStatLogger has it
            if record is not None:
                record(int(self.sleep_mode.is_sleeping()), self.sleep_mode.level)

    def do_log_stats(self) -> None:
        for logger_ in self.stat_loggers:
            logger_.log()

    # ---- one step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """Run one batch. Returns the outputs it produced: for CUMULATIVE and DELTA requests every
        one that got a token; for FINAL_ONLY the ones that finished; a PoolingRequestOutput for each
        pooling request whose prompt is done. A step that only prefilled a chunk of a prompt
        produces nothing."""
        if self.sleep_mode.paused:  # requests kept by sleep(level=0) wait for wake_up, as in vLLM
            return []
        sched = self.scheduler.schedule()
        if sched.is_empty():
            if self.scheduler.has_unfinished_requests():
                raise RuntimeError("scheduler could not schedule any waiting request (KV cache exhausted)")
            return []
        now = time.monotonic()
        for req in sched.requests:
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        inp = self.runner.prepare(sched)
        logits = self.runner.execute(inp)                                     # (N, vocab) float32
        for req, row, first_pos, count in inp.prompt_rows:
            self.outputs.add_prompt_logprobs(req, logits[row:row + count], first_pos)
        for req, row, pooled in inp.pooling:
            self.pooler.collect(req, pooled, logits[row:row + len(pooled)])
        out = None
        if inp.sampling:  # rows ascend: as many as logits rows means every row, in order (no gather copy)
            rows = inp.sample_rows
            out = self.sampler(logits if len(rows) == len(logits) else logits[rows], inp.sampling)
        got_token = self.scheduler.update(sched, inp.sampling, out.token_ids if out is not None else [])
        now = time.monotonic()
        stats = IterationStats(now, num_preempted_reqs=len(sched.preempted)) if self.stat_loggers else None
        updated: dict[str, list[Request]] = {}  # request id -> its sequences with a new token, in order
        for i in got_token:
            req = inp.sampling[i]
            if stats is not None:
                stats.add_token(req, now)
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            if req.logprobs is not None:
                self.outputs.add_sample_logprobs(req, out.logprobs[i])
            state = self.requests[req.parent_id]
            stop_str = self.outputs.process_token(state, req)
            if stop_str is not None:  # a stop string wins over the token's own finish reason
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED, stop_str)
            if req.is_finished:
                state.finished_children.add(req.index)
                if stats is not None:
                    stats.finished_requests.append(finished_stats(req, state, now))
            updated.setdefault(state.request_id, []).append(req)
        outputs = []
        for rid, reqs in updated.items():
            state = self.requests[rid]
            output = self.outputs.step_output(state, reqs)
            if output is not None:
                outputs.append(output)
            if state.finished:
                del self.requests[rid]
                if stats is not None:
                    stats.max_num_generation_tokens_iter.append(max(r.num_output_tokens for r in state.children))
        if inp.pooling:
            outputs += self._finish_pooled(inp, stats, now)
        if stats is not None:
            self._record(stats)
        return outputs

    def _finish_pooled(self, inp: Any, stats: IterationStats | None, now: float) -> list[PoolingRequestOutput]:
        """The pooling requests whose whole prompt is now computed: pooled, ended (their KV blocks
        freed, as any finished request's) and output."""
        outputs = []
        for req, _, _ in inp.pooling:
            if req.is_finished or req.num_computed_tokens < req.num_prompt_tokens:  # aborted, or more chunks to go
                continue
            data = self.pooler.pool(req)
            req.first_token_time = req.last_token_time = now
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            state = self.requests.pop(req.parent_id)
            state.finished_children.add(req.index)
            if stats is not None:
                stats.finished_requests.append(finished_stats(req, state, now))
            outputs.append(self.outputs.pooling_output(state, data))
        return outputs

    # ---- full-vocabulary scoring (perfxlm bench quality) ------------------------------

    def score_prompt(self, token_ids: list[int], start: int = 1) -> np.ndarray:
        """Full-vocabulary log-probabilities of token_ids[start:], each given the tokens before it:
        (len(token_ids) - start, vocab) float32, row i the distribution token_ids[start + i] was
        drawn from. Outside the request queue (prompt logprobs give only the top k): the prompt
        is prefilled in steps of at most max_num_batched_tokens on KV blocks of its own, freed
        afterwards, and only the rows asked for go through the lm_head."""
        self.sleep_mode.check_awake()
        if not 1 <= start < len(token_ids):
            raise ValueError(f"start must be in [1, {len(token_ids) - 1}], got {start}")
        params = SamplingParams(max_tokens=1)
        self.validate_request(token_ids, params)
        req = Request("score_prompt", list(token_ids), params, None, 1)
        if not self.block_manager.allocate_slots(req, len(token_ids)):
            raise ValueError(f"scoring {len(token_ids)} tokens needs {self.block_manager.blocks_needed(len(token_ids))}"
                             f" KV blocks; {self.block_manager.num_free_blocks} are free")
        out = np.empty((len(token_ids) - start, self.vocab_size), np.float32)
        try:
            budget = self.config.max_num_batched_tokens
            for pos in range(0, len(token_ids), budget):
                n = min(budget, len(token_ids) - pos)
                inp = self.runner.prepare(SchedulerOutput([req], [n]))
                # the logits at position p score token p + 1: rows start - 1 .. len - 2 only
                lo, hi = max(pos, start - 1), min(pos + n, len(token_ids) - 1)
                inp.feeds["logits_indices"] = np.arange(lo - pos, max(hi - pos, lo - pos), dtype=np.int64)
                logits = self.runner.execute(inp)
                if hi > lo:
                    out[lo - start + 1:hi - start + 1] = log_softmax(logits)
                req.num_computed_tokens += n
        finally:
            self.block_manager.free_blocks(req)
        return out

    # ---- statistics -------------------------------------------------------------------

    def scheduler_stats(self) -> SchedulerStats:
        bm = self.block_manager
        lookups, queries, hits = (now - seen for now, seen in zip((bm.lookups, bm.queries, bm.hits),
                                                                   self._prefix_seen))
        self._prefix_seen = (bm.lookups, bm.queries, bm.hits)
        return SchedulerStats(num_running_reqs=len(self.scheduler.running),
                              num_waiting_reqs=len(self.scheduler.waiting),
                              kv_cache_usage=1.0 - bm.num_free_blocks / bm.num_blocks,
                              num_kv_blocks=bm.num_blocks, num_free_kv_blocks=bm.num_free_blocks,
                              prefix_cache_requests=lookups, prefix_cache_queries=queries,
                              prefix_cache_hits=hits)

    def _record(self, stats: IterationStats) -> None:
        stats.n_params_iter, self._new_request_ns = self._new_request_ns, []
        sched_stats = self.scheduler_stats()
        for logger_ in self.stat_loggers:
            logger_.record(sched_stats, stats)
