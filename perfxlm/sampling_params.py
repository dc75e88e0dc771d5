"""SamplingParams with vLLM 0.32's fields, defaults, normalisation and validation messages."""

import copy
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from perfxlm.exceptions import VLLMValidationError

logger = logging.getLogger(__name__)

_SAMPLING_EPS = 1e-5  # temperature below this means greedy
_MIN_TEMP = 1e-2      # smaller positive temperatures are raised to this (overflow guard)
_EXTRA_ARGS_INT_RANGE = (-(1 << 63), (1 << 64) - 1)  # what vLLM's msgpack transport carries


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(Enum):
    CUMULATIVE = 0  # every RequestOutput holds the whole output so far
    DELTA = 1       # only what is new since the last RequestOutput
    FINAL_ONLY = 2  # one RequestOutput, when the request finishes


@dataclass
class StructuredOutputsParams:
    """A structured outputs constraint: exactly one of json (schema), regex, choice,
    grammar (EBNF or Lark), json_object or structural_tag.

    The engine compiles it with xgrammar (perfxlm/engine/structured_output.py). As in
    vLLM's xgrammar backend, the per-request whitespace and additional-properties options
    are accepted and have no effect (`StructuredOutputsConfig.disable_any_whitespace` does).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        kinds = [self.json, self.regex, self.choice, self.grammar, self.json_object,
                 self.structural_tag]
        count = sum(k is not None for k in kinds)
        if count > 1:
            raise VLLMValidationError(
                "You can only use one kind of structured outputs constraint "
                f"but multiple are specified: {self.__dict__}")
        if count < 1:
            raise VLLMValidationError(
                "You must use one kind of structured outputs constraint "
                f"but none are specified: {self.__dict__}")


def _max_n() -> int:
    return int(os.environ.get("VLLM_MAX_N_SEQUENCES", "16384"))


@dataclass
class SamplingParams:
    """Sampling parameters for text generation, as in vLLM.

    `temperature=0` is greedy. `max_tokens=None` generates up to the model length.
    `logprobs=k` returns the chosen token plus the k most likely per step (-1: all).
    Stop strings are cut from `text` unless `include_stop_str_in_output`.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprob_token_ids: list[int] | None = None
    prompt_logprob_start: int | None = None
    logprob_token_ids: list[int] | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stream_interval: int | None = None
    skip_clone: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: int | None = None
    repetition_detection: Any = None
    routed_experts_prompt_start: int = 0
    trace_decode_token_ids: list[int] | None = None
    # Set in __post_init__ or by the engine, never by the caller.
    output_text_buffer_length: int = field(default=0, repr=False)
    _eos_token_id: int | None = field(default=None, init=False, repr=False)
    _all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    _bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False)

    @staticmethod
    def from_optional(**kwargs: Any) -> "SamplingParams":
        """Build from possibly-None values (None means the default); clamps logit_bias to ±100."""
        defaults = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                    "repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0}
        for name, default in defaults.items():
            if kwargs.get(name) is None:
                kwargs[name] = default
        bias = kwargs.get("logit_bias")
        if bias is not None:
            bad = [k for k in bias if not _is_int_like(k)]
            if bad:
                raise VLLMValidationError(
                    f"logit_bias contains key(s) that cannot be converted to integer token IDs: {bad!r}",
                    parameter="logit_bias", value=bad)
            for k, v in bias.items():  # ±inf clamp to ±100 below; NaN would clamp to -100 silently
                if not _is_real(v) or math.isnan(v):
                    _bad_bias(k, v)
            kwargs["logit_bias"] = {int(k): min(100.0, max(-100.0, v)) for k, v in bias.items()}
        return SamplingParams(**kwargs)

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MIN_TEMP:
            logger.warning("temperature %s is less than %s, which may cause numerical errors "
                           "nan or inf in tensors. We have maxed it out to %s.",
                           self.temperature, _MIN_TEMP, _MIN_TEMP)
            self.temperature = _MIN_TEMP
        if self.seed == -1:
            self.seed = None
        self._normalize_thinking_budget()
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self.bad_words = [] if self.bad_words is None else list(dict.fromkeys(self.bad_words))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.stop and not self.include_stop_str_in_output:
            # characters held back while streaming, since they may start a stop string
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")
        if self.extra_args is not None:
            _check_extra_args_ints(self.extra_args)
        self._all_stop_token_ids.update(self.stop_token_ids)
        if self.skip_reading_prefix_cache is None:
            # cached prefix tokens would have no logits, so prompt logprobs need a full prefill
            self.skip_reading_prefix_cache = (self.prompt_logprobs is not None
                                              or self.prompt_logprob_token_ids is not None)

    def _normalize_thinking_budget(self) -> None:
        value = self.thinking_token_budget
        if value is None:
            return
        if isinstance(value, (bool, float)) or not isinstance(value, int) or value < -1:
            raise VLLMValidationError(
                "`thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
                parameter="thinking_token_budget", value=value)
        self.thinking_token_budget = None if value == -1 else value

    def _verify_args(self) -> None:
        if not isinstance(self.n, int):
            raise VLLMValidationError(f"n must be an int, but is of type {type(self.n)}")
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if self.n > _max_n():
            raise VLLMValidationError(
                f"n must be at most {_max_n()}, got {self.n}. To increase this limit, "
                "set the VLLM_MAX_N_SEQUENCES environment variable.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise VLLMValidationError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise VLLMValidationError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty):
            raise VLLMValidationError(
                f"repetition_penalty must be a finite number, got {self.repetition_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise VLLMValidationError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(f"temperature must be a finite number, got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if self.temperature < 0.0:
            raise VLLMValidationError(f"temperature must be non-negative, got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if self.temperature > 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(f"top_p must be in (0, 1], got {self.top_p}.",
                                      parameter="top_p", value=self.top_p)
        if self.top_k < -1:  # -1 is accepted as "disabled", 0 preferred
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not isinstance(self.top_k, int):
            raise VLLMValidationError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                      parameter="max_tokens", value=self.max_tokens)
        if self.min_tokens < 0:
            raise VLLMValidationError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise VLLMValidationError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}.")
        if self.stream_interval is not None and self.stream_interval < 1:
            raise VLLMValidationError(f"stream_interval must be at least 1, got {self.stream_interval}.",
                                      parameter="stream_interval", value=self.stream_interval)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value != -1 and value < 0:
                raise VLLMValidationError(f"{name} must be non-negative or -1, got {value}.",
                                          parameter=name, value=value)
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise VLLMValidationError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if any(not s for s in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise VLLMValidationError("stop strings are only supported when detokenize is True. "
                                      "Set detokenize=True to use stop.")
        if any(not w for w in self.bad_words):
            raise VLLMValidationError(
                f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}")
        # perfxlm's own: a NaN or infinite bias would reach the sampler's logits
        for token_id, bias in (self.logit_bias or {}).items():
            if not _is_real(bias) or not math.isfinite(bias):
                _bad_bias(token_id, bias)

    def update_from_generation_config(self, generation_config: dict[str, Any],
                                      eos_token_id: int | None = None) -> None:
        """Add the model's EOS ids (tokenizer's and generation_config's) to the stop set."""
        if not self.ignore_eos:
            self._eos_token_id = eos_token_id
        if eos_token_id is not None:
            self._all_stop_token_ids.add(eos_token_id)  # so min_tokens also masks it
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        eos_ids.discard(eos_token_id)
        if eos_ids:
            self._all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                self.stop_token_ids = list(eos_ids.union(self.stop_token_ids))

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """Tokenize `bad_words`, with and without a leading space, as vLLM does."""
        if not self.bad_words:
            return
        self._bad_words_token_ids = []
        for word in self.bad_words:
            for prefix in ("", " "):
                ids = tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False)
                if not ids:
                    if not prefix:
                        raise VLLMValidationError("bad_words entries must tokenize to at least one token.",
                                                  parameter="bad_words", value=self.bad_words)
                    continue
                last = self._bad_words_token_ids[-1] if prefix else None
                if not prefix or (ids[0] != last[0] and len(ids) == len(last)):
                    self._bad_words_token_ids.append(ids)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        return self._bad_words_token_ids

    def clone(self) -> "SamplingParams":
        """A deep copy (logits processors, if any, are shared)."""
        return self if self.skip_clone else copy.deepcopy(self)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bad_bias(token_id: Any, bias: Any) -> None:
    raise VLLMValidationError(f"logit_bias values must be finite numbers, got {bias!r} for token id {token_id!r}.",
                              parameter="logit_bias", value=bias)


