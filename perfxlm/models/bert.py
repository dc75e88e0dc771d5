"""BERT encoders (BertModel, BertForSequenceClassification) in plain PyTorch: vLLM's pooling
models for embeddings (all-MiniLM-L6-v2 and other sentence-transformers) and cross-encoders.

What differs from the decoders: the word, learned position and token type embeddings are
summed, then LayerNorm; post-LN layers (x = norm(x + attn(x)), x = norm(x + mlp(x))) with a
GELU MLP and biases everywhere; and attention is bidirectional (PagedAttention causal 0),
so a prompt runs in one step (the engine schedules an encoder's prompts whole). The token
types come in through the graph input `token_type_ids` (0 for a plain prompt; a cross-
encoder's pair marks its second text 1). The forward returns, for the logits_indices rows
the engine pools, the last hidden states (BertModel), or BertPooler's tanh(dense(x)) then the
classifier (BertForSequenceClassification, on the [CLS] row).
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.labels import num_labels
from perfxlm.models.layers import CausalLM, Embedding, Linear
from perfxlm.models.opt import LayerNorm, activation_kind


@dataclass
class BertParams:
    vocab_size: int
    dim: int                      # hidden_size
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"      # the Activation op's kind (hidden_act "gelu": erf)
    num_labels: int = 0           # the classifier's classes (BertForSequenceClassification)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class BertModel(CausalLM):
    """The encoder and its embeddings; the forward returns the last hidden states (N, dim)."""

    hf_weight_names = [
        (r"^(bert\.)?embeddings\.word_embeddings\.", "embeddings.word."),
        (r"^(bert\.)?embeddings\.position_embeddings\.", "embeddings.position."),
        (r"^(bert\.)?embeddings\.token_type_embeddings\.", "embeddings.token_type."),
        (r"^(bert\.)?embeddings\.LayerNorm\.", "embeddings.norm."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\2.attention.wq."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\2.attention.wk."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\2.attention.wv."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\2.attention.wo."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\2.attention_norm."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\2.mlp.fc1."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\2.mlp.fc2."),
        (r"^(bert\.)?encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\2.mlp_norm."),
        (r"^(bert\.)?pooler\.dense\.", "pooler."),
    ]
    # position_ids: a buffer old checkpoints saved; the pooler: unused by an embedding model
    hf_ignored_names = (r"embeddings\.position_ids$", r"^(bert\.)?pooler\.")
    optional_inputs = ("token_type_ids",)
    pooling_task = "embed"
    default_seq_pooling_type = "CLS"
    is_causal = False

    def __init__(self, params: BertParams) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.dim
        self.embeddings = BertEmbeddings(params)
        self.layers = nn.ModuleList(BertLayer(params) for _ in range(params.n_layers))

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> BertParams:
        arch = (cfg.get("architectures") or ["BertModel"])[0]
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} is not supported for "
                             f"{arch}; supported: ['absolute']")
        return BertParams(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            norm_eps=cfg.get("layer_norm_eps", 1e-12),
            activation=activation_kind(cfg.get("hidden_act", "gelu"), arch),
            num_labels=num_labels(cfg) if arch.endswith("ForSequenceClassification") else 0,
        )

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        p = self.params
        return [((p.n_heads, p.head_dim), (p.n_heads, p.head_dim))] * p.n_layers

    def encode(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        """The last hidden states of the logits_indices rows -> (N, dim)."""
        x = self.embeddings(step)                                # (T, dim)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, step, cache)
        return F.gather_rows(x, step.logits_indices)             # (N, dim)

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        return self.encode(step, kv_caches)


class BertForSequenceClassification(BertModel):
    """A cross-encoder / classifier: BertPooler (dense, tanh) on the pooled row, then the
    classifier -> (N, num_labels) logits; the engine pools the [CLS] row and applies the
    activation (sigmoid for one label, else softmax)."""

    hf_weight_names = BertModel.hf_weight_names + [(r"^classifier\.", "classifier.")]
    hf_ignored_names = (r"embeddings\.position_ids$",)
    pooling_task = "classify"

    def __init__(self, params: BertParams) -> None:
        super().__init__(params)
        self.vocab_size = params.num_labels
        self.pooler = Linear(params.dim, params.dim, bias=True)
        self.classifier = Linear(params.dim, params.num_labels, bias=True)

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        x = self.encode(step, kv_caches)                         # (N, dim)
        x = F.softcap(self.pooler(x), 1.0)                       # tanh, as Softcap with cap 1 computes it
        return self.classifier(x)                                # (N, num_labels)


class BertEmbeddings(nn.Module):
    def __init__(self, params: BertParams) -> None:
        super().__init__()
        self.word = Embedding(params.vocab_size, params.dim)
        self.position = Embedding(params.max_position_embeddings, params.dim)
        self.token_type = Embedding(params.type_vocab_size, params.dim)
        self.norm = LayerNorm(params.dim, params.norm_eps)

    def forward(self, step: StepInputs) -> torch.Tensor:
        x = F.add(self.word(step.input_ids), self.position(step.positions))   # (T, dim)
        return self.norm(F.add(x, self.token_type(step.token_type_ids)))


class BertLayer(nn.Module):
    """Post-LN: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    def __init__(self, params: BertParams) -> None:
        super().__init__()
        self.attention = BertAttention(params)
        self.attention_norm = LayerNorm(params.dim, params.norm_eps)
        self.mlp = BertMLP(params)
        self.mlp_norm = LayerNorm(params.dim, params.norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        x = self.attention_norm(F.add(x, self.attention(x, step, cache)))
        return self.mlp_norm(F.add(x, self.mlp(x)))


class BertAttention(nn.Module):
    """Bidirectional multi-head attention: every token of a prompt sees all of it."""

    def __init__(self, params: BertParams) -> None:
        super().__init__()
        self.n_heads, self.head_dim = params.n_heads, params.head_dim
        self.wq = Linear(params.dim, params.dim, bias=True)
        self.wk = Linear(params.dim, params.dim, bias=True)
        self.wv = Linear(params.dim, params.dim, bias=True)
        self.wo = Linear(params.dim, params.dim, bias=True)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)             # (T, dim) each
        y = F.paged_attention(q, k, v, cache, step, num_heads=self.n_heads, num_kv_heads=self.n_heads,
                              head_dim=self.head_dim, scale=self.head_dim ** -0.5, causal=False)
        return self.wo(y)                                        # (T, dim)


class BertMLP(nn.Module):
    def __init__(self, params: BertParams) -> None:
        super().__init__()
        self.kind = params.activation
        self.fc1 = Linear(params.dim, params.intermediate_size, bias=True)
        self.fc2 = Linear(params.intermediate_size, params.dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.activation(self.fc1(x), self.kind))
