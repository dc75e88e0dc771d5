"""The engine: owns tokenizer, model runner, scheduler and sampler; runs steps."""

import logging
import numbers
import os
import time
from pathlib import Path

import torch

from hw_plugins.base import REFERENCE, select_plugin
from perfxlm.config import SEED_RANGE, EngineConfig
from perfxlm.engine.block_manager import BlockManager
from perfxlm.engine.detokenizer import IncrementalDetokenizer
from perfxlm.engine.graph_runner import GraphRunner, GraphSpec
from perfxlm.engine.model_runner import EagerExecutor, Executor, GraphExecutor, ModelRunner, model_spec
from perfxlm.engine.output_processor import OutputProcessor, RequestState
from perfxlm.engine.request import Request, RequestStatus
from perfxlm.engine.sampler import Sampler
from perfxlm.engine.scheduler import Scheduler
from perfxlm.exceptions import VLLMValidationError
from perfxlm.models.graph_cache import cached_graph
from perfxlm.models.loader import ModelSource, load_tokenizer
from perfxlm.outputs import RequestOutput
from perfxlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source
        start = time.perf_counter()
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(source, config.tokenizer, trust_remote_code=config.trust_remote_code)
        self.generation_config = source.generation_config if config.generation_config != "vllm" else {}
        self.eos_token_id = self._eos_token_id()

        # the model's shapes size the KV cache before any weight is read or graph exported
        spec = model_spec(source.meta_model(), config.dtype)
        self.vocab_size = spec.vocab_size
        num_blocks = self._num_blocks(spec)
        if os.environ.get("PERFXLM_EXECUTOR", "graph") == "eager":
            if config.batch_invariant:
                raise ValueError("PERFXLM_BATCH_INVARIANT=1 needs the graph executor (PERFXLM_EXECUTOR=eager "
                                 "runs torch, whose GEMMs depend on the batch)")
            executor: Executor = EagerExecutor(source.load_weights(config.dtype), spec, num_blocks, config.block_size)
        else:
            executor = self._graph_executor(cached_graph(source, config.dtype, config.quantization), num_blocks)
            if executor.spec != spec:
                raise RuntimeError(f"the exported graph's vocabulary and KV caches {executor.spec} differ from the "
                                   f"model's {spec}")
        self.runner = ModelRunner(executor, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, config.enable_chunked_prefill)
        self.sampler = Sampler(config.seed, executor.native_sampler)
        self.outputs = OutputProcessor(self.tokenizer)
        self.requests: dict[str, RequestState] = {}
        logger.info("engine ready in %.1f s: %s, %s", time.perf_counter() - start, source.path,
                    str(config.dtype).removeprefix("torch."))

    def _num_blocks(self, spec: GraphSpec) -> int:
        config = self.config
        per_block = spec.kv_bytes_per_block(config.block_size)
        num_blocks = config.kv_cache_bytes() // per_block
        if num_blocks * config.block_size < config.max_model_len:
            need = -(-config.max_model_len // config.block_size) * per_block
            raise ValueError(
                f"To serve at least one request with the model's max seq len ({config.max_model_len}), "
                f"{need / (1 << 30):.2f} GiB KV cache is needed, which is larger than the available KV "
                f"cache memory ({config.kv_cache_bytes() / (1 << 30):.2f} GiB). Based on the available "
                f"memory, the estimated maximum model length is {num_blocks * config.block_size}. Try "
                "increasing `kv_cache_memory_bytes` (or VLLM_CPU_KVCACHE_SPACE) or decreasing "
                "`max_model_len` when initializing the engine.")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s); maximum concurrency for %d tokens "
                    "per request: %.2fx", num_blocks, config.block_size, num_blocks * per_block / (1 << 30),
                    str(config.dtype).removeprefix("torch."), config.max_model_len,
                    num_blocks * config.block_size / config.max_model_len)
        return num_blocks

    def _graph_executor(self, graph: Path, num_blocks: int) -> Executor:
        cfg = self.config
        runner = GraphRunner(graph, select_plugin(cfg.hw_plugin), select_plugin(REFERENCE),
                             cfg.max_num_batched_tokens, num_blocks, cfg.block_size)
        for plugin in {node.plugin for node in runner.nodes}:
            if not plugin.set_batch_invariant(cfg.batch_invariant):
                raise ValueError(f"PERFXLM_BATCH_INVARIANT=1: hw_plugin {plugin.name!r} runs nodes here but "
                                 "cannot make them batch invariant (the cpu and rvv plugins can)")
        return GraphExecutor(runner)

    def _eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        eos = self.source.hf_config.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos

    # ---- requests -------------------------------------------------------------------

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise VLLMValidationError for what vLLM rejects when a request is added."""
        cfg, vocab = self.config, self.vocab_size
        if not prompt_token_ids:
            raise VLLMValidationError("The decoder prompt cannot be empty", parameter="prompt")
        bad = [t for t in prompt_token_ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
        if bad:
            raise VLLMValidationError(f"Token id {bad[0]} is out of vocabulary", parameter="prompt_token_ids",
                                      value=bad[0])
        n = len(prompt_token_ids)
        if n > cfg.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {n}) is longer than the maximum model length of "
                f"{cfg.max_model_len}. Make sure that `max_model_len` is no smaller than the number "
                "of text tokens.", parameter="prompt", value=n)
        if n == cfg.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {n}) plus the number of requested output tokens (at least 1) "
                f"is longer than the maximum model length of {cfg.max_model_len}. Make sure that "
                "`max_model_len` is no smaller than the number of text tokens (prompt + requested "
                "output tokens).", parameter="prompt", value=n)
        max_logprobs = vocab if cfg.max_logprobs == -1 else cfg.max_logprobs  # -1: no cap, as in vLLM
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            k = vocab if k == -1 else k
            if k is not None and k > max_logprobs:
                kind = "sample" if name == "logprobs" else "prompt"
                raise VLLMValidationError(
                    f"Requested {kind} logprobs of {k}, which is greater than max allowed: {cfg.max_logprobs}",
                    parameter=name, value=k)
        if params.seed is not None and not SEED_RANGE[0] <= params.seed <= SEED_RANGE[1] + 1 - params.n:
            raise VLLMValidationError(  # torch's generators take a 64-bit seed; child i of n uses seed + i
                f"seed must be in [-2**63, 2**64 - n] (n={params.n}), got {params.seed}.", parameter="seed",
                value=params.seed)
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", list(params.logit_bias or ())),
                          ("allowed_token_ids", params.allowed_token_ids or [])):
            invalid = [t for t in ids if not 0 <= t < vocab]
            if invalid:
                raise VLLMValidationError(
                    f"token_id(s) {invalid} in {name} contain out-of-vocab token ids. Vocabulary size: {vocab}",
                    parameter=name, value=invalid)
        if params.allowed_token_ids is not None and not params.allowed_token_ids:
            raise VLLMValidationError("allowed_token_ids is not None and empty!", parameter="allowed_token_ids")
        if params.thinking_token_budget is not None:
            raise VLLMValidationError(
                "thinking_token_budget is set but reasoning_config is not configured. Please set "
                "--reasoning-config to use thinking_token_budget.", parameter="thinking_token_budget")
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise VLLMValidationError("stop strings and bad_words need a tokenizer (skip_tokenizer_init=True)")
        unsupported = {"structured_outputs": params.structured_outputs, "logprob_token_ids": params.logprob_token_ids,
                       "prompt_logprob_token_ids": params.prompt_logprob_token_ids,
                       "flat_logprobs": params.flat_logprobs, "repetition_detection": params.repetition_detection,
                       "trace_decode_token_ids": params.trace_decode_token_ids}
        for name, value in unsupported.items():
            if value:
                raise NotImplementedError(f"perfxlm does not support SamplingParams.{name} yet")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Validate and queue a request; n > 1 fans out into n sequences. Raises
        VLLMValidationError (nothing queued) for what vLLM rejects, and ValueError for a
        request id that is already running."""
        self.validate_request(prompt_token_ids, params)
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already running")
        prompt_token_ids = [int(t) for t in prompt_token_ids]  # numpy integers become plain ints
        params = params.clone()
        params.update_from_generation_config(self.generation_config, self.eos_token_id)
        if self.tokenizer is not None:
            params.update_from_tokenizer(self.tokenizer)
        max_tokens = params.max_tokens or self.config.max_model_len - len(prompt_token_ids)
        children, detoks = [], []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                child_params = params.clone()
                child_params.n = 1
                if params.seed is not None:  # child i draws from seed + i, as in vLLM
                    child_params.seed = params.seed + i
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            req = Request(child_id, prompt_token_ids, child_params, params.eos_token_id, max_tokens,
                          parent_id=request_id, index=i)
            req.wants_prompt_logprobs &= i == 0  # only the first sequence scores the prompt
            children.append(req)
            detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child_params)
                          if self.tokenizer is not None and params.detokenize else None)
        self.requests[request_id] = RequestState(request_id, prompt, prompt_token_ids, children, detoks,
                                                 children[0].arrival_time)
        for req in children:
            self.scheduler.add_request(req)

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            state = self.requests.pop(rid, None)
            for req in state.children if state else ():
                if not req.is_finished:
                    self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the RequestOutputs of the requests that finished in it."""
        sched = self.scheduler.schedule()
        if sched.is_empty():
            if self.scheduler.has_unfinished_requests():
                raise RuntimeError("scheduler could not schedule any waiting request (KV cache exhausted)")
            return []
        inp = self.runner.prepare(sched)
        logits = torch.from_numpy(self.runner.execute(inp))                   # (N, vocab) float32
        for req, row, first_pos, count in inp.prompt_rows:
            self.outputs.add_prompt_logprobs(req, logits[row:row + count], first_pos)
        out = None
        if inp.sampling:  # rows ascend: as many as logits rows means every row, in order (no gather copy)
            rows = inp.sample_rows
            out = self.sampler(logits if len(rows) == len(logits) else logits[rows], inp.sampling)
        got_token = self.scheduler.update(sched, inp.sampling, out.token_ids if out is not None else [])
        finished: list[RequestOutput] = []
        now = time.monotonic()
        for i in got_token:
            req = inp.sampling[i]
            if req.first_token_time is None:
                req.first_token_time = now
            if req.logprobs is not None:
                self.outputs.add_sample_logprobs(req, out.logprobs[i])
            state = self.requests[req.parent_id]
            stop_str = self.outputs.process_token(state, req)
            if stop_str is not None:  # a stop string wins over the token's own finish reason
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED, stop_str)
            if req.is_finished:
                state.finished_children.add(req.index)
                if len(state.finished_children) == len(state.children):
                    finished.append(self.outputs.make_output(state))
                    del self.requests[state.request_id]
        return finished
