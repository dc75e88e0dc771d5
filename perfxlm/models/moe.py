"""Mixture-of-experts pieces shared by the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE).

A sparse MLP is one op of the graph, F.moe: the router is a Linear of x, the experts' weights
are three stacked (E, N, K) parameters (one per projection, so a GGUF's `ffn_*_exps` tensors
and their quantised blocks fill them as stored), and the op routes, runs and sums the experts.
HF checkpoints store one tensor per expert; the loader stacks them by expert index
(loader._stack_experts), so a family only names them `...experts.<index>.<proj>.`.
"""

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs
from perfxlm.models.layers import CausalLM, Embedding, Linear, RMSNorm, RotaryTables
from perfxlm.models.llama import LlamaMLP, ModelParams


@dataclass
class MoeParams(ModelParams):
    n_experts: int = 0                    # routed experts per sparse layer
    top_k: int = 0                        # experts each token is sent to
    moe_intermediate_size: int = 0        # an expert's hidden size
    norm_topk_prob: bool = True           # renormalise the top_k probabilities to sum 1
    shared_intermediate_size: int = 0     # Qwen2-MoE's shared expert (0: none)
    sparse_layers: list[int] = field(default_factory=list)  # layers whose MLP is the sparse block


def moe_params(base: ModelParams, cfg: dict[str, Any], arch: str, *, n_experts: int, top_k: int,
               moe_intermediate_size: int, norm_topk_prob: bool, shared_intermediate_size: int = 0,
               decoder_sparse_step: int = 1, mlp_only_layers: list[int] | None = None) -> MoeParams:
    """`base` (the attention's parameters) with the MoE ones, checked; the sparse layers are HF's
    rule: not in mlp_only_layers, experts exist, and (layer + 1) % decoder_sparse_step == 0."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported for {arch}; supported: ['silu']")
    if n_experts < 0 or (n_experts and not 0 < top_k <= n_experts):
        raise ValueError(f"{arch}: num_experts_per_tok {top_k} must be between 1 and the {n_experts} experts")
    if decoder_sparse_step < 1:
        raise ValueError(f"{arch}: decoder_sparse_step {decoder_sparse_step} must be at least 1")
    dense = set(mlp_only_layers or [])
    sparse = [i for i in range(base.n_layers)
              if i not in dense and n_experts > 0 and (i + 1) % decoder_sparse_step == 0]
    return MoeParams(**vars(base), n_experts=n_experts, top_k=top_k, moe_intermediate_size=moe_intermediate_size,
                     norm_topk_prob=bool(norm_topk_prob), shared_intermediate_size=shared_intermediate_size,
                     sparse_layers=sparse)


def expert_count(cfg: dict[str, Any]) -> int:
    """HF names it num_local_experts (Mixtral, transformers 5's Qwen3-MoE) or num_experts (Qwen)."""
    if cfg.get("num_local_experts") is not None:
        return cfg["num_local_experts"]
    return cfg["num_experts"]


class ExpertWeights(nn.Module):
    """One projection of every expert: weight (E, N, K), expert e's Linear weight (N, K)."""

    def __init__(self, n_experts: int, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))


class Experts(nn.Module):
    """The experts' SwiGLU weights: w1 (gate) and w3 (up) (E, F, D), w2 (down) (E, D, F), Llama's names."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = ExpertWeights(n_experts, hidden, dim)
        self.w3 = ExpertWeights(n_experts, hidden, dim)
        self.w2 = ExpertWeights(n_experts, dim, hidden)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, a Linear D -> E) + experts, and optionally Qwen2-MoE's shared expert
    (a SwiGLU MLP every token goes through, scaled by sigmoid(shared_expert_gate(x)))."""

    def __init__(self, params: MoeParams) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = params.top_k, params.norm_topk_prob
        self.gate = Linear(params.dim, params.n_experts)
        self.experts = Experts(params.n_experts, params.dim, params.moe_intermediate_size)
        self.shared_expert = self.shared_expert_gate = None
        if params.shared_intermediate_size:
            self.shared_expert = LlamaMLP(replace(params, intermediate_size=params.shared_intermediate_size))
            self.shared_expert_gate = Linear(params.dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)                                    # (T, E)
        shared = shared_gate = None
        if self.shared_expert is not None:
            shared, shared_gate = self.shared_expert(x), self.shared_expert_gate(x)  # (T, D), (T, 1)
        e = self.experts
        return F.moe(x, logits, e.w1.weight, e.w3.weight, e.w2.weight, top_k=self.top_k,
                     norm_topk_prob=self.norm_topk_prob, shared=shared, shared_gate=shared_gate)  # (T, D)


