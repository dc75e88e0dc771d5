"""Exported graphs cached under ~/.cache/perfxlm/graphs ($PERFXLM_GRAPH_CACHE), keyed by the
checkpoint files, the code the graph is traced from, dtype and graph format version."""

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from graph_export.export import export_model, op_histogram, save_model
from graph_export.ops import FORMAT_VERSION
from perfxlm.models.default_model import cache_dir
from perfxlm.models.loader import ModelSource
from perfxlm.version import __version__

logger = logging.getLogger(__name__)


def graph_key(source: ModelSource, dtype: torch.dtype, quantization: str | None = None,
              lora: tuple[int, int] | None = None, weight_dtype: torch.dtype | None = None,
              cache_dtype: torch.dtype | None = None) -> str:
    files = [source.path] if source.is_gguf else sorted(source.path.glob("*.safetensors")) + sorted(
        source.path.glob("pytorch_model*.bin"))
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([stamp, _code_stamp(source), source.hf_config, str(dtype), FORMAT_VERSION, quantization, lora,
                       str(weight_dtype), str(cache_dtype or weight_dtype or dtype)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _code_stamp(source: ModelSource) -> str:
    """A digest of the code a graph comes from (the family's file, every file of perfxlm.models
    — families import each other's pieces — the op layer and the exporter): editing any of it
    exports the graph anew."""
    import graph_export.export
    import graph_export.functional
    import graph_export.quant
    from perfxlm.models import layers
    family = source.family
    h = hashlib.sha256(f"{family.__module__}.{family.__qualname__}".encode())
    files = [getattr(sys.modules.get(family.__module__), "__file__", None)]  # None: a family in __main__
    files += sorted(Path(layers.__file__).parent.glob("*.py"))
    files += [m.__file__ for m in (graph_export.quant, graph_export.functional, graph_export.export)]
    for file in files:
        if file is not None:
            h.update(Path(file).read_bytes())
    return h.hexdigest()


def cached_graph(source: ModelSource, dtype: torch.dtype, quantization: str | None = None,
                 lora: tuple[int, int] | None = None, weight_dtype: torch.dtype | None = None,
                 cache_dtype: torch.dtype | None = None) -> Path:
    """The graph of `source` in `dtype` (activations), exported on first use, then read from the
    cache. quantization="gguf" keeps the GGUF's Q8_0/Q4_0/Q4_1 Linear weights as blocks; lora
    (max_loras, max_lora_rank) gives its Linears that many LoRA slots of that rank; weight_dtype
    stores the dense Linear and expert weights in that dtype (bfloat16 under float32 activations);
    cache_dtype is the KV caches' (default: the weights' dtype, else the activations')."""
    cache_dtype = cache_dtype or weight_dtype or dtype
    tag = (str(dtype).removeprefix("torch.") + (f"-w{str(weight_dtype).removeprefix('torch.')}" if weight_dtype else "")
           + ("-gguf" if quantization else "") + (f"-lora{lora[0]}r{lora[1]}" if lora else "")
           + (f"-kv{str(cache_dtype).removeprefix('torch.')}" if cache_dtype != (weight_dtype or dtype) else ""))
    key = graph_key(source, dtype, quantization, lora, weight_dtype, cache_dtype)
    name = f"{source.path.stem}-{tag}-v{FORMAT_VERSION}-{key}"
    root = Path(os.environ.get("PERFXLM_GRAPH_CACHE", cache_dir() / "graphs"))
    path = root / name / "model.onnx"
    if path.is_file():
        return path
    logger.info("exporting %s (%s) to %s", source.name, dtype, path.parent)
    model = source.load_weights(dtype, weight_dtype)
    if lora:
        from perfxlm.models.lora import enable_lora
        enable_lora(model, *lora)
    quantized = source.linear_blocks() if quantization == "gguf" else None
    graph = export_model(model, source=source.name, producer_version=__version__, quantized=quantized,
                         weight_dtype=weight_dtype, cache_dtype=cache_dtype)
    logger.info("op types: %s", op_histogram(graph))
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent.parent))
    try:
        save_model(graph, tmp / "model.onnx")
        os.replace(tmp, path.parent)  # atomic: a concurrent engine never sees half a graph
    except OSError:
        if not path.is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
