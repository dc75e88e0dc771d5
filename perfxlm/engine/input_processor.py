"""From a user's prompt and SamplingParams to a validated, queued-ready RequestState (vLLM's
InputProcessor). It reads only what never changes after the engine is built (config, vocabulary,
tokenizer), so AsyncLLM runs it on the caller's thread and a bad request fails there, at once."""

import numbers
import time
from typing import Any

from perfxlm.config import SEED_RANGE, EngineConfig
from perfxlm.engine.detokenizer import IncrementalDetokenizer
from perfxlm.engine.output_processor import RequestState
from perfxlm.engine.request import Request
from perfxlm.engine.structured_output import StructuredOutputManager, StructuredOutputsConfig
from perfxlm.exceptions import VLLMValidationError
from perfxlm.inputs import tokenize_prompt
from perfxlm.pooling_params import PoolingParams
from perfxlm.sampling_params import RequestOutputKind, SamplingParams


class InputProcessor:
    def __init__(self, config: EngineConfig, vocab_size: int, tokenizer: Any, generation_config: dict[str, Any],
                 eos_token_id: int | None) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.eos_token_id = eos_token_id
        # an EngineConfig built by hand (not by EngineArgs) has vLLM's default structured outputs config
        so_config = StructuredOutputsConfig.coerce(getattr(config, "structured_outputs_config", None))
        self.structured_outputs = StructuredOutputManager(so_config, tokenizer, vocab_size)

    def process(self, request_id: str, prompt: Any, params: SamplingParams, *, prompt_text: str | None = None,
                tokenization_kwargs: dict[str, Any] | None = None, arrival_time: float | None = None
                ) -> RequestState:
        """Tokenize and validate; n > 1 fans out into n sequences. Raises VLLMValidationError for
        what vLLM rejects, with nothing queued."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"Expected SamplingParams, got {type(params).__name__}")
        prompt_token_ids, text = tokenize_prompt(prompt, self.tokenizer, tokenization_kwargs)
        self.validate_request(prompt_token_ids, params)
        prompt_token_ids = [int(t) for t in prompt_token_ids]  # numpy integers become plain ints
        params = params.clone()
        params.update_from_generation_config(self.generation_config, self.eos_token_id)
        if self.tokenizer is not None:
            params.update_from_tokenizer(self.tokenizer)
        max_tokens = params.max_tokens or self.config.max_model_len - len(prompt_token_ids)
        compiled = None  # one grammar for the request, one matcher per sequence
        if params.structured_outputs is not None:
            compiled = self.structured_outputs.compile(params.structured_outputs)
        arrival = time.monotonic() if arrival_time is None else arrival_time
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
                          parent_id=request_id, index=i, arrival_time=arrival)
            req.wants_prompt_logprobs &= i == 0  # only the first sequence scores the prompt
            if compiled is not None:
                req.grammar = self.structured_outputs.new_grammar(compiled, params.all_stop_token_ids)
            children.append(req)
            detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child_params)
                          if self.tokenizer is not None and params.detokenize else None)
        return RequestState(request_id, prompt_text if prompt_text is not None else text, prompt_token_ids,
                            children, detoks, arrival, params.output_kind, params.max_tokens)

    def process_pooling(self, request_id: str, prompt: Any, params: PoolingParams, model_config: Any,
                        supported_tasks: tuple[str, ...], *, tokenization_kwargs: dict[str, Any] | None = None,
                        arrival_time: float | None = None) -> RequestState:
        """A pooling request: tokenized, its PoolingParams verified against the model (a copy; the
        caller's stays as given), one Request that only prefills. vLLM's errors, nothing queued."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string, got {type(request_id)}")
        if not supported_tasks:
            raise VLLMValidationError("This model does not support pooling")
        params = params.clone()
        if params.task is None:  # vLLM's defaults for a request that names no task
            params.task = next((t for t in ("token_embed", "token_classify", "plugin") if t in supported_tasks), None)
        if params.task not in supported_tasks:
            raise VLLMValidationError(f"Unsupported task: {params.task!r} Supported tasks: {list(supported_tasks)}")
        params.verify(model_config)
        prompt_token_ids, text = tokenize_prompt(prompt, self.tokenizer, tokenization_kwargs)
        self._validate_prompt(prompt_token_ids)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        token_types = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
        if token_types is not None and len(token_types) != len(prompt_token_ids):
            raise VLLMValidationError(f"token_type_ids has {len(token_types)} entries for {len(prompt_token_ids)} "
                                      "prompt tokens", parameter="token_type_ids")
        # neutral sampling params: what the scheduler reads of a request (its prefix-cache use)
        neutral = SamplingParams(max_tokens=1, skip_reading_prefix_cache=bool(params.skip_reading_prefix_cache))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, prompt_token_ids, neutral, None, 1, parent_id=request_id, arrival_time=arrival,
                      pooling_params=params, token_type_ids=None if token_types is None else list(token_types))
        return RequestState(request_id, text, prompt_token_ids, [req], [None], arrival, RequestOutputKind.FINAL_ONLY)

    def _validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """A prompt that is not empty, within the vocabulary and at most max_model_len long (a
        generation request also needs room for one output token: validate_request)."""
        if not prompt_token_ids:
            raise VLLMValidationError("The decoder prompt cannot be empty", parameter="prompt")
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
        if bad:
            raise VLLMValidationError(f"Token id {bad[0]} is out of vocabulary", parameter="prompt_token_ids",
                                      value=bad[0])
        n, max_len = len(prompt_token_ids), self.config.max_model_len
        if n > max_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {n}) is longer than the maximum model length of {max_len}. Make sure "
                "that `max_model_len` is no smaller than the number of text tokens.", parameter="prompt", value=n)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise VLLMValidationError for what vLLM rejects when a request is added."""
        cfg, vocab = self.config, self.vocab_size
        self._validate_prompt(prompt_token_ids)
        n = len(prompt_token_ids)
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
        self.structured_outputs.validate(params)
        unsupported = {"logprob_token_ids": params.logprob_token_ids,
                       "prompt_logprob_token_ids": params.prompt_logprob_token_ids,
                       "flat_logprobs": params.flat_logprobs, "repetition_detection": params.repetition_detection,
                       "trace_decode_token_ids": params.trace_decode_token_ids}
        for name, value in unsupported.items():
            if value:
                raise NotImplementedError(f"perfxlm does not support SamplingParams.{name} yet")