def _check_extra_args_ints(value: Any) -> None:
    """vLLM's rule: every integer in extra_args, however nested in dicts, lists and tuples,
    must fit int64 or uint64 (bools are fine; other objects are left alone)."""
    low, high = _EXTRA_ARGS_INT_RANGE
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            if not low <= item <= high:
                raise VLLMValidationError(f"extra_args integers must be between {low} and {high}, got {item}.",
                                          parameter="extra_args", value=item)
        elif isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)


def _is_int_like(key: Any) -> bool:
    try:
        int(key)
        return True
    except (TypeError, ValueError):
        return False


@dataclass
class BeamSearchParams:
    """Beam search parameters for text generation (vLLM's fields and defaults).

    `include_stop_str_in_output` is accepted as in vLLM, whose offline beam search does not
    read it either; `watermarking` is accepted and has no effect (no watermark is configured).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: Any = None
    skip_special_tokens: bool = True
    watermarking: bool | None = None

    def __post_init__(self) -> None:
        # vLLM checks beam_width only, with the messages it uses for n
        if not isinstance(self.beam_width, int):
            raise VLLMValidationError(f"beam_width must be an int, but is of type {type(self.beam_width)}")
        if self.beam_width < 1:
            raise VLLMValidationError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.beam_width > _max_n():
            raise VLLMValidationError(
                f"beam_width must be at most {_max_n()}, got {self.beam_width}. To increase this limit, "
                "set the VLLM_MAX_N_SEQUENCES environment variable.")
