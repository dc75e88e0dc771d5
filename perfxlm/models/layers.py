"""Building blocks shared by the model families: modules that hold weights and call the
functional op layer (graph_export.functional), the RoPE tables, and the model interface.

Every family is one file of plain PyTorch made of these; see docs/adding_a_model.md.
"""

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs


class CausalLM(nn.Module):
    """What the loader, the exporter and the eager executor need of a model family.

    forward(step, kv_caches) computes one engine step's logits (N, V) through
    graph_export.functional only; the exporter traces that same forward into the graph.
    """

    # HF checkpoint tensor name -> parameter name: (regex, replacement), first match wins
    hf_weight_names: ClassVar[list[tuple[str, str]]] = []
    # GGUF tensor base name -> parameter name; '{}' is the layer of 'blk.{layer}.<base>'
    gguf_weight_names: ClassVar[dict[str, str]] = {}
    # llama.cpp's general.architecture -> the HF architecture it loads as
    gguf_architectures: ClassVar[dict[str, str]] = {}
    vocab_size: int  # logits per row; set by the family's __init__

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        """The HF config dict equivalent to a GGUF's metadata (`gguf.get(key)` reads llama.cpp's
        `{arch}.{key}`; also gguf.meta, gguf.tensor_names, gguf.vocab_size). The default reads
        the keys llama.cpp writes for every llama-like architecture; a missing one raises."""
        names = gguf.tensor_names
        n_heads, dim = gguf.get("attention.head_count"), gguf.get("embedding_length")
        cfg = {
            "architectures": [architecture],
            "model_type": gguf.arch,
            "vocab_size": gguf.vocab_size,
            "hidden_size": dim,
            "num_hidden_layers": gguf.get("block_count"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": gguf.get("attention.head_count_kv", n_heads),
            "head_dim": gguf.get("attention.key_length", dim // n_heads),
            "intermediate_size": gguf.get("feed_forward_length"),
            "rms_norm_eps": float(gguf.get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(gguf.get("rope.freq_base", 10000.0)),
            "max_position_embeddings": gguf.get("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": gguf.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": gguf.meta.get("tokenizer.ggml.eos_token_id"),
            "attention_bias": "blk.0.attn_q.bias" in names,
        }
        if gguf.get("rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": gguf.get("rope.scaling.factor")}
        return cfg

    @classmethod
    def params_from_hf(cls, config: dict[str, Any]) -> Any:
        """The family's parameters from an HF config dict; a missing required key raises KeyError."""
        raise NotImplementedError

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per layer, the shapes of one cache slot of its K and V caches (after blocks, block_size)."""
        raise NotImplementedError

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def gguf_tensor(cls, name: str, rows: np.ndarray, params: Any, gguf_arch: str) -> np.ndarray:
        """A GGUF tensor (float rows, or whole-block byte rows) as the parameter `name` wants its
        rows ordered: undo a convert-time layout change here. Default: as stored."""
        return rows


class Linear(nn.Module):
    """y = x @ weight^T (+ bias): weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.weight, ids)


class RotaryTables(nn.Module):
    """cos, sin (max_pos, head_dim) for F.rope, halves layout. Built on the CPU in float32
    even when the model is created on the meta device (they are computed, not loaded); the
    loader casts them to the model's dtype with the rest."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
        inv_freq = scaled_inv_freq(inv_freq, scaling)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)                        # (max_pos, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)                 # (max_pos, hd)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
        return F.rope(x, positions, self.cos, self.sin, head_dim)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(scaling: dict[str, Any] | None) -> str:
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1's frequency-dependent stretch for long context
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {list(ROPE_TYPES)}")
