"""Phi-3 and Phi-4-mini (Phi3ForCausalLM) in plain PyTorch.

Llama's block with two fused checkpoint tensors, qkv_proj and gate_up_proj, loaded whole and
run as one Linear per part (layers.FusedLinear), LongRoPE ("longrope", legacy "su") scaling,
and partial rotary embeddings (Phi-4-mini rotates 3/4 of each head), composed from the RoPE
op by reordering each head's q/k rows at load (layers.RotaryTables).
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import (CausalLM, Embedding, FusedLinear, Linear, RMSNorm, RotaryTables,
                                   partial_rotary_order, rope_scaling_from_hf)
from perfxlm.models.llama import ModelParams

ARCH = "Phi3ForCausalLM"


@dataclass
class Phi3Params(ModelParams):
    rotary_dim: int = 0           # features of each head that RoPE rotates (0: the whole head)


class Phi3ForCausalLM(CausalLM):
    hf_weight_names = [
        (r"^model\.embed_tokens\.", "tok_embeddings."),
        (r"^model\.norm\.", "norm."),
        (r"^lm_head\.", "output."),
        (r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.", r"layers.\1.attention.wqkv."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
        (r"^model\.layers\.(\d+)\.mlp\.gate_up_proj\.", r"layers.\1.feed_forward.w13."),
        (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    ]
    # llama.cpp keeps HF's fused tensors: attn_qkv, and ffn_up holding gate then up
    gguf_weight_names = {
        "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
        "attn_qkv": "layers.{}.attention.wqkv", "attn_output": "layers.{}.attention.wo",
        "ffn_up": "layers.{}.feed_forward.w13", "ffn_down": "layers.{}.feed_forward.w2",
        "attn_norm": "layers.{}.attention_norm", "ffn_norm": "layers.{}.ffn_norm",
    }
    gguf_architectures = {"phi3": ARCH}

    def __init__(self, params: Phi3Params) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.tok_embeddings = Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(Phi3Block(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = Linear(params.dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryTables(params.head_dim, params.rope_theta, params.max_position_embeddings,
                                   params.rope_scaling, rotary_dim=params.rotary_dim)

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> Phi3Params:
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported for {ARCH}; supported: ['silu']")
        raw = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        scaling = rope_scaling_from_hf(cfg, ARCH)
        if scaling is not None and scaling["rope_type"] == "su":  # Phi-3's name for LongRoPE before "longrope"
            scaling["rope_type"] = "longrope"
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        partial = cfg.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0
        return Phi3Params(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(cfg.get("rope_theta") or raw.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=cfg.get("sliding_window") or None,
            rotary_dim=int(head_dim * partial),
        )

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        """llama.cpp's phi3 keys: the rotated dimensions, the pretraining context, and LongRoPE's
        factor tables stored as the tensors rope_factors_short / rope_factors_long."""
        cfg = super().config_from_gguf(gguf, architecture)
        head_dim = cfg["head_dim"]
        cfg["partial_rotary_factor"] = gguf.get("rope.dimension_count", head_dim) / head_dim
        cfg["sliding_window"] = gguf.get("attention.sliding_window") or None
        factors = {t.name: [float(f) for f in t.data] for t in gguf.reader.tensors
                   if t.name in ("rope_factors_short.weight", "rope_factors_long.weight")}
        original = gguf.get("rope.scaling.original_context_length")
        if factors:
            cfg["original_max_position_embeddings"] = original or cfg["max_position_embeddings"]
            cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"],
                                   "long_factor": factors["rope_factors_long.weight"]}
            attn_factor = gguf.get("rope.scaling.attn_factor")
            if attn_factor is not None:
                cfg["rope_scaling"]["attention_factor"] = float(attn_factor)
        return cfg

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


class Phi3Block(nn.Module):
    def __init__(self, params: Phi3Params) -> None:
        super().__init__()
        self.attention = Phi3Attention(params)
        self.feed_forward = Phi3MLP(params)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        h = F.add(x, self.attention(self.attention_norm(x), step, cache, rotary))
        return F.add(h, self.feed_forward(self.ffn_norm(h)))


class Phi3Attention(nn.Module):
    """Grouped-query attention from one fused q|k|v projection; with partial rotary, the q and
    k parts' rows are reordered so that the RoPE op rotates exactly HF's rotated features."""

    def __init__(self, params: Phi3Params) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim
        self.sliding_window = params.sliding_window or 0
        rot = params.rotary_dim or params.head_dim
        q_rows, kv_rows = params.n_heads * params.head_dim, params.n_kv_heads * params.head_dim
        self.wqkv = FusedLinear(params.dim, [q_rows, kv_rows, kv_rows],
                                [partial_rotary_order(params.n_heads, params.head_dim, rot),
                                 partial_rotary_order(params.n_kv_heads, params.head_dim, rot), None])
        self.wo = Linear(q_rows, params.dim)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        q, k, v = self.wqkv(x)                                   # (T, nh*hd), (T, nkv*hd) x 2
        q = rotary(q, step.positions, self.head_dim)
        k = rotary(k, step.positions, self.head_dim)
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
                              head_dim=self.head_dim, scale=self.head_dim ** -0.5, sliding_window=self.sliding_window)
        return self.wo(y)                                        # (T, dim)


class Phi3MLP(nn.Module):
    def __init__(self, params: Phi3Params) -> None:
        super().__init__()
        self.w13 = FusedLinear(params.dim, [params.intermediate_size, params.intermediate_size])  # gate | up
        self.w2 = Linear(params.intermediate_size, params.dim)   # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x)                                   # (T, ff) x 2
        return self.w2(F.silu_mul(gate, up))
