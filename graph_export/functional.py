"""The op table (ops.py) as torch functions: the layer every model is written against.

Called eagerly, each function computes its op with torch; these bodies are the reference
that every plugin is compared with, and the `torch` plugin runs them. While
`graph_export.export` traces a model's forward, each call also records its ONNX node
(`tracer` is set for the duration, in that thread only), so a model is written once and exported as it runs.
Shapes as in ops.py: T tokens in the step, B sequences, N logits rows.
"""

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as TF

KVCache = tuple[torch.Tensor, torch.Tensor]  # one layer's (k_cache, v_cache), each (blocks, block_size, Hkv, hd)


@dataclass
class StepInputs:
    """One engine step's graph inputs (ops.GRAPH_INPUTS) as int64 tensors."""

    input_ids: torch.Tensor        # (T,)
    positions: torch.Tensor        # (T,)
    slot_mapping: torch.Tensor     # (T,): the cache slot each new token's K/V goes to
    block_tables: torch.Tensor     # (B, max_blocks): each sequence's blocks, 0-padded
    seq_lens: torch.Tensor         # (B,): tokens in the cache after this step
    query_start_loc: torch.Tensor  # (B+1,): sequence b's new tokens are rows [qsl[b], qsl[b+1])
    logits_indices: torch.Tensor   # (N,): the rows of T whose logits are computed
    token_type_ids: torch.Tensor | None = None  # (T,): BERT's segment ids (ops.OPTIONAL_GRAPH_INPUTS)
    lora_ids: torch.Tensor | None = None        # (T,): each token's LoRA slot, -1 for none


class _Tracer(Protocol):
    def record(self, op_type: str, inputs: list[Any], outputs: list[torch.Tensor], **attrs: Any) -> None: ...


# set by graph_export.export while it traces a forward, for that thread (or task) only
tracer: ContextVar[_Tracer | None] = ContextVar("perfxlm_tracer", default=None)


def _record(op_type: str, inputs: list[Any], outputs: list[torch.Tensor], **attrs: Any) -> torch.Tensor:
    t = tracer.get()
    if t is not None:
        t.record(op_type, inputs, outputs, **attrs)
    return outputs[0]


