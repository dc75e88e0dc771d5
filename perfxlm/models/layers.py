"""Building blocks shared by the model families: modules that hold weights and call the
functional op layer (graph_export.functional), the RoPE tables, and the model interface.

Every family is one file of plain PyTorch made of these; see docs/adding_a_model.md.
"""

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from graph_export import functional as F
from graph_export.functional import KVCache, StepInputs


class CausalLM(nn.Module):
    """What the loader, the exporter and the eager executor need of a model family.

    forward(step, kv_caches) computes one engine step's logits (N, V) through
    graph_export.functional only; the exporter traces that same forward into the graph.
    """

    # HF checkpoint tensor name -> parameter name: (regex, replacement), first match wins
    hf_weight_names: ClassVar[list[tuple[str, str]]] = []
    # HF checkpoint tensors the family does not use (regexes): computed buffers saved by old checkpoints
    hf_ignored_names: ClassVar[tuple[str, ...]] = (r"rotary_emb",)
    # GGUF tensor base name -> parameter name; '{}' is the layer of 'blk.{layer}.<base>'
    gguf_weight_names: ClassVar[dict[str, str]] = {}
    # llama.cpp's general.architecture -> the HF architecture it loads as
    gguf_architectures: ClassVar[dict[str, str]] = {}
    # ops.OPTIONAL_GRAPH_INPUTS the forward reads (BERT's token_type_ids); the runner feeds them
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    # A pooling model (vLLM's runner "pooling") returns, for the logits_indices rows, hidden states
    # (pooling_task "embed") or classifier logits ("classify") instead of vocabulary logits.
    pooling_task: ClassVar[str | None] = None
    default_seq_pooling_type: ClassVar[str] = "LAST"   # vLLM's default for the family: CLS, LAST or MEAN
    is_causal: ClassVar[bool] = True   # False: a bidirectional encoder, whose prompt must run in one step
    vocab_size: int  # logits per row (a pooling model's: hidden size or classes); set by the family's __init__

    @classmethod
    def config_from_gguf(cls, gguf: Any, architecture: str) -> dict[str, Any]:
        """The HF config dict equivalent to a GGUF's metadata (`gguf.get(key)` reads llama.cpp's
        `{arch}.{key}`; also gguf.meta, gguf.tensor_names, gguf.vocab_size). The default reads
        the keys llama.cpp writes for every llama-like architecture; a missing one raises."""
        names = gguf.tensor_names
        n_heads, dim = gguf.get("attention.head_count"), gguf.get("embedding_length")
        cfg = {
            "architectures": [architecture],
            "model_type": gguf.arch,
            "vocab_size": gguf.vocab_size,
            "hidden_size": dim,
            "num_hidden_layers": gguf.get("block_count"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": gguf.get("attention.head_count_kv", n_heads),
            "head_dim": gguf.get("attention.key_length", dim // n_heads),
            "intermediate_size": gguf.get("feed_forward_length"),
            "rms_norm_eps": float(gguf.get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(gguf.get("rope.freq_base", 10000.0)),
            "max_position_embeddings": gguf.get("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": gguf.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": gguf.meta.get("tokenizer.ggml.eos_token_id"),
            "attention_bias": "blk.0.attn_q.bias" in names,
        }
        if gguf.get("rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": gguf.get("rope.scaling.factor")}
        return cfg

    @classmethod
    def params_from_hf(cls, config: dict[str, Any]) -> Any:
        """The family's parameters from an HF config dict; a missing required key raises KeyError."""
        raise NotImplementedError

    def kv_cache_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per layer, the shapes of one cache slot of its K and V caches (after blocks, block_size)."""
        raise NotImplementedError

    def forward(self, step: StepInputs, kv_caches: list[KVCache]) -> torch.Tensor:
        raise NotImplementedError

    def after_load(self) -> None:
        """Called once by the loader when every parameter holds its checkpoint tensor (in the
        run dtype), before the model is used: rewrite here what the checkpoint stores in
        another layout than forward computes with. Default: each submodule's own
        `after_load()`, where it has one (FusedLinear, Gemma's norms)."""
        for module in self.modules():
            hook = getattr(module, "after_load", None)
            if module is not self and hook is not None:
                hook()

    @classmethod
    def gguf_tensor(cls, name: str, rows: np.ndarray, params: Any, gguf_arch: str) -> np.ndarray:
        """A GGUF tensor (float rows, or whole-block byte rows) as the parameter `name` wants its
        rows ordered: undo a convert-time layout change here. Default: as stored."""
        return rows


class Linear(nn.Module):
    """y = x @ weight^T (+ bias): weight (out_features, in_features). An engine with LoRA on gives
    it a `lora` child (perfxlm.models.lora.LoRASlots) that adds each row's adapter to y."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.lora: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.lora is None else self.lora(x, y)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.weight, ids)


class FusedLinear(nn.Module):
    """A checkpoint tensor that stacks several projections' rows (Phi-3's qkv_proj and
    gate_up_proj): loaded as one `weight` (sum(sizes), in_features), run as one Linear per part.

    The graph has no split op, so the split happens on the weight, not the activation: once the
    loader has filled `weight` (after_load), the parts are derived as buffers (row views of it,
    reordered where `row_orders` gives an order: a copy). Only the parts are read by forward,
    so only they go into an exported graph."""

    def __init__(self, in_features: int, sizes: list[int], row_orders: list[list[int] | None] | None = None) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.row_orders = list(row_orders or [None] * len(sizes))
        self.weight = nn.Parameter(torch.empty(sum(sizes), in_features))
        self.after_load()  # (parts of the empty weight, so a model built without weights has their shapes)

    def after_load(self) -> None:
        for i, (part, order) in enumerate(zip(self.weight.detach().split(self.sizes), self.row_orders)):
            self.register_buffer(f"part{i}", part if order is None else part[order], persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (T, in) -> one (T, sizes[i]) per part."""
        return [F.linear(x, getattr(self, f"part{i}")) for i in range(len(self.sizes))]


class RotaryTables(nn.Module):
    """cos, sin (max_pos, head_dim) for F.rope, halves layout, with the scaling's attention
    factor (mscale) folded in as HF and vLLM do. Built on the CPU in float32 even when the model
    is created on the meta device (they are computed, not loaded); the loader casts them to the
    model's dtype with the rest.

    Partial rotary (rotary_dim < head_dim): HF rotates the pairs (i, i + rotary_dim/2) of each
    head's first rotary_dim features and passes the rest; the RoPE op rotates the pairs
    (i, i + head_dim/2). The two agree once each head's q/k features are reordered by
    `partial_rotary_order` (rotated first half, passed first half, rotated second half, passed
    second half): the family applies that order to the q and k weight rows at load, and the
    passed features get cos 1, sin 0 here. Attention scores q.k are unchanged by a
    permutation applied to both q and k, and v is not reordered."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling: dict[str, Any] | None,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        rot = rotary_dim or head_dim
        if rot % 2 or rot > head_dim or (head_dim - rot) % 2:
            raise ValueError(f"rotary dimension {rot} does not fit head_dim {head_dim}")
        inv_freq, mscale = rope_frequencies(rot, theta, scaling, max_positions)      # (rot/2,)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)                                             # (max_pos, rot/2)
        cos, sin = freqs.cos() * mscale, freqs.sin() * mscale
        passed = (head_dim - rot) // 2
        if passed:
            ones = torch.ones(max_positions, passed, device="cpu")                   # passed features: cos 1, sin 0
            cos, sin = torch.cat((cos, ones), dim=-1), torch.cat((sin, ones * 0), dim=-1)  # (max_pos, hd/2)
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)    # (max_pos, hd)
        self.register_buffer("sin", torch.cat((sin, sin), dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
        return F.rope(x, positions, self.cos, self.sin, head_dim)


def partial_rotary_order(n_heads: int, head_dim: int, rotary_dim: int) -> list[int] | None:
    """The row order of a q/k projection (n_heads * head_dim rows) under which the RoPE op's
    halves rotation equals HF's rotation of each head's first rotary_dim features (see
    RotaryTables); None when the whole head rotates."""
    if rotary_dim >= head_dim:
        return None
    half, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
    head = [*range(half), *range(rotary_dim, rotary_dim + rest),
            *range(half, rotary_dim), *range(rotary_dim + rest, head_dim)]
    return [h * head_dim + i for h in range(n_heads) for i in head]


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "su", "dynamic")


def rope_type(scaling: dict[str, Any] | None) -> str:
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


def rope_scaling_from_hf(cfg: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """The config's RoPE scaling (`rope_scaling`, or transformers 5's `rope_parameters`) with
    `rope_type` set, or None for plain RoPE; an unknown type raises ValueError naming it and
    the supported ones (before any weight is read). A top-level
    `original_max_position_embeddings` (Phi-3's) takes precedence, as in transformers."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    kind = rope_type(scaling)
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported for {arch}; supported: {list(ROPE_TYPES)}")
    if kind == "default":
        return None
    scaling = {**scaling, "rope_type": kind}
    if cfg.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return scaling


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Llama-style scalings that only stretch the frequencies (default, linear, llama3)."""
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1's frequency-dependent stretch for long context
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {list(ROPE_TYPES)}")


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None,
                     max_positions: int) -> tuple[torch.Tensor, float]:
    """inv_freq (dim/2,) float32 and the attention factor cos/sin are multiplied by, for `dim`
    rotated features. `max_positions` is the config's max_position_embeddings, which is the
    engine's max_model_len (perfxlm derives it so, as vLLM does by default)."""
    kind = rope_type(scaling)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim   # (dim/2,)
    if kind in ("default", "linear", "llama3"):
        return scaled_inv_freq(1.0 / theta ** exponents, scaling), 1.0
    original = scaling.get("original_max_position_embeddings") or max_positions
    if kind == "dynamic":
        # vLLM's DynamicNTKScalingRotaryEmbedding: one base for the whole context,
        # max_position * factor long (HF instead re-derives it per forward from the sequence length)
        factor = scaling["factor"]
        base = theta * (factor * factor - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** exponents, 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, original, max_positions)
    # longrope / su (Phi-3): per-frequency factors, the long table when the context may exceed the
    # pretraining length. HF picks per forward by the sequence length; vLLM once, by
    # max_model_len > original_max_position_embeddings: we follow vLLM.
    use_long = max_positions > original
    ext = torch.tensor(scaling["long_factor" if use_long else "short_factor"], dtype=torch.float32, device="cpu")
    if ext.shape != exponents.shape:
        raise ValueError(f"longrope factors have {ext.numel()} entries; the rotary dimension {dim} needs {dim // 2}")
    factor = scaling.get("factor") or max_positions / original
    mscale = scaling.get("attention_factor") or scaling.get("long_mscale" if use_long else "short_mscale")
    if mscale is None:
        mscale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0 / (ext * theta ** exponents), float(mscale)


def _yarn(dim: int, theta: float, scaling: dict[str, Any], original: int,
          max_positions: int) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen, DeepSeek): interpolate the low frequencies, keep the high ones, ramp between;
    the attention factor 0.1 ln(factor) + 1 (DeepSeek: the ratio of its mscale terms)."""
    factor = scaling.get("factor") or max_positions / original

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale = scaling.get("attention_factor")
    if mscale is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        mscale = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)   # (dim/2,)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(mscale)
