"""Find a model (local path, HF cache, embedded default) and load its weights and tokenizer.

Imports no torch until weights are read: a deployable directory (models/deployable.py) is
found here too, on machines without PyTorch."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perfxlm.models import default_model
from perfxlm.models.deployable import DeployableSource, is_deployable, read_json
from perfxlm.tokenizer import load_tokenizer_files

if TYPE_CHECKING:
    import torch

    from perfxlm.models.gguf_file import GGUFFile
    from perfxlm.models.layers import CausalLM

logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """A located model: an HF directory or a GGUF file, its family checked against its config."""

    name: str                          # what the user asked for
    path: Path                         # HF directory, or the .gguf file
    is_gguf: bool
    hf_config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    _gguf: GGUFFile | None = field(default=None, repr=False)
    convert: str = "none"              # vLLM's --convert, resolved: "embed" / "classify" adapt a decoder

    @property
    def config_file(self) -> Path:
        return self.path if self.is_gguf else self.path / "config.json"

    @property
    def family(self) -> type[CausalLM]:
        from perfxlm.models.registry import model_class
        return model_class(self.hf_config.get("architectures") or ["LlamaForCausalLM"], self.convert)

    def params(self) -> Any:
        """The family's parameters; a config that lacks what the family needs names the file and key."""
        try:
            return self.family.params_from_hf(self.hf_config)
        except KeyError as e:
            raise ValueError(f"{self.config_file}: the config has no {e.args[0]!r}, which "
                             f"{self.family.__name__} needs") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.config_file}: {e}") from None

    def linear_blocks(self) -> dict[str, tuple[str, Any]]:
        """GGUF weights kept as quantised blocks (see GGUFFile.linear_blocks); {} otherwise."""
        return self._gguf.linear_blocks(self.family, self.params()) if self.is_gguf else {}

    def is_quantized(self) -> bool:
        return self.is_gguf and self._gguf.has_native_blocks()

    def registered_family(self) -> type[CausalLM] | None:
        """The family registered for the config's architectures, None if none is."""
        from perfxlm.models.registry import registered_family
        return registered_family(self.hf_config.get("architectures") or ["LlamaForCausalLM"])

    @property
    def pooling_task(self) -> str | None:
        return self.family.pooling_task

    def meta_model(self) -> CausalLM:
        """The model with its shapes but no weights (on the meta device): reads nothing."""
        import torch
        with torch.device("meta"):
            return self.family(self.params())

    def load_weights(self, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> CausalLM:
        """The model in `dtype`, its weights read from the checkpoint. With `weight_dtype`
        (bfloat16 under float32), every weight matrix holds values rounded to that dtype, as
        the graph exported with weight_dtype stores them: the model computes what it runs."""
        import torch
        family, params, model = self.family, self.params(), self.meta_model()
        if self.is_gguf:
            state = self._gguf.state_dict(family, params, dtype)
        else:
            ignored = re.compile("|".join(family.hf_ignored_names) or "(?!)")
            state = {hf_parameter_name(family, k): v.to(dtype) for k, v in _read_hf_tensors(self.path).items()
                     if not ignored.search(k)}
            state = _stack_experts(state, self.path)
        for name, t in state.items():  # one at a time, so each unaligned original can go as it is copied
            state[name] = _aligned(t)
        _assign(model, state, self.path)
        with torch.no_grad():
            model.after_load()
            model = model.to(dtype)
            if weight_dtype is not None and weight_dtype != dtype:
                for p in model.parameters():
                    if p.dim() >= 2 and p.is_floating_point():
                        p.copy_(p.to(weight_dtype))
        return model.eval()  # computed buffers (RoPE tables) to the model's dtype too

    def load_tokenizer(self, **kwargs: Any) -> Any:
        if self.is_gguf:
            return self._gguf.tokenizer()
        return load_tokenizer_files(self.path, **kwargs)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t at a 64-byte-aligned address, as torch allocates every CPU tensor: copied if it is a view
    into a checkpoint at an offset its format allows (safetensors promises 8 bytes). The address
    changes results: on AMD CPUs, MKL's fp32 GEMM with one row (a decode step) sums in an order
    set by the weight's address mod 16, so the eager model would differ in the last bits from
    the same weights in the exported graph (~1e-6 on the tiny Llama's logits)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _stack_experts(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """HF checkpoints store a MoE layer's experts one tensor each ('...experts.<i>.w1.weight');
    the model holds each projection of all experts as one (E, ...) parameter, so the tensors
    whose (renamed) name has '.experts.<i>.' are stacked by i under the name without the index
    ('...experts.w1.weight'). Every index from 0 up must be there exactly once."""
    groups: dict[str, dict[int, str]] = {}
    for name in state:
        m = _EXPERT.search(name)
        if m is None:
            continue
        stacked = name[:m.start()] + ".experts." + name[m.end():]
        index = int(m.group(1))
        seen = groups.setdefault(stacked, {})
        if index in seen:
            raise ValueError(f"{path}: expert {index} of {stacked} is in the checkpoint twice "
                             f"({seen[index]} and {name})")
        seen[index] = name
    for stacked, by_index in groups.items():
        gaps = sorted(set(range(max(by_index) + 1)) - set(by_index))
        if gaps:
            raise ValueError(f"{path}: the checkpoint lacks expert(s) {gaps[:8]} of {stacked}: it has "
                             f"{len(by_index)} experts numbered up to {max(by_index)}")
        if stacked in state:
            raise ValueError(f"{path}: {stacked} is in the checkpoint both stacked and expert by expert")
        parts = [state.pop(by_index[i]) for i in range(len(by_index))]  # popped: each original goes once stacked
        if len({p.shape for p in parts}) > 1:
            shapes = sorted({tuple(p.shape) for p in parts})
            raise ValueError(f"{path}: the experts of {stacked} differ in shape: {shapes}")
        import torch
        state[stacked] = torch.stack(parts)
    return state


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Put the checkpoint's tensors in the model's parameters (on the meta device, so shapes
    only); tied parameters (one tensor under several names) take whichever of their names
    the checkpoint has."""
    groups: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(pname)
    missing = []
    for names in groups.values():
        found = next((n for n in names if n in state), None)
        if found is None:
            missing.append(names[0])
            continue
        want = model.get_parameter(names[0]).shape
        if state[found].shape != want:
            raise ValueError(f"{path}: {found} has shape {tuple(state[found].shape)} but "
                             f"{type(model).__name__} expects {tuple(want)} from the config")
        import torch
        param = torch.nn.Parameter(state[found], requires_grad=False)
        for n in names:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)
    known = {n for names in groups.values() for n in names}
    unexpected = sorted(set(state) - known)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, **kwargs: Any) -> Any:
    """The model's tokenizer, or the one `tokenizer` names (a path, an HF repo id, a .gguf)."""
    if tokenizer is None:
        return source.load_tokenizer(**kwargs)
    path = Path(tokenizer).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from perfxlm.models.gguf_file import GGUFFile
        return GGUFFile(path).tokenizer()
    if path.is_dir():
        return load_tokenizer_files(path, **kwargs)
    return resolve_model(tokenizer).load_tokenizer(**kwargs)


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """Locate `model`: a local path, then the HF cache, then the embedded default."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(model, path)
    if path.is_dir():
        if is_deployable(path):  # `perfxlm export -o DIR`: the graph is there, no checkpoint is read
            return DeployableSource.open(model, path)
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
    from perfxlm.models.gguf_file import GGUFFile
    gguf = GGUFFile(path)
    cfg = gguf.hf_config()
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    return _checked(ModelSource(name, path, True, cfg, gen, gguf))


def _hf_source(name: str, path: Path) -> ModelSource:
    cfg = read_json(path / "config.json")
    gen_path = path / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    return _checked(ModelSource(name, path, False, cfg, gen))


def _checked(source: ModelSource) -> ModelSource:
    """Refuse, before any weight is read, a model whose family is unknown or whose config lacks
    what the family needs."""
    source.params()
    return source




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
    import torch
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        out = {}
        for f in files:
            try:
                out.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        return out
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}
    raise ValueError(f"No *.safetensors or pytorch_model*.bin weights in {path}")


def hf_parameter_name(family: type[CausalLM], name: str) -> str:
    """An HF checkpoint tensor's name as the family's parameter name (hf_weight_names)."""
    for pattern, repl in family.hf_weight_names:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name