def embedding(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table (V, D)[ids (T,)] -> (T, D). Also picks rows of a hidden state (gather_rows)."""
    return _record("Gather", [table, ids], [torch.index_select(table, 0, ids)], axis=0)


gather_rows = embedding  # hidden (T, D)[logits_indices (N,)] -> (N, D): the same Gather op


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int | None = None) -> torch.Tensor:
    """x (T, D) -> weight * x / sqrt(mean(x^2) + eps); normalised in float32 whatever the
    dtype, then scaled in x's dtype (HF's LlamaRMSNorm). With group_size, each consecutive
    group of that many features is normalised on its own and weight is (group_size,): the
    per-head q/k norm of Qwen3 and Gemma 3 on x (T, H*hd) with group_size=hd."""
    T, D = x.shape
    g = int(group_size or 0)
    if g and D % g:
        raise ValueError(f"rms_norm: group_size {g} does not divide the row width {D}")
    xf = x.float().view(T, -1, g or D)                                      # (T, groups, g)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (weight * xf.to(x.dtype)).view(T, D)
    attrs = {"group_size": g} if g and g != D else {}  # the whole row: today's graphs, no attribute
    return _record("RMSNorm", [x, weight], [y], epsilon=float(eps), **attrs)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (T, D) -> (x - mean) / sqrt(var + eps) * weight + bias (bias (D,) optional), the
    statistics and affine in float32, rounded once to x's dtype (torch's CPU LayerNorm)."""
    y = TF.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return _record("LayerNorm", [x, weight] + ([bias] if bias is not None else []), [y.to(x.dtype)],
                   epsilon=float(eps))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_format: str = "dense") -> torch.Tensor:
    """x (T, K) @ weight (N, K)^T + bias (N,) -> (T, N). With a weight_format other than
    'dense', weight holds GGUF blocks (uint8 (N, K/32 * block bytes)), dequantised here once.
    A dense weight may be bfloat16 under float32 x: its values widen exactly, the product is fp32."""
    w = _weight(weight, weight_format, x.dtype)
    y = TF.linear(x, w, bias)
    return _record("Linear", [x, weight] + ([bias] if bias is not None else []), [y])


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         head_dim: int) -> torch.Tensor:
    """x (T, H*hd): rotate each head's halves by its position's angle (HF's rotate_half);
    cos, sin (max_pos, hd) tables in x's dtype."""
    T = x.shape[0]
    xh = x.view(T, -1, head_dim)                                    # (T, H, hd)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (T, 1, hd)
    x1, x2 = xh.chunk(2, dim=-1)
    y = xh * c + torch.cat((-x2, x1), dim=-1) * s
    return _record("RoPE", [x, positions, cos, sin], [y.reshape(T, -1)], head_dim=int(head_dim))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, step: StepInputs, *,
                    num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                    sliding_window: int = 0, softcap: float = 0.0, causal: bool = True) -> torch.Tensor:
    """Write k, v (T, Hkv*hd) to the cache slots step.slot_mapping, then each token of q
    (T, H*hd) attends causally over its sequence's cached keys (the last `sliding_window`
    of them when that is set) -> (T, H*hd). The caches are updated in place. A nonzero
    softcap caps the scaled logits s to softcap * tanh(s / softcap) before the softmax
    (Gemma 2). causal=False: every token attends to all of its sequence's seq_len cached
    keys (an encoder such as BERT, whose whole prompt is one step; no window)."""
    if not causal and sliding_window:
        raise ValueError("paged_attention: a sliding window needs causal attention")
    k_cache, v_cache = kv_cache
    T = q.shape[0]
    # (a cache in another dtype than k, v: a bf16 model's under float32 activations, rounds them)
    k_cache.view(-1, num_kv_heads, head_dim)[step.slot_mapping] = k.view(T, num_kv_heads, head_dim).to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[step.slot_mapping] = v.view(T, num_kv_heads, head_dim).to(v_cache.dtype)
    y = _attend(q.view(T, num_heads, head_dim), k_cache, v_cache, step, scale, sliding_window,
                float(softcap or 0.0), bool(causal)).view(T, -1)
    inputs = [q, k, v, k_cache, v_cache, step.slot_mapping, step.block_tables, step.seq_lens, step.query_start_loc]
    extra = {"softcap": float(softcap)} if softcap else {}  # none: today's graphs, no attribute
    if not causal:  # likewise: a decoder's graph has no causal attribute
        extra["causal"] = 0
    return _record("PagedAttention", inputs, [y, k_cache, v_cache], num_heads=int(num_heads),
                   num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), scale=float(scale),
                   sliding_window=int(sliding_window or 0), **extra)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, both (T, F)."""
    return _record("SiluMul", [gate, up], [TF.silu(gate) * up])


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, both (T, F): Gemma's GeGLU (HF's gelu_pytorch_tanh)."""
    return _record("GeluMul", [gate, up], [TF.gelu(gate, approximate="tanh") * up])


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """kind(x) for x (T, F), kind one of ops.ACTIVATION_KINDS: 'relu' (OPT), 'gelu' (erf,
    BERT), 'gelu_tanh' (GPT-2's gelu_new): the activation of a non-gated MLP."""
    if kind == "relu":
        y = TF.relu(x)
    elif kind in ("gelu", "gelu_tanh"):
        y = TF.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")
    else:
        raise ValueError(f"activation: unknown kind {kind!r} (one of relu, gelu, gelu_tanh)")
    return _record("Activation", [x], [y], kind=kind)


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x (T, D) * factor, the factor rounded to x's dtype first, as HF's Gemma multiplies
    its embeddings by torch.tensor(hidden_size ** 0.5, dtype=hidden.dtype)."""
    return _record("Scale", [x], [x * torch.tensor(factor, dtype=x.dtype)], factor=float(factor))


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) for x (T, D), in x's dtype: Gemma 2's final logit soft-capping."""
    return _record("Softcap", [x], [torch.tanh(x / cap) * cap], cap=float(cap))


def moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
        w_down: torch.Tensor, *, top_k: int, norm_topk_prob: bool, shared: torch.Tensor | None = None,
        shared_gate: torch.Tensor | None = None, gate_format: str = "dense", up_format: str = "dense",
        down_format: str = "dense") -> torch.Tensor:
    """A sparse mixture-of-experts SwiGLU MLP on x (T, D) -> (T, D). Each token goes to the
    top_k of its softmax(router_logits (T, E)) experts (probabilities in float32, renormalised
    to sum 1 when norm_topk_prob: Mixtral, Qwen3-MoE); expert e computes
    (silu(x w_gate[e]^T) * (x w_up[e]^T)) w_down[e]^T with w_gate, w_up (E, F, D), w_down (E, D, F),
    and the token sums its experts' outputs times their probabilities. With Qwen2-MoE's shared
    expert, its output shared (T, D) is added, scaled by sigmoid(shared_gate (T, 1)).
    Expert by expert over the tokens routed to it, as HF's MixtralExperts, so float32 results
    match it; a *_format other than 'dense' means that weight holds GGUF blocks (E, N, row bytes)."""
    T, E = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)                     # (T, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)                      # (T, k) each
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    wg, wu, wd = (_weight(w, f, x.dtype)
                  for w, f in ((w_gate, gate_format), (w_up, up_format), (w_down, down_format)))
    y = torch.zeros_like(x)
    for e in torch.unique(experts).tolist():                                 # ascending; experts without tokens skipped
        tokens, slot = torch.where(experts == e)
        xe = x[tokens]                                                       # (Te, D)
        h = TF.linear(TF.silu(TF.linear(xe, wg[e])) * TF.linear(xe, wu[e]), wd[e])  # (Te, D)
        y.index_add_(0, tokens, (h * weights[tokens, slot, None]).to(x.dtype))
    inputs = [x, router_logits, w_gate, w_up, w_down]
    if shared is not None:
        y = y + torch.sigmoid(shared_gate) * shared
        inputs += [shared, shared_gate]
    formats = {k: v for k, v in (("gate_format", gate_format), ("up_format", up_format),
                                 ("down_format", down_format)) if v != "dense"}
    return _record("MoE", inputs, [y], top_k=int(top_k), norm_topk_prob=int(bool(norm_topk_prob)), **formats)


def lora(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
         lora_ids: torch.Tensor) -> torch.Tensor:
    """y (T, N), a Linear's output on x (T, K), plus each row's adapter: scale[l] * (x a[l]^T) b[l]^T
    for l = lora_ids[t] (a (L, R, K), b (L, N, R), scale (L,), float32); rows with l < 0 keep y.
    The product is computed in float32 and added to y once, rounded to y's dtype."""
    out = y.clone()
    rows = (lora_ids >= 0).nonzero().flatten()
    if rows.numel():
        l = lora_ids[rows]
        xa = torch.bmm(a[l], x[rows].float().unsqueeze(-1)).squeeze(-1) * scale[l].unsqueeze(-1)  # (n, R)
        delta = torch.bmm(b[l], xa.unsqueeze(-1)).squeeze(-1)                                       # (n, N)
        out[rows] = (y[rows].float() + delta).to(y.dtype)
    return _record("LoRA", [x, y, a, b, scale, lora_ids], [out])


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, both (T, D): the residual stream."""
    return _record("Add", [a, b], [a + b])


# ---- internals ------------------------------------------------------------------------

_DEQUANTIZED: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _weight(w: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """A Linear / expert weight in the activations' dtype: GGUF blocks dequantised, bf16 widened."""
    if fmt != "dense":
        return _dequantized(w, fmt, dtype)
    return w if w.dtype == dtype else w.to(dtype)


