"""Find a model (local path, HF cache, embedded default) and load its weights and tokenizer."""

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from perfxlm.models import default_model
from perfxlm.models.gguf_file import GGUFFile
from perfxlm.models.registry import build_model

logger = logging.getLogger(__name__)

# HF checkpoint name -> Transformer parameter name
_HF_RENAMES = [
    (r"^model\.embed_tokens\.", "tok_embeddings."),
    (r"^model\.norm\.", "norm."),
    (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.self_attn\.q_proj\.", r"layers.\1.attention.wq."),
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj\.", r"layers.\1.attention.wk."),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj\.", r"layers.\1.attention.wv."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"layers.\1.attention.wo."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"layers.\1.feed_forward.w1."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"layers.\1.feed_forward.w3."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"layers.\1.feed_forward.w2."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.attention_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.ffn_norm."),
]


@dataclass
class ModelSource:
    """A located model: an HF directory or a GGUF file."""

    name: str                          # what the user asked for
    path: Path                         # HF directory, or the .gguf file
    is_gguf: bool
    hf_config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    _gguf: GGUFFile | None = field(default=None, repr=False)

    def linear_blocks(self) -> dict:
        """GGUF Linear weights kept as quantised blocks (see GGUFFile.linear_blocks); {} otherwise."""
        return self._gguf.linear_blocks() if self.is_gguf else {}

    def is_quantized(self) -> bool:
        return self.is_gguf and self._gguf.has_native_blocks()

    def load_weights(self, dtype: torch.dtype) -> nn.Module:
        model = build_model(self.hf_config)
        if self.is_gguf:
            state = self._gguf.state_dict(dtype)
        else:
            state = {_rename(k): v.to(dtype) for k, v in _read_hf_tensors(self.path).items()
                     if "rotary_emb" not in k}
        if self.hf_config.get("tie_word_embeddings"):
            state.pop("output.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (m == "output.weight" and self.hf_config.get("tie_word_embeddings"))]
        if missing or unexpected:
            raise ValueError(f"Weights of {self.name} do not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if self.hf_config.get("tie_word_embeddings"):
            model.output.weight = model.tok_embeddings.weight
        # non-persistent buffers (RoPE tables) were built on meta: rebuild them for real
        from perfxlm.models.llama import rope_cache
        model.rope_cos, model.rope_sin = rope_cache(model.params)
        return model.eval()

    def load_tokenizer(self, **kwargs: Any) -> Any:
        if self.is_gguf:
            return self._gguf.tokenizer()
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.path), **kwargs)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, **kwargs: Any) -> Any:
    """The model's tokenizer, or the one `tokenizer` names (a path, an HF repo id, a .gguf)."""
    if tokenizer is None:
        return source.load_tokenizer(**kwargs)
    path = Path(tokenizer).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFFile(path).tokenizer()
    if path.is_dir():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    return resolve_model(tokenizer).load_tokenizer(**kwargs)


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """Locate `model`: a local path, then the HF cache, then the embedded default."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(model, path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _hf_source(model, path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(model, ggufs[0])
        raise ValueError(f"{path} has no config.json and {len(ggufs)} .gguf files; "
                         "point `model` at one .gguf file or an HF model directory.")
    cached = _hf_cache_dir(model, revision)
    if cached is not None:
        return _hf_source(model, cached)
    if default_model.is_embedded(model):
        gguf = default_model.embedded_gguf_path()
        logger.info("%s: using the embedded Q4_1 GGUF variant (%s), dequantised at load", model, gguf)
        return _gguf_source(model, gguf)
    hf_home = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    raise ValueError(
        f"Model {model!r} not found. perfxlm looked for a local file or directory {str(path)!r}, "
        f"for {model!r} in the Hugging Face cache ({hf_home}), and among the embedded models "
        f"{list(default_model.EMBEDDED_NAMES)}. Nothing is downloaded from a model hub; "
        "pass a local HF directory or .gguf file.")


def _gguf_source(name: str, path: Path) -> ModelSource:
    gguf = GGUFFile(path)
    cfg = gguf.hf_config()
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    return ModelSource(name, path, True, cfg, gen, gguf)


def _hf_source(name: str, path: Path) -> ModelSource:
    cfg = json.loads((path / "config.json").read_text())
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return ModelSource(name, path, False, cfg, gen)


def _hf_cache_dir(repo_id: str, revision: str | None) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as e:  # not cached (or hub library missing): not an error here
        logger.debug("%s not in the HF cache: %s", repo_id, e)
        return None


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise ValueError(f"No *.safetensors or pytorch_model*.bin weights in {path}")


def _rename(name: str) -> str:
    for pattern, repl in _HF_RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name
