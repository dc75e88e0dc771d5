"""The Gemma 2 and Gemma 3 (text) families in plain PyTorch.

Both are Llama-like decoders with Gemma's quirks, here as in transformers' modeling_gemma2.py
and modeling_gemma3.py: token embeddings scaled by sqrt(hidden_size) (the factor rounded to
the activation dtype); RMSNorm by (1 + weight), the 1 folded into the weight as it is
loaded; a GeGLU MLP (tanh GELU); sandwich norms (after attention and after the MLP as well as
before); queries scaled by query_pre_attn_scalar ** -0.5; layers that alternate between a
sliding window and global attention (Gemma 2: every other layer, Gemma 3: five local to one
global); Gemma 2's soft-capped attention logits; soft-capped final logits (Gemma 2, and
Gemma 3 where its config sets it). Gemma 3 adds a per-head RMSNorm on q and k and a RoPE
base of its own for the local layers (rope_local_base_freq), global layers taking rope_theta
and any rope scaling.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import ROPE_TYPES, CausalLM, Embedding, Linear, RotaryTables, rope_type

logger = logging.getLogger(__name__)

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_python_tanh")  # HF's names of gelu(approximate="tanh")
# set by config_from_gguf: llama.cpp's converter stores Gemma norm weights with the 1 already added
NORM_FOLDED_KEY = "perfxlm_norm_weights_include_one"


@dataclass
class GemmaParams:
    vocab_size: int
    dim: int                                  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    query_pre_attn_scalar: float              # queries are scaled by its inverse square root
    sliding_layers: list[bool] = field(default_factory=list)  # per layer: attends over the window only
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qk_norm: bool = False                     # Gemma 3: per-head RMSNorm on q and k
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0               # global layers (all layers of Gemma 2)
    rope_scaling: dict[str, Any] | None = None  # global layers only
    rope_local_theta: float | None = None     # Gemma 3's local (sliding) layers
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    norm_offset: float = 1.0                  # added to checkpoint norm weights as they load (0: already in)


class Gemma2ForCausalLM(CausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (text): the config says which quirks are on."""

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
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.post_attention_norm."),
        (r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"layers.\1.ffn_norm."),
        (r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"layers.\1.post_ffn_norm."),
    ]
    gguf_weight_names = {
        "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
        "attn_q": "layers.{}.attention.wq", "attn_k": "layers.{}.attention.wk", "attn_v": "layers.{}.attention.wv",
        "attn_output": "layers.{}.attention.wo",
        "attn_q_norm": "layers.{}.attention.q_norm", "attn_k_norm": "layers.{}.attention.k_norm",
        "ffn_gate": "layers.{}.feed_forward.w1", "ffn_up": "layers.{}.feed_forward.w3",
        "ffn_down": "layers.{}.feed_forward.w2",
        "attn_norm": "layers.{}.attention_norm", "post_attention_norm": "layers.{}.post_attention_norm",
        "ffn_norm": "layers.{}.ffn_norm", "post_ffw_norm": "layers.{}.post_ffn_norm",
    }
    gguf_architectures = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}

    def __init__(self, params: GemmaParams) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.tok_embeddings = Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(GemmaBlock(params, i) for i in range(params.n_layers))
        self.norm = GemmaRMSNorm(params.dim, params.norm_eps, params.norm_offset)
        self.output = Linear(params.dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryTables(params.head_dim, params.rope_theta, params.max_position_embeddings,
                                   params.rope_scaling)
        # Gemma 3's local layers rotate by a base of their own, unscaled
        self.rotary_local = (RotaryTables(params.head_dim, params.rope_local_theta, params.max_position_embeddings, None)
                             if params.rope_local_theta is not None else None)

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> GemmaParams:
        arch = (cfg.get("architectures") or ["Gemma2ForCausalLM"])[0]
        gemma3 = arch == "Gemma3ForCausalLM" or cfg.get("model_type") in ("gemma3_text", "gemma3")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in GELU_TANH:
            raise ValueError(f"hidden_activation {act!r} is not supported for {arch}; supported: {list(GELU_TANH)}")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError(f"use_bidirectional_attention is not supported for {arch} (a causal LM only)")
        n_layers, n_heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        global_rope, local_theta = _rope_settings(cfg, gemma3)
        if rope_type(global_rope) not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type(global_rope)!r} is not supported for {arch}; "
                             f"supported: {list(ROPE_TYPES)}")
        window = cfg.get("sliding_window")
        layer_types = cfg.get("layer_types")
        if layer_types is None:  # configs written before transformers listed the layer types
            pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or (6 if gemma3 else 2)
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if unknown or len(layer_types) != n_layers:
            raise ValueError(f"layer_types {layer_types} are not {n_layers} of 'sliding_attention' / 'full_attention'")
        return GemmaParams(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=cfg["intermediate_size"],
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
            sliding_layers=[bool(window) and t == "sliding_attention" for t in layer_types],
            sliding_window=window or None,
            # transformers' Gemma 3 attention takes no soft-capping (its configs leave it null)
            attn_logit_softcapping=None if gemma3 else cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            qk_norm=gemma3,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(global_rope.get("rope_theta", 10000.0)),
            rope_scaling=None if rope_type(global_rope) == "default" else global_rope,
            rope_local_theta=local_theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            attention_bias=cfg.get("attention_bias", False),
            norm_offset=0.0 if cfg.get(NORM_FOLDED_KEY) else 1.0,
        )

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        """llama.cpp's gemma2 / gemma3 metadata as an HF config. What llama.cpp does not store
        it hard-codes, and so does this: the sliding pattern (2 for gemma2, 6 for gemma3), the
        local RoPE base 10000 for gemma3, and query_pre_attn_scalar = head_dim except for the
        27B models (46 / 62 layers), which scale by hidden_size / heads."""
        cfg = super().config_from_gguf(gguf, architecture)
        gemma3 = gguf.arch == "gemma3"
        n_layers = cfg["num_hidden_layers"]
        big = n_layers == (62 if gemma3 else 46)
        cfg.update({
            "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"],
            "sliding_window": gguf.get("attention.sliding_window"),
            "attn_logit_softcapping": gguf.get("attn_logit_softcapping"),
            "final_logit_softcapping": gguf.get("final_logit_softcapping"),
            "rms_norm_eps": float(gguf.get("attention.layer_norm_rms_epsilon", 1e-6)),
            NORM_FOLDED_KEY: True,
        })
        pattern = gguf.get("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # newer converters may store it per layer (true: sliding)
            cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            cfg["sliding_window_pattern"] = pattern or (6 if gemma3 else 2)
        if gemma3:
            cfg["rope_local_base_freq"] = float(gguf.get("rope.freq_base_swa", 10000.0))
        return cfg

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        p = self.params
        return [((p.n_kv_heads, p.head_dim), (p.n_kv_heads, p.head_dim))] * p.n_layers

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        """One step -> logits (N, vocab) for the rows step.logits_indices."""
        x = self.tok_embeddings(step.input_ids)                  # (T, dim)
        x = F.scale(x, self.params.dim ** 0.5)                   # HF rounds the factor to x's dtype; so does Scale
        for layer, cache in zip(self.layers, kv_caches):
            rotary = self.rotary_local if layer.sliding and self.rotary_local is not None else self.rotary
            x = layer(x, step, cache, rotary)
        x = F.gather_rows(x, step.logits_indices)                # (N, dim)
        logits = self.output(self.norm(x))                       # (N, vocab)
        cap = self.params.final_logit_softcapping
        return F.softcap(logits, cap) if cap else logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: the same module, with q/k norms and local RoPE switched on by its config."""


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + w): the graph's RMSNorm, its weight holding 1 + w.

    HF checkpoints store w; once the loader has filled it, after_load adds `offset` (1, or 0
    for a GGUF whose converter added it already), in the run dtype. In float32 the product is then bit-identical to HF's
    `normed * (1.0 + w.float())`. With group_size, each head of a (T, H*hd) row is normalised
    on its own with a (hd,) weight (Gemma 3's q/k norm).
    """

    def __init__(self, dim: int, eps: float, offset: float, group_size: int | None = None) -> None:
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))
        self.offset = offset

    def after_load(self) -> None:
        if self.offset:
            w = self.weight
            self.weight = nn.Parameter((w.detach().float() + self.offset).to(w.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight, self.eps, group_size=self.group_size)


class GemmaBlock(nn.Module):
    """Sandwich norms: each sublayer's output is normalised again before the residual add."""

    def __init__(self, params: GemmaParams, index: int) -> None:
        super().__init__()
        self.sliding = bool(params.sliding_layers[index])
        self.attention = GemmaAttention(params, params.sliding_window if self.sliding else None)
        self.feed_forward = GemmaMLP(params)
        dim, eps, off = params.dim, params.norm_eps, params.norm_offset
        self.attention_norm = GemmaRMSNorm(dim, eps, off)
        self.post_attention_norm = GemmaRMSNorm(dim, eps, off)
        self.ffn_norm = GemmaRMSNorm(dim, eps, off)
        self.post_ffn_norm = GemmaRMSNorm(dim, eps, off)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        h = F.add(x, self.post_attention_norm(self.attention(self.attention_norm(x), step, cache, rotary)))
        return F.add(h, self.post_ffn_norm(self.feed_forward(self.ffn_norm(h))))


class GemmaAttention(nn.Module):
    """Grouped-query attention over the paged KV cache, with Gemma's query scale, optional
    sliding window and logit soft-capping, and (Gemma 3) per-head q/k RMSNorm before RoPE."""

    def __init__(self, params: GemmaParams, sliding_window: int | None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = params.n_heads, params.n_kv_heads, params.head_dim
        self.sliding_window = sliding_window or 0
        self.scale = params.query_pre_attn_scalar ** -0.5
        self.softcap = params.attn_logit_softcapping or 0.0
        q_out, kv_out = params.n_heads * params.head_dim, params.n_kv_heads * params.head_dim
        self.wq = Linear(params.dim, q_out, bias=params.attention_bias)
        self.wk = Linear(params.dim, kv_out, bias=params.attention_bias)
        self.wv = Linear(params.dim, kv_out, bias=params.attention_bias)
        self.wo = Linear(q_out, params.dim, bias=params.attention_bias)
        if params.qk_norm:
            self.q_norm = GemmaRMSNorm(params.head_dim, params.norm_eps, params.norm_offset, params.head_dim)
            self.k_norm = GemmaRMSNorm(params.head_dim, params.norm_eps, params.norm_offset, params.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)             # (T, nh*hd), (T, nkv*hd) x 2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)                # each head on its own
        q = rotary(q, step.positions, self.head_dim)
        k = rotary(k, step.positions, self.head_dim)
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
                              head_dim=self.head_dim, scale=self.scale, sliding_window=self.sliding_window,
                              softcap=self.softcap)              # (T, nh*hd)
        return self.wo(y)                                        # (T, dim)


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, params: GemmaParams) -> None:
        super().__init__()
        self.w1 = Linear(params.dim, params.intermediate_size)  # gate
        self.w3 = Linear(params.dim, params.intermediate_size)  # up
        self.w2 = Linear(params.intermediate_size, params.dim)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu_mul(self.w1(x), self.w3(x)))


def _rope_settings(cfg: dict[str, Any], gemma3: bool) -> tuple[dict[str, Any], float | None]:
    """(the global layers' rope parameters with their rope_theta, the local layers' base or None)
    from either layout: transformers' rope_parameters (per layer type for Gemma 3) or the older
    rope_theta / rope_local_base_freq / rope_scaling keys."""
    params = cfg.get("rope_parameters") or {}
    if gemma3 and ("full_attention" in params or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local = (params.get("sliding_attention") or {})
        if rope_type(local) != "default":
            raise ValueError(f"rope type {rope_type(local)!r} on Gemma 3's sliding layers is not supported")
        return full, float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
    full = dict(cfg.get("rope_scaling") or params)
    full["rope_theta"] = full.get("rope_theta") or cfg.get("rope_theta") or (1_000_000.0 if gemma3 else 10000.0)
    return full, (float(cfg.get("rope_local_base_freq", 10000.0)) if gemma3 else None)
