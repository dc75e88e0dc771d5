"""OpenAI's GPT-2 (GPT2LMHeadModel: gpt2, gpt2-medium/large/xl, distilgpt2) in plain PyTorch.

What differs from Llama: LayerNorm with bias, a non-gated MLP with tanh GELU (gelu_new:
c_fc, c_proj), biases on every projection, no RoPE but a learned position table added to
the token embedding, and the lm_head tied to the token embedding. The checkpoint stores
its projections as transformers' Conv1D, weight (in, out), with q, k and v fused in
c_attn: at load they become Linear weights (out, in) and c_attn splits in three, so the
graph uses the same Linear op as every family. GGUF: llama.cpp's `gpt2` architecture
(convert_hf_to_gguf.py writes the projections transposed to (out, in), q/k/v still fused).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import Embedding, Linear
from perfxlm.models.opt import LayerNorm, LoadTimeLayout, activation_kind


@dataclass
class GPT2Params:
    vocab_size: int
    dim: int                      # n_embd
    n_layers: int
    n_heads: int
    inner_dim: int                # n_inner, 4 * n_embd when unset
    max_position_embeddings: int  # n_positions
    activation: str = "gelu_tanh"  # the Activation op's kind (gelu_new)
    norm_eps: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class Conv1D(nn.Module):
    """transformers' Conv1D as stored: y = x @ weight + bias, weight (in, out). Only held
    between loading and `to_linear`; the forward never reads it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def to_linears(self, parts: int = 1) -> list[Linear]:
        """The layer as `parts` Linear modules (weight (out / parts, in)), splitting the output
        features in equal consecutive slices (c_attn: q, k, v)."""
        out = []
        for w, b in zip(self.weight.chunk(parts, dim=1), self.bias.chunk(parts)):  # (in, out/parts), (out/parts,)
            lin = Linear(w.shape[0], w.shape[1], bias=True)
            lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)  # (out/parts, in)
            lin.bias = nn.Parameter(b.clone(), requires_grad=False)
            out.append(lin)
        return out


