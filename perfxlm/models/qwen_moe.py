"""Qwen2-MoE (Qwen2MoeForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM) in plain PyTorch.

Both: a sparse MoE MLP (`moe_intermediate_size` experts) on the layers HF makes sparse (not in
`mlp_only_layers`, and (layer + 1) % `decoder_sparse_step` == 0), Llama's dense MLP of
`intermediate_size` on the others.
- Qwen2-MoE: Qwen2's attention (q/k/v biases); the top-k probabilities renormalised only with
  `norm_topk_prob`; a shared expert (a SwiGLU MLP of `shared_expert_intermediate_size`) every
  token goes through, scaled by sigmoid(`shared_expert_gate`(x)) (a Linear D -> 1).
- Qwen3-MoE: Qwen3's attention (q and k RMS-normalised per head before RoPE), no shared expert.
"""

from typing import Any

import numpy as np

from perfxlm.models.llama import LlamaAttention
from perfxlm.models.moe import (GGUF_MOE_NAMES, QWEN_MOE_MLP_NAMES, MoeForCausalLM, MoeParams, expert_count,
                                gguf_moe_config, moe_params)
from perfxlm.models.qwen3 import Qwen3Attention, qwen_params

QWEN2_MOE, QWEN3_MOE = "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"

_HF_NAMES = [
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_norm\.", r"layers.\1.attention.q_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_norm\.", r"layers.\1.attention.k_norm."),
    *QWEN_MOE_MLP_NAMES,
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),   # the dense layers
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
]

_GGUF_NAMES = {
    "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
    "attn_q": "layers.{}.attention.wq", "attn_k": "layers.{}.attention.wk", "attn_v": "layers.{}.attention.wv",
    "attn_output": "layers.{}.attention.wo",
    "attn_norm": "layers.{}.attention_norm", "ffn_norm": "layers.{}.ffn_norm",
    **GGUF_MOE_NAMES,
}


def _qwen_moe_params(cfg: dict[str, Any], arch: str, qkv_bias: bool, shared: int) -> MoeParams:
    """Both families' parameters: the config keys are the same but for the shared expert."""
    if cfg.get("use_sliding_window"):
        # transformers then windows only some layers (layer_types / max_window_layers); no release sets it
        raise ValueError(f"use_sliding_window=True is not supported for {arch}")
    return moe_params(qwen_params(cfg, arch, qkv_bias), cfg, arch, n_experts=expert_count(cfg), top_k=cfg["num_experts_per_tok"],
                      moe_intermediate_size=cfg["moe_intermediate_size"],
                      norm_topk_prob=cfg.get("norm_topk_prob", False), shared_intermediate_size=shared,
                      decoder_sparse_step=cfg.get("decoder_sparse_step", 1),
                      mlp_only_layers=cfg.get("mlp_only_layers"))


class Qwen2MoeForCausalLM(MoeForCausalLM):
    attention_class = LlamaAttention
    hf_weight_names = _HF_NAMES
    gguf_weight_names = {
        **_GGUF_NAMES,
        "ffn_gate_shexp": "layers.{}.feed_forward.shared_expert.w1",
        "ffn_up_shexp": "layers.{}.feed_forward.shared_expert.w3",
        "ffn_down_shexp": "layers.{}.feed_forward.shared_expert.w2",
        "ffn_gate_inp_shexp": "layers.{}.feed_forward.shared_expert_gate",
    }
    gguf_architectures = {"qwen2moe": QWEN2_MOE}

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> MoeParams:
        # transformers' Qwen2-MoE has q/k/v biases unless the config says qkv_bias false
        return _qwen_moe_params(cfg, QWEN2_MOE, qkv_bias=cfg.get("qkv_bias", True),
                                shared=cfg.get("shared_expert_intermediate_size") or 0)

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        cfg = gguf_moe_config(gguf, super().config_from_gguf(gguf, architecture), norm_default=False)
        cfg["qkv_bias"] = cfg.pop("attention_bias")
        cfg["shared_expert_intermediate_size"] = gguf.get("expert_shared_feed_forward_length", 0)
        return cfg

    @classmethod
    def gguf_tensor(cls, name: str, rows: np.ndarray, params: MoeParams, gguf_arch: str) -> np.ndarray:
        """llama.cpp squeezes the shared expert's gate, a (1, D) Linear, to a (D,) tensor."""
        return rows.reshape(1, -1) if name.endswith(".shared_expert_gate.weight") else rows


class Qwen3MoeForCausalLM(MoeForCausalLM):
    attention_class = Qwen3Attention
    hf_weight_names = _HF_NAMES
    gguf_weight_names = {**_GGUF_NAMES, "attn_q_norm": "layers.{}.attention.q_norm",
                         "attn_k_norm": "layers.{}.attention.k_norm"}
    gguf_architectures = {"qwen3moe": QWEN3_MOE}

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> MoeParams:
        if cfg.get("shared_expert_intermediate_size"):
            raise ValueError(f"shared_expert_intermediate_size is not supported for {QWEN3_MOE}: "
                             "it has no shared expert")
        return _qwen_moe_params(cfg, QWEN3_MOE, qkv_bias=cfg.get("attention_bias", False), shared=0)

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        return gguf_moe_config(gguf, super().config_from_gguf(gguf, architecture), norm_default=True)
