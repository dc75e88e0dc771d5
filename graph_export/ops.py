"""THE op set: every op a perfxlm graph may contain, one row each.

Shapes use T = tokens in the step (all sequences flattened), B = sequences,
D = hidden size, N/K = linear out/in features, H/Hkv = query/KV heads, hd = head dim,
V = vocabulary. Adding an op = one row here + one kernel per plugin.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

Shape = tuple  # dims are ints or symbols ('T' tokens, 'N' logits rows)

DOMAIN = "ai.perfxlm"   # custom-domain ops; Gather and Add are standard ONNX
DOMAIN_VERSION = 1
FORMAT_VERSION = 1      # the perfxlm graph format; the loader refuses others
ONNX_OPSET = 21
IR_VERSION = 10          # opset 21's IR; newer onnx writes newer IRs than onnxruntime reads
ACTIVATION_KINDS = ("relu", "gelu", "gelu_tanh")  # Activation's `kind`, in the order of the C codes (PXL_ACT_*)


@dataclass(frozen=True)
class OpSpec:
    name: str
    domain: str                      # "" is the standard ONNX domain
    inputs: tuple[str, ...]          # "name (shape) dtype", '?' marks an optional input
    outputs: tuple[str, ...]
    attrs: dict[str, str] = field(default_factory=dict)
    contract: str = ""
    infer: Callable[[list[Shape]], Shape] = lambda shapes: shapes[0]  # input shapes -> output 0 shape
    aliases: dict[int, int] = field(default_factory=dict)  # output index -> input index updated in place
    # input index -> the attribute naming its weight format: inputs that may hold GGUF blocks
    weights: dict[int, str] = field(default_factory=dict)


OPS: dict[str, OpSpec] = {op.name: op for op in [
    OpSpec("Gather", "", ("data (V, D) float", "indices (T,) int64"), ("y (T, D) float",),
           {"axis": "int = 0"},
           "// table (V, D)[ids (T,)] -> y (T, D); also picks the logits rows of hidden (T, D)",
           infer=lambda s: (s[1][0], s[0][1])),
    OpSpec("RMSNorm", DOMAIN, ("x (T, D) float", "weight (D,) float"), ("y (T, D) float",),
           {"epsilon": "float", "group_size": "int = 0 (the whole row)"},
           "// y = weight * x / sqrt(mean(x^2) + eps), the mean in float32, over each group of group_size "
           "features (weight (group_size,): per-head q/k norm) or the whole row"),
    OpSpec("Linear", DOMAIN, ("x (T, K) float", "weight (N, K) float", "bias? (N,) float"), ("y (T, N) float",),
           {"weight_format": "str = 'dense'"},
           "// x (T, K) @ W (N, K)^T + b -> y (T, N); weight_format names a weight-only quantised layout",
           infer=lambda s: (s[0][0], s[1][0]), weights={1: "weight_format"}),
    OpSpec("RoPE", DOMAIN, ("x (T, H*hd) float", "positions (T,) int64", "cos (P, hd) float", "sin (P, hd) float"),
           ("y (T, H*hd) float",), {"head_dim": "int"},
           "// rotate each head's halves by angle(position): y = x*cos + rotate_half(x)*sin"),
    OpSpec("PagedAttention", DOMAIN,
           ("q (T, H*hd) float", "k (T, Hkv*hd) float", "v (T, Hkv*hd) float",
            "k_cache (blocks, block_size, Hkv, hd) float", "v_cache (blocks, block_size, Hkv, hd) float",
            "slot_mapping (T,) int64", "block_tables (B, max_blocks) int64", "seq_lens (B,) int64",
            "query_start_loc (B+1,) int64"),
           ("y (T, H*hd) float", "k_cache_out (aliases k_cache)", "v_cache_out (aliases v_cache)"),
           {"num_heads": "int", "num_kv_heads": "int", "head_dim": "int", "scale": "float",
            "sliding_window": "int = 0 (none)", "softcap": "float = 0 (none)",
            "causal": "int = 1 (0: bidirectional, an encoder's)"},
           "// write k, v at slot_mapping, then each token attends causally to its sequence's cache (causal 0: "
           "to all seq_lens[b] cached tokens of it: an encoder, whose prompt runs in one step); softcap caps the "
           "scaled logits s to softcap * tanh(s / softcap) before the softmax",
           aliases={1: 3, 2: 4}),
    OpSpec("SiluMul", DOMAIN, ("gate (T, F) float", "up (T, F) float"), ("y (T, F) float",), {},
           "// y = silu(gate) * up"),
    OpSpec("Add", "", ("a (T, D) float", "b (T, D) float"), ("y (T, D) float",), {},
           "// y = a + b (residual)"),
    OpSpec("LayerNorm", DOMAIN, ("x (T, D) float", "weight (D,) float", "bias? (D,) float"), ("y (T, D) float",),
           {"epsilon": "float"},
           "// y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, statistics in float32"),
    OpSpec("GeluMul", DOMAIN, ("gate (T, F) float", "up (T, F) float"), ("y (T, F) float",), {},
           "// y = gelu_tanh(gate) * up (GeGLU)"),
    OpSpec("Activation", DOMAIN, ("x (T, F) float",), ("y (T, F) float",),
           {"kind": "str: 'relu' | 'gelu' (erf) | 'gelu_tanh'"},
           "// y = kind(x), a non-gated MLP's activation"),
    OpSpec("Scale", DOMAIN, ("x (T, D) float",), ("y (T, D) float",), {"factor": "float"},
           "// y = x * factor, the factor rounded to x's dtype first (Gemma's embedding normalizer)"),
    OpSpec("Softcap", DOMAIN, ("x (T, D) float",), ("y (T, D) float",), {"cap": "float"},
           "// y = cap * tanh(x / cap) (Gemma 2's final logits; cap 1: tanh, BERT's pooler)"),
    OpSpec("MoE", DOMAIN,
           ("x (T, D) float", "router_logits (T, E) float", "w_gate (E, F, D) float", "w_up (E, F, D) float",
            "w_down (E, D, F) float", "shared? (T, D) float", "shared_gate? (T, 1) float"),
           ("y (T, D) float",),
           {"top_k": "int", "norm_topk_prob": "int = 0", "gate_format": "str = 'dense'", "up_format": "str = 'dense'",
            "down_format": "str = 'dense'"},
           "// p = softmax(router_logits) in float32; each token's top_k experts e (weights p_e, renormalised to "
           "sum 1 when norm_topk_prob) give y = sum_e p_e * (silu(x W_gate[e]^T) * (x W_up[e]^T)) W_down[e]^T; "
           "with shared: y += sigmoid(shared_gate) * shared (Qwen2-MoE's shared expert). Each expert's weights are "
           "read once a step for all the tokens routed to it",
           weights={2: "gate_format", 3: "up_format", 4: "down_format"}),
    OpSpec("LoRA", DOMAIN,
           ("x (T, K) float", "y (T, N) float", "a (L, R, K) float32", "b (L, N, R) float32", "scale (L,) float32",
            "lora_ids (T,) int64"),
           ("out (T, N) float",), {},
           "// out[t] = y[t] + scale[l] * (x[t] a[l]^T) b[l]^T with l = lora_ids[t], y[t] where l < 0: each row's "
           "adapter on a Linear's output y, the product in float32 and rounded once; slots L of rank R, zero "
           "where an adapter is smaller or absent",
           infer=lambda s: s[1]),
]}

# graph inputs every exported LLM graph takes, in order (then each layer's cache_input_names)
GRAPH_INPUTS = {
    "input_ids": "(T,) int64",
    "positions": "(T,) int64",
    "slot_mapping": "(T,) int64",
    "block_tables": "(B, max_blocks) int64",
    "seq_lens": "(B,) int64",
    "query_start_loc": "(B+1,) int64",
    "logits_indices": "(N,) int64",
}
# graph inputs a graph takes only when its model reads them (StepInputs' optional fields)
OPTIONAL_GRAPH_INPUTS = {
    "token_type_ids": "(T,) int64",  # BERT's segment of each token (0: first text, 1: the pair's second)
    "lora_ids": "(T,) int64",        # each token's LoRA slot (-1: none): graphs exported with LoRA slots
}
LOGITS = "logits"  # the graph's output: (N, V) logits of the logits_indices rows; a pooling model's (N, W) rows


def cache_input_names(layer: int) -> tuple[str, str]:
    """The graph inputs of a layer's paged KV cache, each (num_blocks, block_size, ...)."""
    return f"k_cache.{layer}", f"v_cache.{layer}"


def cache_output_name(name: str) -> str:
    """The graph output that names a cache input again after PagedAttention updated it."""
    base, layer = name.rsplit(".", 1)
    return f"{base}_out.{layer}"


def is_cache_input(name: str) -> bool:
    return name.startswith(("k_cache.", "v_cache."))
