"""Meta's OPT (OPTForCausalLM: facebook/opt-125m ... opt-66b, and opt-350m's variant) in plain PyTorch.

What differs from Llama: LayerNorm (with bias) instead of RMSNorm, a non-gated ReLU MLP
(fc1, fc2), biases on every projection, no RoPE but a learned position table read with
an offset of 2 (HF's OPTLearnedPositionalEmbedding), the lm_head tied to the token
embedding, and, in opt-350m, LayerNorm after the residual add (post-norm) and a word
embedding narrower than the hidden size (project_in / project_out).

The offset is applied once at load: the first two rows of the position table (which no
position ever reads) are dropped, so the graph reads row `position` and needs no add-a-constant
op. llama.cpp has no OPT architecture, so there is no GGUF loading.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import CausalLM, Embedding, Linear

POSITION_OFFSET = 2  # HF's OPTLearnedPositionalEmbedding reads row position + 2

# HF `activation_function` -> the Activation op's kind (transformers' ACT2FN names)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def activation_kind(name: str, arch: str) -> str:
    """The Activation op kind for transformers' `activation_function` name; unknown: refused by name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation_function {name!r} is not supported for {arch}; supported: {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class OPTParams:
    vocab_size: int
    dim: int                      # hidden_size
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_position_embeddings: int
    word_embed_proj_dim: int      # == dim except opt-350m (512 vs 1024): project_in/out then
    activation: str = "relu"      # the Activation op's kind
    do_layer_norm_before: bool = True   # False: post-norm (opt-350m)
    final_layer_norm: bool = True       # HF drops it for post-norm models (and _remove_final_layer_norm)
    enable_bias: bool = True
    norm_eps: float = 1e-5        # nn.LayerNorm's default: OPT's config has no eps
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class LayerNorm(nn.Module):
    """nn.LayerNorm over the last dim, with weight and bias, through the LayerNorm op."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class LoadTimeLayout(CausalLM):
    """A family whose checkpoint layout is not the one its forward computes with: the model
    is built (on the meta device) with the checkpoint's shapes, so the loader fills and checks
    it as stored, and `to_runtime_layout` rewrites those parameters once, after the load."""

    def to_runtime_layout(self) -> None:
        raise NotImplementedError

    def after_load(self) -> None:
        super().after_load()
        self.to_runtime_layout()


class OPTForCausalLM(LoadTimeLayout):
    hf_weight_names = [
        (r"^(?:model\.)?decoder\.", ""),   # facebook/opt-* checkpoints are saved with and without 'model.'
        (r"^lm_head\.", "lm_head."),
    ]
    gguf_architectures: dict[str, str] = {}  # llama.cpp has no OPT architecture

    def __init__(self, params: OPTParams) -> None:
        super().__init__()
        self.params, self.vocab_size = params, params.vocab_size
        self.embed_tokens = Embedding(params.vocab_size, params.word_embed_proj_dim)
        # the checkpoint's table, offset rows included; to_runtime_layout drops them
        self.embed_positions = Embedding(params.max_position_embeddings + POSITION_OFFSET, params.dim)
        narrow = params.word_embed_proj_dim != params.dim
        self.project_in = Linear(params.word_embed_proj_dim, params.dim) if narrow else None
        self.project_out = Linear(params.dim, params.word_embed_proj_dim) if narrow else None
        self.layers = nn.ModuleList(OPTDecoderLayer(params) for _ in range(params.n_layers))
        self.final_layer_norm = LayerNorm(params.dim, params.norm_eps) if params.final_layer_norm else None
        self.lm_head = Linear(params.word_embed_proj_dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> OPTParams:
        arch = "OPTForCausalLM"
        if not cfg.get("layer_norm_elementwise_affine", True):
            raise ValueError(f"layer_norm_elementwise_affine=False is not supported for {arch}")
        dim, pre_norm = cfg["hidden_size"], cfg.get("do_layer_norm_before", True)
        return OPTParams(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            ffn_dim=cfg["ffn_dim"],
            max_position_embeddings=cfg["max_position_embeddings"],
            word_embed_proj_dim=cfg.get("word_embed_proj_dim") or dim,
            activation=activation_kind(cfg.get("activation_function", "relu"), arch),
            do_layer_norm_before=pre_norm,
            final_layer_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
            enable_bias=cfg.get("enable_bias", True),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )

    def to_runtime_layout(self) -> None:
        table = self.embed_positions.weight                      # (max_pos + 2, dim)
        self.embed_positions.weight = nn.Parameter(table[POSITION_OFFSET:].clone(), requires_grad=False)

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        p = self.params
        return [((p.n_heads, p.head_dim), (p.n_heads, p.head_dim))] * p.n_layers

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        """One step -> logits (N, vocab) for the rows step.logits_indices."""
        x = self.embed_tokens(step.input_ids)                    # (T, word_embed_proj_dim)
        if self.project_in is not None:
            x = self.project_in(x)                               # (T, dim)
        x = F.add(x, self.embed_positions(step.positions))       # (T, dim)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, step, cache)
        x = F.gather_rows(x, step.logits_indices)                # (N, dim)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)                              # (N, word_embed_proj_dim)
        return self.lm_head(x)                                   # (N, vocab)


class OPTDecoderLayer(nn.Module):
    def __init__(self, params: OPTParams) -> None:
        super().__init__()
        self.pre_norm, self.activation = params.do_layer_norm_before, params.activation
        self.self_attn = OPTAttention(params)
        self.self_attn_layer_norm = LayerNorm(params.dim, params.norm_eps)
        self.fc1 = Linear(params.dim, params.ffn_dim, bias=params.enable_bias)
        self.fc2 = Linear(params.ffn_dim, params.dim, bias=params.enable_bias)
        self.final_layer_norm = LayerNorm(params.dim, params.norm_eps)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.activation(self.fc1(x), self.activation))  # (T, dim)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        if self.pre_norm:  # opt-125m, 1.3b, ...: norm, sublayer, residual add
            h = F.add(x, self.self_attn(self.self_attn_layer_norm(x), step, cache))
            return F.add(h, self.mlp(self.final_layer_norm(h)))
        # opt-350m: sublayer, residual add, norm
        h = self.self_attn_layer_norm(F.add(x, self.self_attn(x, step, cache)))
        return self.final_layer_norm(F.add(h, self.mlp(h)))


class OPTAttention(nn.Module):
    """Multi-head attention (as many KV heads as query heads) over the paged KV cache."""

    def __init__(self, params: OPTParams) -> None:
        super().__init__()
        self.n_heads, self.head_dim = params.n_heads, params.head_dim
        # HF scales q by head_dim**-0.5 before q.k. A power-of-two scale (head_dim 16, 64, 256:
        # opt-125m to opt-2.7b) gives the same bits when the attention op scales q.k instead; any
        # other (head_dim 128: opt-6.7b and up) is applied to q as HF does, one Scale op more.
        scale = self.head_dim ** -0.5
        self.q_scale = None if math.frexp(scale)[0] == 0.5 else scale
        bias = params.enable_bias
        self.q_proj = Linear(params.dim, params.dim, bias=bias)
        self.k_proj = Linear(params.dim, params.dim, bias=bias)
        self.v_proj = Linear(params.dim, params.dim, bias=bias)
        self.out_proj = Linear(params.dim, params.dim, bias=bias)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (T, dim) x 3
        scale = self.head_dim ** -0.5
        if self.q_scale is not None:
            q, scale = F.scale(q, self.q_scale), 1.0
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_heads,
                              head_dim=self.head_dim, scale=scale)
        return self.out_proj(y)                                   # (T, dim)