def _dequantized(blocks: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    key = (blocks.data_ptr(), fmt, dtype)
    hit = _DEQUANTIZED.get(key)
    if hit is None or hit[0] is not blocks:
        from graph_export.quant import dequantize
        w = torch.from_numpy(dequantize(blocks.cpu().numpy(), fmt)).to(dtype=dtype, device=blocks.device)
        hit = _DEQUANTIZED[key] = (blocks, w)
    return hit[1]


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: StepInputs, scale: float,
            sliding_window: int, softcap: float = 0.0, causal: bool = True) -> torch.Tensor:
    """q (T, H, hd) over the paged caches -> (T, H, hd). Decode rows (one new token) run as
    one padded batch; each prefill chunk runs alone, so a long prompt beside many decodes
    pads nothing. (A one-token row sees its whole sequence either way: causal or not.)"""
    out = torch.empty_like(q)
    starts = step.query_start_loc.tolist()
    seq_lens = step.seq_lens.tolist()
    decode = [b for b in range(len(seq_lens)) if starts[b + 1] - starts[b] == 1]
    if decode:
        rows = torch.tensor([starts[b] for b in decode])
        idx = torch.tensor(decode)
        max_len = max(seq_lens[b] for b in decode)
        k, v = _gather(k_cache, v_cache, step.block_tables[idx], max_len, q.dtype)  # (D, S, Hkv, hd)
        key_pos = torch.arange(max_len)
        lens = step.seq_lens[idx].unsqueeze(1)                               # (D, 1)
        mask = key_pos < lens                                                 # (D, S)
        if sliding_window:
            mask &= key_pos >= lens - sliding_window
        o = _sdpa(q[rows].unsqueeze(2),                                       # (D, H, 1, hd)
                  k.transpose(1, 2), v.transpose(1, 2),                       # (D, Hkv, S, hd)
                  mask[:, None, None, :], scale, softcap)
        out[rows] = o.squeeze(2)
    for b, seq_len in enumerate(seq_lens):
        n = starts[b + 1] - starts[b]
        if n == 1:
            continue
        k, v = _gather(k_cache, v_cache, step.block_tables[b:b + 1], seq_len, q.dtype)  # (1, S, Hkv, hd)
        qb = q[starts[b]:starts[b] + n].transpose(0, 1).unsqueeze(0)           # (1, H, n, hd)
        q_pos = torch.arange(seq_len - n, seq_len).unsqueeze(1)                # (n, 1)
        key_pos = torch.arange(seq_len)
        mask = key_pos <= q_pos if causal else torch.ones(n, seq_len, dtype=torch.bool)  # (n, S)
        if sliding_window:
            mask &= key_pos > q_pos - sliding_window
        o = _sdpa(qb, k.transpose(1, 2), v.transpose(1, 2), mask, scale, softcap)
        out[starts[b]:starts[b] + n] = o[0].transpose(0, 1)
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
          softcap: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q (B, H, n, hd), k, v (B, Hkv, S, hd), mask
    broadcastable to (B, H, n, S) -> (B, H, n, hd). SDPA has no soft-capping, so a capped
    call spells it out as HF's eager Gemma 2 does: cap the scaled logits, mask, softmax in float32."""
    if not softcap:
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                              # (B, H, n, S)
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return torch.matmul(p, v)


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of each row of block_tables -> 2 x (B, length, Hkv, hd),
    in dtype (the queries': a bf16 cache under float32 activations is widened)."""
    block_size = k_cache.shape[1]
    blocks = block_tables[:, :(length + block_size - 1) // block_size]
    return (k_cache[blocks].flatten(1, 2)[:, :length].to(dtype), v_cache[blocks].flatten(1, 2)[:, :length].to(dtype))


def _run_paged_attention(attrs: dict, ins: list[torch.Tensor]) -> torch.Tensor:
    q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc = ins
    none: Any = None  # attention reads only the cache metadata of the step
    step = StepInputs(input_ids=none, positions=none, slot_mapping=slot_mapping, block_tables=block_tables,
                      seq_lens=seq_lens, query_start_loc=query_start_loc, logits_indices=none)
    return paged_attention(q, k, v, (k_cache, v_cache), step, num_heads=attrs["num_heads"],
                           num_kv_heads=attrs["num_kv_heads"], head_dim=attrs["head_dim"], scale=attrs["scale"],
                           sliding_window=attrs.get("sliding_window", 0), softcap=attrs.get("softcap", 0.0),
                           causal=bool(attrs.get("causal", 1)))


# op type -> (attrs, inputs) -> output: how the torch plugin runs a graph node with these bodies
KERNELS = {
    "Gather": lambda attrs, ins: embedding(*ins),
    "RMSNorm": lambda attrs, ins: rms_norm(*ins, attrs["epsilon"], attrs.get("group_size", 0)),
    "Linear": lambda attrs, ins: linear(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                                        attrs.get("weight_format", "dense")),
    "RoPE": lambda attrs, ins: rope(*ins, attrs["head_dim"]),
    "PagedAttention": _run_paged_attention,
    "SiluMul": lambda attrs, ins: silu_mul(*ins),
    "Add": lambda attrs, ins: add(*ins),
    "LayerNorm": lambda attrs, ins: layer_norm(ins[0], ins[1], ins[2] if len(ins) > 2 else None, attrs["epsilon"]),
    "GeluMul": lambda attrs, ins: gelu_mul(*ins),
    "Activation": lambda attrs, ins: activation(ins[0], attrs["kind"]),
    "Scale": lambda attrs, ins: scale(ins[0], attrs["factor"]),
    "Softcap": lambda attrs, ins: softcap(ins[0], attrs["cap"]),
    "MoE": lambda attrs, ins: moe(*ins[:5], top_k=attrs["top_k"], norm_topk_prob=bool(attrs.get("norm_topk_prob", 0)),
                                  shared=ins[5] if len(ins) > 5 else None, shared_gate=ins[6] if len(ins) > 6 else None,
                                  **{k: attrs[k] for k in ("gate_format", "up_format", "down_format") if k in attrs}),
    "LoRA": lambda attrs, ins: lora(*ins),
}
