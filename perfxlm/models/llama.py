"""The Llama family in plain PyTorch (Llama, Mistral, Qwen2), gpt-fast style.

Tokens of all sequences in a step are flattened into one (T,) batch; attention
reads and writes a paged KV cache described by `AttentionMetadata`.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from perfxlm.models.paged_attention import AttentionMetadata, paged_attention, write_kv


@dataclass
class ModelParams:
    vocab_size: int
    dim: int                      # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False        # Qwen2 has biases on q, k and v
    sliding_window: int | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelParams":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        n_heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            window = None
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta") or (rope_scaling or {}).get("rope_theta") or 10000.0
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            sliding_window=window,
        )


class Transformer(nn.Module):
    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_cache(params)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_pos, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (T,); kv_cache (n_layers, 2, blocks, block_size, nkv, hd) -> hidden (T, dim)."""
        x = self.tok_embeddings(input_ids)                       # (T, dim)
        cos = self.rope_cos[positions].to(x.dtype)               # (T, hd)
        sin = self.rope_sin[positions].to(x.dtype)
        for layer, cache in zip(self.layers, kv_cache):
            x = layer(x, cos, sin, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, dim) -> logits (N, vocab) in float32."""
        return self.output(hidden).float()


class TransformerBlock(nn.Module):
    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.attention = CacheAttention(params)
        self.feed_forward = FeedForward(params)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class CacheAttention(nn.Module):
    """Multi-head attention with grouped KV heads over the paged KV cache."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim
        self.sliding_window = params.sliding_window
        self.wq = nn.Linear(params.dim, params.n_heads * params.head_dim, bias=params.qkv_bias)
        self.wk = nn.Linear(params.dim, params.n_kv_heads * params.head_dim, bias=params.qkv_bias)
        self.wv = nn.Linear(params.dim, params.n_kv_heads * params.head_dim, bias=params.qkv_bias)
        self.wo = nn.Linear(params.n_heads * params.head_dim, params.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.n_heads, self.head_dim)     # (T, nh, hd)
        k = self.wk(x).view(T, self.n_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = cache                                 # (blocks, block_size, nkv, hd)
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        y = paged_attention(q, k_cache, v_cache, meta, self.head_dim ** -0.5, self.sliding_window)
        return self.wo(y.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.w1 = nn.Linear(params.dim, params.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(params.dim, params.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(params.intermediate_size, params.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the model dtype, then scale in the model dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, hd) by position; cos, sin (T, hd). Halves layout (HF's rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def rope_cache(params: ModelParams) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (max_pos, head_dim) in float32."""
    hd = params.head_dim
    inv_freq = 1.0 / (params.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = params.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    elif scaling.get("rope_type", scaling.get("type")) == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling:
        raise NotImplementedError(f"perfxlm: rope_scaling {scaling} is not supported")
    t = torch.arange(params.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)                        # (max_pos, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                 # (max_pos, hd)
    return emb.cos(), emb.sin()


def _llama3_scaled(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE stretch for long context."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
