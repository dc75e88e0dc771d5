"""`LLM`: vLLM's offline entry point, in process."""

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from perfxlm.beam_search import BeamSearchOutput, BeamSearchParams
from perfxlm.beam_search import beam_search as run_beam_search
from perfxlm.engine.arg_utils import EngineArgs, UsageContext
from perfxlm.engine.llm_engine import LLMEngine
from perfxlm.entrypoints.pooling import PoolingMixin
from perfxlm.exceptions import VLLMValidationError
from perfxlm.inputs import PromptType, check_text, tokenize_prompt
from perfxlm.metrics.reader import Metric
from perfxlm.outputs import RequestOutput
from perfxlm.sampling_params import RequestOutputKind, SamplingParams
from perfxlm.vllm_shim.coerce import coerce_sampling_params

logger = logging.getLogger(__name__)

# vLLM engine arguments perfxlm honours (beyond LLM's named parameters)
# (hw_plugin is perfxlm's own: the plugin that runs the graph)
_ENGINE_KWARGS = {"max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                  "block_size", "max_logprobs", "generation_config", "override_generation_config",
                  "enable_chunked_prefill", "scheduling_policy", "hw_plugin", "enable_lora", "max_loras",
                  "max_lora_rank", "max_cpu_loras", "kv_cache_dtype"}
# vLLM arguments that do not apply to perfxlm's single-process CPU engine; accepted, no effect
_IGNORED_KWARGS = {"swap_space", "load_format", "download_dir", "device",
                   "distributed_executor_backend", "max_seq_len_to_capture", "disable_async_output_proc",
                   "num_scheduler_steps", "use_v2_block_manager", "worker_cls", "max_parallel_loading_workers",
                   "calculate_kv_scales", "prefix_caching_hash_algo",
                   "preemption_mode", "async_scheduling", "enable_prompt_embeds", "limit_mm_per_prompt",
                   "reasoning_parser", "served_model_name", "config_format", "model_impl", "seed_everything",
                   "enable_sleep_mode"}  # sleep mode needs no setup here: LLM.sleep always works
# vLLM features perfxlm does not implement: refuse rather than silently ignore
_REFUSED_KWARGS = {"speculative_config": None, "pipeline_parallel_size": 1,
                   "data_parallel_size": 1, "enable_expert_parallel": False, "kv_transfer_config": None}


