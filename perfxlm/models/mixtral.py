"""Mixtral (MixtralForCausalLM) in plain PyTorch: Mistral's attention (grouped KV heads, a
sliding window when the config sets one) and, in every layer, a sparse MoE MLP: the router
`block_sparse_moe.gate` sends each token to its top-k experts (w1 = gate, w3 = up, w2 = down),
their probabilities always renormalised to sum 1.

llama.cpp converts Mixtral as a `llama` GGUF with experts (its Q/K rows permuted like Llama's);
the Llama family's config_from_gguf hands such a file to this family.
"""

from typing import Any

import numpy as np

from perfxlm.models.llama import LlamaAttention, LlamaForCausalLM
from perfxlm.models.moe import GGUF_MOE_NAMES, MoeForCausalLM, MoeParams, expert_count, moe_params

ARCH = "MixtralForCausalLM"


class MixtralForCausalLM(MoeForCausalLM):
    attention_class = LlamaAttention
    hf_weight_names = [
        (r"^model\.embed_tokens\.", "tok_embeddings."),
        (r"^model\.norm\.", "norm."),
        (r"^lm_head\.", "output."),
        (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
        (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
        (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.", r"layers.\1.feed_forward.gate."),
        (r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.",  # w1 gate, w3 up, w2 down
         r"layers.\1.feed_forward.experts.\2.\3."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
    ]
    gguf_weight_names = {
        "token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
        "attn_q": "layers.{}.attention.wq", "attn_k": "layers.{}.attention.wk", "attn_v": "layers.{}.attention.wv",
        "attn_output": "layers.{}.attention.wo",
        "attn_norm": "layers.{}.attention_norm", "ffn_norm": "layers.{}.ffn_norm",
        **GGUF_MOE_NAMES,
    }
    # no architecture of its own in llama.cpp: a `llama` GGUF with experts (LlamaForCausalLM.config_from_gguf)
    gguf_architectures: dict[str, str] = {}

    @classmethod
    def params_from_hf(cls, cfg: dict[str, Any]) -> MoeParams:
        base = LlamaForCausalLM.params_from_hf({**cfg, "architectures": [ARCH]})  # attention, RoPE, sliding window
        return moe_params(base, cfg, ARCH, n_experts=expert_count(cfg), top_k=cfg["num_experts_per_tok"],
                          moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)

    @classmethod
    def gguf_tensor(cls, name: str, rows: np.ndarray, params: MoeParams, gguf_arch: str) -> np.ndarray:
        """Llama's: undo the converter's Q/K row permutation of a `llama` GGUF."""
        return LlamaForCausalLM.gguf_tensor(name, rows, params, gguf_arch)