class MoeBlock(nn.Module):
    """A pre-norm decoder layer: x + attention(norm(x)), then h + mlp(norm(h)), the MLP sparse
    on the params' sparse layers and Llama's dense one (intermediate_size) elsewhere."""

    def __init__(self, params: MoeParams, layer: int, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention
        self.feed_forward = SparseMoeBlock(params) if layer in params.sparse_layers else LlamaMLP(params)
        self.attention_norm = RMSNorm(params.dim, params.norm_eps)
        self.ffn_norm = RMSNorm(params.dim, params.norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, cache: KVCache, rotary: RotaryTables) -> torch.Tensor:
        h = F.add(x, self.attention(self.attention_norm(x), step, cache, rotary))
        return F.add(h, self.feed_forward(self.ffn_norm(h)))


class MoeForCausalLM(CausalLM):
    """The MoE families' common model: embeddings, MoeBlocks whose attention is the family's
    `attention_class` (built from the params), final norm and output projection."""

    attention_class: type[nn.Module]

    def __init__(self, params: MoeParams) -> None:
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.tok_embeddings = Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(MoeBlock(params, i, self.attention_class(params)) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = Linear(params.dim, params.vocab_size)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryTables(params.head_dim, params.rope_theta, params.max_position_embeddings,
                                   params.rope_scaling)

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


# HF -> parameter renames of a Qwen-MoE layer's MLP (Qwen2-MoE's shared expert included); the
# per-expert tensors keep their index, which the loader stacks away
QWEN_MOE_MLP_NAMES = [
    (r"^model\.layers\.(\d+)\.mlp\.gate\.", r"layers.\1.feed_forward.gate."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.", r"layers.\1.feed_forward.experts.\2.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.", r"layers.\1.feed_forward.experts.\2.w3."),
    (r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.", r"layers.\1.feed_forward.experts.\2.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.shared_expert\.gate_proj\.", r"layers.\1.feed_forward.shared_expert.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.shared_expert\.up_proj\.", r"layers.\1.feed_forward.shared_expert.w3."),
    (r"^model\.layers\.(\d+)\.mlp\.shared_expert\.down_proj\.", r"layers.\1.feed_forward.shared_expert.w2."),
    (r"^model\.layers\.(\d+)\.mlp\.shared_expert_gate\.", r"layers.\1.feed_forward.shared_expert_gate."),
]

# llama.cpp's tensors of a sparse layer (stacked experts) and of a dense one
GGUF_MOE_NAMES = {
    "ffn_gate_inp": "layers.{}.feed_forward.gate",
    "ffn_gate_exps": "layers.{}.feed_forward.experts.w1", "ffn_up_exps": "layers.{}.feed_forward.experts.w3",
    "ffn_down_exps": "layers.{}.feed_forward.experts.w2",
    "ffn_gate": "layers.{}.feed_forward.w1", "ffn_up": "layers.{}.feed_forward.w3",
    "ffn_down": "layers.{}.feed_forward.w2",
}


def gguf_moe_config(gguf: Any, cfg: dict[str, Any], norm_default: bool) -> dict[str, Any]:
    """The HF MoE keys of a qwen2moe/qwen3moe GGUF added to `cfg`. llama.cpp runs every layer
    sparse; a file whose layer lacks the router (`ffn_gate_inp`) has a dense MLP there, which
    becomes mlp_only_layers. llama.cpp hard-codes each architecture's renormalisation (qwen2moe
    no, qwen3moe yes) unless the file says `expert_weights_norm`."""
    names = gguf.tensor_names
    return {**cfg,
            "num_experts": gguf.get("expert_count"),
            "num_experts_per_tok": gguf.get("expert_used_count"),
            "moe_intermediate_size": gguf.get("expert_feed_forward_length"),
            "norm_topk_prob": bool(gguf.get("expert_weights_norm", norm_default)),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg["num_hidden_layers"])
                                if f"blk.{i}.ffn_gate_inp.weight" not in names]}