class LLM(PoolingMixin):
    """An LLM for offline generation, with vLLM's constructor and methods.

    `model` is a local HF directory, a local .gguf file, an HF repo id present in
    the local HF cache, or the embedded default `HuggingFaceTB/SmolLM2-135M-Instruct`.
    A pooling model (`runner="pooling"`, or an embedding / classifier checkpoint such as a
    sentence-transformers directory) serves `embed`, `classify`, `score` and `encode`
    (entrypoints/pooling.py) instead of `generate`.
    Engine arguments (`max_model_len`, `max_num_seqs`, ...) are keyword arguments as
    in vLLM; see docs/compatibility.md for which are honoured, accepted or refused.
    Every engine argument is checked before anything of the model is read.

    One LLM may be shared by threads: concurrent `generate` / `chat` calls (and
    `reset_prefix_cache`) run one at a time, behind a lock held for the whole call,
    and each call returns exactly its own outputs. They are serialised, not batched
    together: to batch, pass all the prompts to one call.
    """

    def __init__(self, model: str, *, runner: str = "auto", convert: str = "auto",
                 tokenizer: str | None = None, tokenizer_mode: str = "auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: Any = "auto",
                 quantization: str | None = None, revision: str | None = None, tokenizer_revision: str | None = None,
                 chat_template: str | None = None, seed: int | None = 0, gpu_memory_utilization: float = 0.92,
                 cpu_offload_gb: float = 0, enforce_eager: bool = False, disable_custom_all_reduce: bool = False,
                 hf_token: bool | str | None = None, hf_overrides: dict | Callable | None = None,
                 mm_processor_kwargs: dict | None = None, pooler_config: Any = None,
                 structured_outputs_config: Any = None, compilation_config: Any = None,
                 attention_config: Any = None, profiler_config: Any = None,
                 kv_cache_memory_bytes: int | None = None, logits_processors: list | None = None,
                 allowed_local_media_path: str = "", allowed_media_domains: list | None = None,
                 **kwargs: Any) -> None:
        # vLLM's LLM turns stats off unless asked; with them on, get_metrics() reads Prometheus
        log_stats = not kwargs.pop("disable_log_stats", True)
        for name, value in kwargs.items():
            if name in _REFUSED_KWARGS and value != _REFUSED_KWARGS[name]:
                raise NotImplementedError(f"perfxlm does not support {name}={value!r}")
            if name not in _ENGINE_KWARGS | _IGNORED_KWARGS | set(_REFUSED_KWARGS):
                raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")
        if tensor_parallel_size != 1:
            raise NotImplementedError(f"perfxlm runs on one device: tensor_parallel_size={tensor_parallel_size} "
                                      "is not supported")
        if cpu_offload_gb or logits_processors:
            raise NotImplementedError("perfxlm does not support cpu_offload_gb or custom logits_processors")
        if tokenizer_mode not in ("auto", "hf", "slow"):
            raise NotImplementedError(f"perfxlm: tokenizer_mode={tokenizer_mode!r} is not supported")
        engine_args = EngineArgs(
            model=model, tokenizer=tokenizer, revision=revision, dtype=dtype, seed=seed,
            quantization=quantization, kv_cache_memory_bytes=kv_cache_memory_bytes,
            skip_tokenizer_init=skip_tokenizer_init, trust_remote_code=trust_remote_code, hf_overrides=hf_overrides,
            structured_outputs_config=structured_outputs_config, runner=runner, convert=convert,
            pooler_config=pooler_config,
            **{k: v for k, v in kwargs.items() if k in _ENGINE_KWARGS})
        # every argument is checked before the model is read: a bad one fails at once, not after loading
        self.llm_engine = LLMEngine.from_engine_args(engine_args, UsageContext.LLM_CLASS)
        self.llm_engine.config.chat_template = _load_template(chat_template)
        if log_stats:
            _attach_stat_loggers(self.llm_engine)
        self.model_config = self.llm_engine.model_config
        self.supported_tasks = self.llm_engine.get_supported_tasks()
        self.runner_type = self.llm_engine.config.runner_type
        self.request_counter = itertools.count()
        self.default_sampling_params: SamplingParams | None = None
        # one call at a time drives the engine: a call collects every output the engine yields
        self._lock = threading.Lock()
        self._lock_owner: int | None = None

    # ---- public API -------------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json, else vLLM's defaults."""
        if self.default_sampling_params is None:
            diff = self.llm_engine.model_config.get_diff_sampling_param()
            if diff:
                logger.info("Default sampling parameters have been overridden by the model's "
                            "generation config: %s", diff)
            self.default_sampling_params = SamplingParams.from_optional(**diff) if diff else SamplingParams()
        return self.default_sampling_params.clone()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool | Callable[..., tqdm] = True, lora_request: Any = None, priority: list[int] | None = None,
                 tokenization_kwargs: dict[str, Any] | None = None,
                 mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate completions for the prompts; outputs come back in prompt order.
        Concurrent calls on one LLM run one after the other (see the class docstring)."""
        self._require_generative("generate")
        with self._exclusive("generate"):
            prompt_list = _as_prompt_list(prompts)
            inputs = [self._tokenize(p, tokenization_kwargs) for p in prompt_list]
            return self._run(inputs, sampling_params, use_tqdm, lora_request, priority)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True, lora_request: Any = None,
             chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             tokenization_kwargs: dict[str, Any] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Render conversations with the chat template, then generate (one output per conversation).
        Concurrent calls on one LLM run one after the other (see the class docstring)."""
        self._require_generative("chat")
        with self._exclusive("chat"):
            tok = self._require_tokenizer("chat")
            conversations = _as_conversations(messages)
            template = _load_template(chat_template) or self.llm_engine.config.chat_template or tok.chat_template
            if template is None:
                raise ValueError("As of transformers v4.44, default chat template is no longer allowed, so you "
                                 "must provide a chat template if the tokenizer does not define one.")
            inputs = []
            for conv in conversations:
                text = tok.apply_chat_template(
                    conv, tokenize=False, chat_template=template,
                    add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                    tools=tools, **(chat_template_kwargs or {}))
                check_text(text, "rendered chat prompt")
                # the template writes the special tokens (BOS, ...) itself
                inputs.append((tok.encode(text, add_special_tokens=False), text))
            return self._run(inputs, sampling_params, use_tqdm, lora_request, None)

    def reset_prefix_cache(self) -> bool:
        with self._exclusive("reset_prefix_cache"):
            return self.llm_engine.block_manager.reset_prefix_cache()

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams, lora_request: Any = None,
                    use_tqdm: bool = False, concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's beam search (perfxlm/beam_search.py): one BeamSearchOutput per prompt, its
        sequences best first, each holding prompt + generated tokens and their decoded text."""
        self._require_generative("beam_search")
        with self._exclusive("beam_search"):
            tok = self._require_tokenizer("beam_search")
            inputs = [self._tokenize(p, None) for p in _as_prompt_list(prompts)]

            def run_step(token_lists: list[list[int]], step_params: SamplingParams) -> list[RequestOutput]:
                return self._run([(ids, None) for ids in token_lists], step_params, False, lora_request, None)

            return run_beam_search(inputs, params, tok, run_step, lora_request=lora_request, use_tqdm=use_tqdm,
                                   concurrency_limit=concurrency_limit)

    def get_metrics(self) -> list[Metric]:
        """vLLM's metrics snapshot (Counter, Gauge, Histogram, Vector from perfxlm.metrics.reader).
        As in vLLM, stats are off unless the LLM was built with `disable_log_stats=False`."""
        return self.llm_engine.get_metrics()

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """Level 0: pause; 1: also discard the KV cache; 2: also release the weights. Adding a
        request fails until `wake_up()` (vLLM would queue it and never run it)."""
        with self._exclusive("sleep"):
            self.llm_engine.sleep(level=level, mode=mode)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Reload what `sleep` released (tags "weights", "kv_cache", "scheduling"; None: all);
        returns whether the engine is fully awake."""
        with self._exclusive("wake_up"):
            return self.llm_engine.wake_up(tags)

    # ---- internals --------------------------------------------------------------------

    def _prompt_list(self, prompts: Any) -> list[Any]:  # (for PoolingMixin)
        return _as_prompt_list(prompts)

    def _require_generative(self, what: str) -> None:
        if self.runner_type != "generate":
            raise ValueError(f"LLM.{what}() is only supported for generative models. Try passing `--runner "
                             "generate` to use the model as a generative model.")

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Hold the LLM's lock for one call; other threads' calls wait their turn."""
        me = threading.get_ident()
        if self._lock_owner == me:  # would deadlock, or take the running call's outputs
            raise RuntimeError(f"LLM.{what}() was called while a call on the same LLM is running in this "
                               "thread (e.g. from a use_tqdm callback); call it after that call returns")
        with self._lock:
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    def _require_tokenizer(self, what: str) -> Any:
        tok = self.llm_engine.tokenizer
        if tok is None:
            raise ValueError(f"{what} needs a tokenizer, but the LLM was built with skip_tokenizer_init=True")
        return tok

    def _tokenize(self, prompt: Any, tokenization_kwargs: dict[str, Any] | None) -> tuple[list[int], str | None]:
        """One prompt -> (token ids, prompt text or None)."""
        if isinstance(prompt, (str, dict)) and not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            self._require_tokenizer("A text prompt")
        return tokenize_prompt(prompt, self.llm_engine.tokenizer, tokenization_kwargs)

    def _run(self, inputs: list[tuple[list[int], str | None]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool | Callable[..., tqdm], lora_request: Any, priority: list[int] | None) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if not isinstance(sampling_params, Sequence):  # ours, or a real vLLM's (converted field by field)
            params = [coerce_sampling_params(sampling_params)] * len(inputs)
        else:
            params = [coerce_sampling_params(p) for p in sampling_params]
            if len(params) != len(inputs):
                raise VLLMValidationError(f"The lengths of prompts ({len(inputs)}) and params "
                                          f"({len(params)}) must be the same.")
        loras = list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(inputs)
        if len(loras) != len(inputs):
            raise ValueError("Lora request list should be the same length as the prompts")
        if priority is not None and any(priority):
            raise ValueError(f"Got priority {priority} but Priority scheduling is not enabled.")
        engine = self.llm_engine
        ids = []
        try:
            for (prompt_ids, text), p, lora in zip(inputs, params, loras):
                p.output_kind = RequestOutputKind.FINAL_ONLY  # vLLM sets this on the caller's object
                request_id = str(next(self.request_counter))
                # queues all of it or nothing
                engine.add_request(request_id, prompt_ids, p, lora_request=lora, prompt_text=text)
                ids.append(request_id)
            outputs = self._run_engine(len(inputs), use_tqdm)
        except BaseException:
            # a request that failed validation or could not be added (a bad word that is all
            # spaces, extra_args that cannot be copied, ...) or a failing step: abort what this
            # call queued, as vLLM does, so the next call sees a clean engine
            engine.abort_request(ids)
            raise
        return sorted(outputs, key=lambda o: int(o.request_id))

    def _run_engine(self, num_requests: int, use_tqdm: bool | Callable[..., tqdm]) -> list[RequestOutput]:
        pbar = None
        if use_tqdm:
            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            pbar = make_bar(total=num_requests, desc="Processed prompts", dynamic_ncols=True,
                            postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        outputs: list[RequestOutput] = []
        in_toks = out_toks = 0
        start = time.perf_counter()
        engine = self.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                outputs.append(out)
                if pbar is not None:
                    in_toks += len(out.prompt_token_ids)
                    out_toks += sum(len(c.token_ids) for c in out.outputs)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    pbar.postfix = (f"est. speed input: {in_toks / elapsed:.2f} toks/s, "
                                    f"output: {out_toks / elapsed:.2f} toks/s")
                    pbar.update(1)
        if pbar is not None:
            pbar.close()
        return outputs


def _attach_stat_loggers(engine: LLMEngine) -> None:
    """vLLM's default stat loggers (the stats log line, Prometheus), as AsyncLLM builds them."""
    from perfxlm.metrics.loggers import LoggingStatLogger, PrometheusStatLogger
    config, bm = engine.config, engine.block_manager
    cache_config = {"block_size": str(config.block_size), "num_gpu_blocks": str(bm.num_blocks),
                    "enable_prefix_caching": str(config.enable_prefix_caching),
                    "kv_cache_size_tokens": str(bm.num_blocks * config.block_size)}
    added = [LoggingStatLogger(kv_cache_device="CPU", num_kv_blocks=bm.num_blocks),
             PrometheusStatLogger(engine.model_config.served_model_name, config.max_model_len, cache_config)]
    for stat_logger in added:
        stat_logger.log_engine_initialized()
    engine.stat_loggers += added


