"""The Llama family in plain PyTorch (Llama, Mistral, Qwen2), gpt-fast style.

Tokens of all sequences in a step are flattened into one (T,) batch; attention reads
and writes each layer's paged KV cache as the step's inputs describe (StepInputs).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import ROPE_TYPES, CausalLM, Embedding, Linear, RMSNorm, RotaryTables, rope_type


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


class LlamaForCausalLM(CausalLM):
    hf_weight_names = [
        (r"^model\.embed_tokens\.", "tok_embeddings."),
        (r"^model\.norm\.", "norm."),
        (r"^lm_head\.", "output."),
        (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
        (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
        (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
        (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
        (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
        (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    ]
    gguf_weight_names = {
        "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
        "attn_q": "layers.{}.attention.wq", "attn_k": "layers.{}.attention.wk", "attn_v": "layers.{}.attention.wv",
        "attn_output": "layers.{}.attention.wo", "ffn_gate": "layers.{}.feed_forward.w1",
        "ffn_up": "layers.{}.feed_forward.w3", "ffn_down": "layers.{}.feed_forward.w2",
        "attn_norm": "layers.{}.attention_norm", "ffn_norm": "layers.{}.ffn_norm",
    }
    gguf_architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.tok_embeddings = Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(LlamaBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = Linear(params.dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryTables(params.head_dim, params.rope_theta, params.max_position_embeddings,
                                   params.rope_scaling)

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> ModelParams:
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        n_heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            window = None
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta") or (rope_scaling or {}).get("rope_theta") or 10000.0
        if rope_type(rope_scaling) not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type(rope_scaling)!r} is not supported for {arch}; "
                             f"supported: {list(ROPE_TYPES)}")
        return ModelParams(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type(rope_scaling) == "default" else rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            sliding_window=window,
        )

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        """The default keys; llama.cpp converts Mixtral as `llama` with experts, so such a file
        is handed to the Mixtral family (its feed_forward_length is an expert's hidden size)."""
        cfg = super().config_from_gguf(gguf, architecture)
        if gguf.get("expert_count", 0):
            cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                       num_local_experts=gguf.get("expert_count"), num_experts_per_tok=gguf.get("expert_used_count"))
        return cfg

    @classmethod
    def gguf_tensor(cls, name: str, rows: np.ndarray, params: ModelParams, gguf_arch: str) -> np.ndarray:
        """llama.cpp's converter permutes a `llama` GGUF's Q/K rows for ggml's interleaved RoPE;
        this model rotates halves, so undo it (a row is whole blocks: quantised rows move as bytes)."""
        if gguf_arch != "llama" or not name.endswith((".wq.weight", ".wq.bias", ".wk.weight", ".wk.bias")):
            return rows
        heads = params.n_heads if ".wq." in name else params.n_kv_heads
        half = rows.shape[0] // heads // 2
        return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        p = self.params
        return [((p.n_kv_heads, p.head_dim), (p.n_kv_heads, p.head_dim))] * p.n_layers

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        """One step -> logits (N, vocab) for the rows step.logits_indices."""
        x = self.tok_embeddings(step.input_ids)                  # (T, dim)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, step, cache, self.rotary)
        x = F.gather_rows(x, step.logits_indices)                # (N, dim)
        return self.output(self.norm(x))                         # (N, vocab)


class LlamaBlock(nn.Module):
    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.attention = LlamaAttention(params)
        self.feed_forward = LlamaMLP(params)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        h = F.add(x, self.attention(self.attention_norm(x), step, cache, rotary))
        return F.add(h, self.feed_forward(self.ffn_norm(h)))


class LlamaAttention(nn.Module):
    """Multi-head attention with grouped KV heads over the paged KV cache."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim
        self.sliding_window = params.sliding_window or 0
        self.wq = Linear(params.dim, params.n_heads * params.head_dim, bias=params.qkv_bias)
        self.wk = Linear(params.dim, params.n_kv_heads * params.head_dim, bias=params.qkv_bias)
        self.wv = Linear(params.dim, params.n_kv_heads * params.head_dim, bias=params.qkv_bias)
        self.wo = Linear(params.n_heads * params.head_dim, params.dim)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)             # (T, nh*hd), (T, nkv*hd) x 2
        q = rotary(q, step.positions, self.head_dim)
        k = rotary(k, step.positions, self.head_dim)
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
                              head_dim=self.head_dim, scale=self.head_dim ** -0.5, sliding_window=self.sliding_window)
        return self.wo(y)                                        # (T, dim)


class LlamaMLP(nn.Module):
    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.w1 = Linear(params.dim, params.intermediate_size)  # gate
        self.w3 = Linear(params.dim, params.intermediate_size)  # up
        self.w2 = Linear(params.intermediate_size, params.dim)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu_mul(self.w1(x), self.w3(x)))