class GPT2LMHeadModel(LoadTimeLayout):
    hf_weight_names = [
        (r"^(?:transformer\.)?(wte|wpe|ln_f|h)\.", r"\1."),  # openai-community/gpt2 is saved without 'transformer.'
        (r"^lm_head\.", "lm_head."),
    ]
    # openai-community/gpt2's checkpoint also holds the causal-mask buffers
    hf_ignored_names = (r"rotary_emb", r"\.attn\.(masked_)?bias$")
    gguf_weight_names = {
        "token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head",
        "attn_norm": "h.{}.ln_1", "attn_qkv": "h.{}.attn.c_attn", "attn_output": "h.{}.attn.c_proj",
        "ffn_norm": "h.{}.ln_2", "ffn_up": "h.{}.mlp.c_fc", "ffn_down": "h.{}.mlp.c_proj",
    }
    gguf_architectures = {"gpt2": "GPT2LMHeadModel"}

    def __init__(self, params: GPT2Params) -> None:
        super().__init__()
        self.params, self.vocab_size = params, params.vocab_size
        self.wte = Embedding(params.vocab_size, params.dim)
        self.wpe = Embedding(params.max_position_embeddings, params.dim)
        self.h = nn.ModuleList(GPT2Block(params, i) for i in range(params.n_layers))
        self.ln_f = LayerNorm(params.dim, params.norm_eps)
        self.lm_head = Linear(params.dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> GPT2Params:
        arch = "GPT2LMHeadModel"
        if cfg.get("add_cross_attention", False):
            raise ValueError(f"add_cross_attention=True (an encoder-decoder GPT-2) is not supported for {arch}")
        dim = cfg["n_embd"]
        return GPT2Params(
            vocab_size=cfg["vocab_size"],
            dim=dim,
            n_layers=cfg["n_layer"],
            n_heads=cfg["n_head"],
            inner_dim=cfg.get("n_inner") or 4 * dim,
            max_position_embeddings=cfg["n_positions"],
            activation=activation_kind(cfg.get("activation_function", "gelu_new"), arch),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=cfg.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=cfg.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        )

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        """The GPT-2 config.json equivalent to llama.cpp's `gpt2.*` metadata."""
        def need(key: str) -> Any:
            value = gguf.get(key)
            if value is None:
                raise KeyError(f"{gguf.arch}.{key}")
            return value
        n_positions = need("context_length")
        return {
            "architectures": [architecture],
            "model_type": "gpt2",
            "vocab_size": gguf.vocab_size,
            "n_embd": need("embedding_length"),
            "n_layer": need("block_count"),
            "n_head": need("attention.head_count"),
            "n_inner": need("feed_forward_length"),
            "n_positions": n_positions,
            "max_position_embeddings": n_positions,  # what the engine derives max_model_len from
            "layer_norm_epsilon": float(need("attention.layer_norm_epsilon")),
            "activation_function": "gelu_new",
            # llama.cpp's converter writes the tied head as its own `output` tensor
            "tie_word_embeddings": "output.weight" not in gguf.tensor_names,
            "bos_token_id": gguf.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": gguf.meta.get("tokenizer.ggml.eos_token_id"),
        }

    @classmethod
    def gguf_tensor(cls, name: str, rows: np.ndarray, params: GPT2Params, gguf_arch: str) -> np.ndarray:
        """llama.cpp stores the Conv1D weights transposed to (out, in); the model is built with the
        HF checkpoint's (in, out), so float rows go back. Quantised block rows cannot be transposed:
        they are left as stored and, not naming a parameter after load, run dequantised (float)."""
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) and rows.dtype != np.uint8:
            return rows.T
        return rows

    def to_runtime_layout(self) -> None:
        for block in self.h:
            block.attn.to_runtime_layout()
            block.mlp.to_runtime_layout()

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        p = self.params
        return [((p.n_heads, p.head_dim), (p.n_heads, p.head_dim))] * p.n_layers

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        """One step -> logits (N, vocab) for the rows step.logits_indices."""
        x = F.add(self.wte(step.input_ids), self.wpe(step.positions))  # (T, dim)
        for block, cache in zip(self.h, kv_caches):
            x = block(x, step, cache)
        x = F.gather_rows(x, step.logits_indices)                       # (N, dim)
        return self.lm_head(self.ln_f(x))                               # (N, vocab)


class GPT2Block(nn.Module):
    def __init__(self, params: GPT2Params, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(params.dim, params.norm_eps)
        self.attn = GPT2Attention(params, layer_idx)
        self.ln_2 = LayerNorm(params.dim, params.norm_eps)
        self.mlp = GPT2MLP(params)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        h = F.add(x, self.attn(self.ln_1(x), step, cache))
        return F.add(h, self.mlp(self.ln_2(h)))


class GPT2Attention(nn.Module):
    """Multi-head attention over the paged KV cache; c_attn / c_proj (Conv1D) until
    to_runtime_layout, then wq, wk, wv, wo (Linear)."""

    def __init__(self, params: GPT2Params, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = params.n_heads, params.head_dim
        self.scale = params.head_dim ** -0.5 if params.scale_attn_weights else 1.0
        if params.scale_attn_by_inverse_layer_idx:  # HF: scaling /= layer_idx + 1
            self.scale /= float(layer_idx + 1)
        self.c_attn = Conv1D(params.dim, 3 * params.dim)
        self.c_proj = Conv1D(params.dim, params.dim)

    def to_runtime_layout(self) -> None:
        self.wq, self.wk, self.wv = self.c_attn.to_linears(3)
        (self.wo,) = self.c_proj.to_linears()
        del self.c_attn, self.c_proj

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)              # (T, dim) x 3
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_heads,
                              head_dim=self.head_dim, scale=self.scale)
        return self.wo(y)                                         # (T, dim)


class GPT2MLP(nn.Module):
    def __init__(self, params: GPT2Params) -> None:
        super().__init__()
        self.activation = params.activation
        self.c_fc = Conv1D(params.dim, params.inner_dim)
        self.c_proj = Conv1D(params.inner_dim, params.dim)

    def to_runtime_layout(self) -> None:
        (self.fc,) = self.c_fc.to_linears()
        (self.proj,) = self.c_proj.to_linears()
        del self.c_fc, self.c_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.activation(self.fc(x), self.activation))  # (T, dim)
