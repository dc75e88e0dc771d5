"""Qwen3 (Qwen3ForCausalLM) in plain PyTorch: Llama's block with an RMSNorm over each head of
q and k before RoPE (`q_norm`, `k_norm`, weight (head_dim,)), no q/k/v bias, a head_dim of its
own (Qwen3's 128 is not hidden / heads for most sizes) and optionally tied embeddings.
"""

from typing import Any

import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import CausalLM, Embedding, Linear, RMSNorm, RotaryTables, rope_scaling_from_hf
from perfxlm.models.llama import LlamaMLP, ModelParams

ARCH = "Qwen3ForCausalLM"


class Qwen3ForCausalLM(CausalLM):
    hf_weight_names = [
        (r"^model\.embed_tokens\.", "tok_embeddings."),
        (r"^model\.norm\.", "norm."),
        (r"^lm_head\.", "output."),
        (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
        (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
        (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
        (r"^model\.layers\.(\d+)\.self_attn\.q_norm\.", r"layers.\1.attention.q_norm."),
        (r"^model\.layers\.(\d+)\.self_attn\.k_norm\.", r"layers.\1.attention.k_norm."),
        (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
        (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
        (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    ]
    # llama.cpp's qwen3 tensors; its converter leaves q/k rows as HF has them (NeoX-style RoPE)
    gguf_weight_names = {
        "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
        "attn_q": "layers.{}.attention.wq", "attn_k": "layers.{}.attention.wk", "attn_v": "layers.{}.attention.wv",
        "attn_output": "layers.{}.attention.wo",
        "attn_q_norm": "layers.{}.attention.q_norm", "attn_k_norm": "layers.{}.attention.k_norm",
        "ffn_gate": "layers.{}.feed_forward.w1", "ffn_up": "layers.{}.feed_forward.w3",
        "ffn_down": "layers.{}.feed_forward.w2",
        "attn_norm": "layers.{}.attention_norm", "ffn_norm": "layers.{}.ffn_norm",
    }
    gguf_architectures = {"qwen3": ARCH}

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.tok_embeddings = Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(Qwen3Block(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = Linear(params.dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryTables(params.head_dim, params.rope_theta, params.max_position_embeddings,
                                   params.rope_scaling)

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> ModelParams:
        if cfg.get("use_sliding_window"):
            # transformers then windows only the layers from max_window_layers on; no Qwen3 release sets it
            raise ValueError(f"use_sliding_window=True is not supported for {ARCH}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported for {ARCH}; supported: ['silu']")
        return qwen_params(cfg, ARCH, qkv_bias=cfg.get("attention_bias", False))

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


def qwen_params(cfg: dict[str, Any], arch: str, qkv_bias: bool) -> ModelParams:
    """The attention's parameters from a Qwen-style config (Qwen3, and the Qwen MoE families):
    an explicit head_dim, RoPE base and scaling in `rope_scaling` or transformers 5's
    `rope_parameters`; an unknown rope type raises ValueError naming `arch`."""
    raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    n_heads = cfg["num_attention_heads"]
    return ModelParams(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        intermediate_size=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta") or raw.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling_from_hf(cfg, arch),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=qkv_bias,
    )


class Qwen3Block(nn.Module):
    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.attention = Qwen3Attention(params)
        self.feed_forward = LlamaMLP(params)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        h = F.add(x, self.attention(self.attention_norm(x), step, cache, rotary))
        return F.add(h, self.feed_forward(self.ffn_norm(h)))


class HeadRMSNorm(RMSNorm):
    """RMSNorm over each head_dim group of a (T, H*hd) row, one (hd,) weight for all heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight, self.eps, group_size=self.weight.shape[0])


class Qwen3Attention(nn.Module):
    """Grouped-query attention with q and k normalised per head before RoPE."""

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim
        self.wq = Linear(params.dim, params.n_heads * params.head_dim, bias=params.qkv_bias)
        self.wk = Linear(params.dim, params.n_kv_heads * params.head_dim, bias=params.qkv_bias)
        self.wv = Linear(params.dim, params.n_kv_heads * params.head_dim, bias=params.qkv_bias)
        self.wo = Linear(params.n_heads * params.head_dim, params.dim)
        self.q_norm = HeadRMSNorm(params.head_dim, params.norm_eps)
        self.k_norm = HeadRMSNorm(params.head_dim, params.norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)             # (T, nh*hd), (T, nkv*hd) x 2
        q = rotary(self.q_norm(q), step.positions, self.head_dim)
        k = rotary(self.k_norm(k), step.positions, self.head_dim)
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
                              head_dim=self.head_dim, scale=self.head_dim ** -0.5)
        return self.wo(y)                                        # (T, dim)