def _as_prompt_list(prompts: Any) -> list[Any]:
    """vLLM's rule: a str, a dict or a list of ints is one prompt; anything else is a sequence."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return list(prompts)


def _as_conversations(messages: Any) -> list[list[dict[str, Any]]]:
    """One conversation or a list of them -> checked, flattened conversations. A message that
    is not a dict, or has no 'role', fails here (naming it) rather than inside the template."""
    if not isinstance(messages, (list, tuple)):
        raise VLLMValidationError(f"chat() takes a conversation (a list of message dicts) or a list of "
                                  f"conversations, got {type(messages).__name__}", parameter="messages")
    many = bool(messages) and isinstance(messages[0], (list, tuple))
    conversations = messages if many else [messages]
    checked = []
    for c, conv in enumerate(conversations):
        where = f"conversation {c}, " if many else ""
        if not isinstance(conv, (list, tuple)):
            raise VLLMValidationError(f"Invalid conversation {c}: expected a list of message dicts, got "
                                      f"{type(conv).__name__}", parameter="messages")
        for i, m in enumerate(conv):
            if not isinstance(m, dict):
                raise VLLMValidationError(f"Invalid chat message ({where}message {i}): expected a dict with "
                                          f"'role' and 'content', got {type(m).__name__} {m!r}",
                                          parameter="messages", value=m)
            if "role" not in m:
                raise VLLMValidationError(f"Invalid chat message ({where}message {i}): missing key 'role' "
                                          f"in {m!r}", parameter="messages", value=m)
        checked.append([_flatten_content(m) for m in conv])
    return checked


def _flatten_content(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-style content parts -> one string, as vLLM's 'string' content format does;
    no content (absent or None) is the empty string, as in vLLM."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in content
                 if not isinstance(p, dict) or p.get("type", "text") == "text"]
        message = {**message, "content": "\n".join(texts)}
    elif content is None:
        message = {**message, "content": ""}
    return message


def _load_template(template: str | None) -> str | None:
    """A chat template given inline or as a file path."""
    if template is not None and os.path.isfile(template):
        with open(template) as f:
            return f.read()
    return template
