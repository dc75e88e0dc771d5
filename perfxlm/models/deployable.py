"""A deployable model directory: what `perfxlm export MODEL -o DIR` writes, and the engine
serves with no checkpoint, no re-export and no PyTorch (a RISC-V board's Python).

    DIR/model.onnx, model.onnx.data   the graph and its weights (a GGUF's quantised blocks kept)
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
    DIR/config.json                   the HF config the engine reads (max_model_len, eos, architectures)
    DIR/generation_config.json        the model's sampling defaults
    DIR/perfxlm.json                  this file's METADATA: format version, dtype, quantization,
                                      runner / pooling information

Reading one (`DeployableSource`) imports neither torch nor transformers; writing one
(`write_deployable`) loads the model through torch, as any export does.
"""

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METADATA = "perfxlm.json"
GRAPH = "model.onnx"
DEPLOYABLE_VERSION = 1  # bumped when the directory's layout or metadata changes incompatibly


def is_deployable(path: Path) -> bool:
    """Whether `path` is a directory `perfxlm export -o` wrote."""
    return (path / METADATA).is_file() and (path / GRAPH).is_file()


@dataclass(frozen=True)
class FamilyInfo:
    """What the engine asks of a model family, recorded at export (the family's class needs torch)."""

    name: str                           # the family's class name, for messages
    pooling_task: str | None            # None: a generative model
    default_seq_pooling_type: str
    is_causal: bool


@dataclass
class DeployableSource:
    """A deployable directory, in the place of a ModelSource (models/loader.py)."""

    name: str                          # what the user asked for
    path: Path                         # the directory
    hf_config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    convert: str = "none"
    is_gguf: bool = False              # the weights are in the graph: no GGUF is read

    @classmethod
    def open(cls, name: str, path: Path) -> "DeployableSource":
        meta = read_json(path / METADATA)
        version = meta.get("format_version")
        if version != DEPLOYABLE_VERSION:
            raise ValueError(f"{path / METADATA}: deployable directory format version {version}; this perfxlm "
                             f"reads version {DEPLOYABLE_VERSION}. Export it again with `perfxlm export MODEL -o DIR`.")
        gen = path / "generation_config.json"
        return cls(name, path, read_json(path / "config.json"), read_json(gen) if gen.is_file() else {}, meta,
                   convert=meta.get("convert_type", "none"))

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH

    @property
    def family(self) -> FamilyInfo:
        return FamilyInfo(self.metadata.get("family", "?"), self.metadata.get("pooling_task"),
                          self.metadata.get("default_seq_pooling_type", "LAST"), self.metadata.get("is_causal", True))

    def registered_family(self) -> FamilyInfo:
        return self.family

    def is_quantized(self) -> bool:
        return self.metadata.get("quantization") == "gguf"

    @property
    def dtype_name(self) -> str:
        """The activations' dtype the graph was exported in ('float32', ...): the only one it runs in."""
        return self.metadata["dtype"]

    @property
    def weight_dtype_name(self) -> str:
        """The dtype asked for at export ('bfloat16' runs bf16 weights under float32 activations
        where the exporting plugin does so: perfxlm.config.split_dtype)."""
        return self.metadata.get("weight_dtype") or self.metadata["dtype"]

    @property
    def pooling_task(self) -> str | None:
        return self.family.pooling_task

    def load_weights(self, dtype: Any, weight_dtype: Any = None) -> Any:
        raise ValueError(f"{self.path} is a deployable directory: its weights are in the exported graph, which "
                         "only the graph executor runs. Unset PERFXLM_EXECUTOR=eager, or point `model` at the "
                         "original checkpoint.")

    def load_tokenizer(self, **kwargs: Any) -> Any:
        from perfxlm.tokenizer import load_tokenizer_files
        return load_tokenizer_files(self.path, **kwargs)


def write_deployable(source: Any, out: Path, dtype: Any, quantization: str | None, graph_file: Path,
                     weight_dtype: Any = None) -> None:
    """Fill `out` from a ModelSource: the exported graph `graph_file` (and its .data side file),
    the tokenizer saved as transformers saves it, the configs and perfxlm.json."""
    from perfxlm.version import __version__
    out.mkdir(parents=True, exist_ok=True)
    if graph_file.resolve() != (out / GRAPH).resolve():  # e.g. a graph from the cache
        for f in (graph_file, graph_file.with_name(graph_file.name + ".data")):
            shutil.copyfile(f, out / (GRAPH + f.name.removeprefix(graph_file.name)))
    tokenizer = source.load_tokenizer()
    tokenizer.save_pretrained(str(out))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")  # older transformers keep it inline
    special = getattr(tokenizer, "special_tokens_map", None)
    if special and not (out / "special_tokens_map.json").is_file():  # transformers 5 keeps them in the config only
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, default=str))
    (out / "config.json").write_text(json.dumps(source.hf_config, indent=2, default=str))
    (out / "generation_config.json").write_text(json.dumps(source.generation_config, indent=2))
    family = source.registered_family() if source.convert == "none" else source.family
    meta = {"format_version": DEPLOYABLE_VERSION, "perfxlm_version": __version__, "source": source.name,
            "dtype": str(dtype).removeprefix("torch."),
            "weight_dtype": str(weight_dtype or dtype).removeprefix("torch."), "quantization": quantization,
            "family": family.__name__ if family is not None else None,
            "convert_type": source.convert, "pooling_task": getattr(family, "pooling_task", None),
            "default_seq_pooling_type": getattr(family, "default_seq_pooling_type", "LAST"),
            "is_causal": getattr(family, "is_causal", True)}
    (out / METADATA).write_text(json.dumps(meta, indent=2))
    logger.info("deployable directory %s: %s", out, ", ".join(sorted(p.name for p in out.iterdir())))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (config.json, ...), or a ValueError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(value).__name__}")
    return value
