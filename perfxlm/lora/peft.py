"""Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

An adapter adds `scaling * B @ A` to some Linear layers' weights: A (r, K), B (N, r) per
target module. The engine never merges it into the weights; the `LoRA` op adds
`scaling * (x A^T) B^T` to the Linear's output for the rows that use the adapter. Tensors
are read with safetensors' numpy API, so loading needs no torch.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# PEFT prefixes a module path with the wrapper's attribute names
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.default)?\.weight$")
# the ranks vLLM's --max-lora-rank accepts
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoRAWeights:
    """One target Linear's low-rank pair."""

    a: np.ndarray   # (r, K) float32
    b: np.ndarray   # (N, r) float32


@dataclass
class LoRAAdapter:
    path: str
    rank: int
    scaling: float                        # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    modules: dict[str, LoRAWeights]       # perfxlm Linear module path -> its pair


def load_adapter(path: str, max_lora_rank: int, module_of: Callable[[str], str | None]) -> LoRAAdapter:
    """The adapter at `path`, checked against the engine's limits. `module_of` maps an HF module
    path ("model.layers.0.self_attn.q_proj") to the model's Linear module path, or None where
    the model has no such LoRA-able Linear."""
    root = Path(path).expanduser()
    config_file = root / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"Loading lora {path} failed: no adapter_config.json in {root} "
                         "(a PEFT LoRA adapter directory is expected)")
    config = json.loads(config_file.read_text())
    rank = int(config.get("r", 0))
    errors = []
    if config.get("peft_type", "LORA") != "LORA":
        errors.append(f"peft_type {config['peft_type']!r} is not LoRA.")
    if config.get("modules_to_save"):
        errors.append("vLLM only supports modules_to_save being None.")
    if config.get("use_dora"):
        errors.append("vLLM does not yet support DoRA.")
    if config.get("bias", "none") != "none":
        errors.append(f"Adapter bias {config['bias']!r} is not supported.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        errors.append("Per-module ranks and alphas (rank_pattern, alpha_pattern) are not supported.")
    if rank > max_lora_rank:
        errors.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if errors:
        raise ValueError(" ".join(errors))
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank

    tensors = _read_tensors(root)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            unexpected.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["part"]] = t
    modules: dict[str, LoRAWeights] = {}
    for hf_module, pair in pairs.items():
        ours = module_of(hf_module)
        if ours is None or set(pair) != {"lora_A", "lora_B"}:
            unexpected.append(hf_module)
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"Loading lora {path} failed: {hf_module} has lora_A {a.shape} and lora_B "
                             f"{b.shape}, not (r, in) and (out, r) with r = {rank}")
        modules[ours] = LoRAWeights(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
    if unexpected:
        raise ValueError(f"While loading {path}, expected target modules in the model's Linear layers but "
                         f"received {sorted(unexpected)}. Please verify that the loaded LoRA module is correct")
    if not modules:
        raise ValueError(f"Loading lora {path} failed: it holds no lora_A/lora_B weights")
    return LoRAAdapter(str(root), rank, scaling, modules)


def _read_tensors(root: Path) -> dict[str, np.ndarray]:
    file = root / "adapter_model.safetensors"
    if file.is_file():
        return _read_safetensors(file)
    if (root / "adapter_model.bin").is_file():
        import torch  # the pickled format needs torch, as PEFT's own loader does
        state = torch.load(root / "adapter_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise ValueError(f"Loading lora {root} failed: no adapter_model.safetensors or adapter_model.bin")


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32. Read by hand (an 8-byte header length, a JSON header, the raw
    tensors) because numpy has no bfloat16, the dtype most adapters are saved in."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        kind = _SAFETENSORS_DTYPES.get(info["dtype"])
        if kind is None:
            raise ValueError(f"Loading lora {file.parent} failed: {key} is {info['dtype']}; "
                             f"LoRA weights must be one of {sorted(_SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        raw = np.frombuffer(data, kind, count=(end - start) // np.dtype(kind).itemsize, offset=8 + n + start)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[key] = raw.astype(np.float32).reshape(info["shape"])
    return out
