"""Weight-only quantised formats a Linear node may carry (its `weight_format` attribute).

The weight initializer then holds GGUF's blocks as raw bytes, uint8 (N, K/32 * block
bytes): the exact bytes of the GGUF file, so every plugin reads the same blocks llama.cpp
does. Quantising and dequantising use llama.cpp's own `gguf` package.
"""

import numpy as np

# weight_format -> (GGML type name, bytes per 32-weight block)
FORMATS = {"q8_0": ("Q8_0", 34), "q4_0": ("Q4_0", 18), "q4_1": ("Q4_1", 20)}
BLOCK = 32


def _qtype(fmt: str):
    from gguf import GGMLQuantizationType
    if fmt not in FORMATS:
        raise ValueError(f"Unknown weight_format {fmt!r}; known: dense, {', '.join(FORMATS)}")
    return GGMLQuantizationType[FORMATS[fmt][0]]


def quantize(w: np.ndarray, fmt: str) -> np.ndarray:
    """float (N, K) with K % 32 == 0 -> uint8 (N, K/32 * block bytes)."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"{fmt} needs the input features to be a multiple of {BLOCK}, got {w.shape}")
    import gguf
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _qtype(fmt))


def dequantize(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 (N, K/32 * block bytes) -> float32 (N, K)."""
    import gguf
    return np.asarray(gguf.quants.dequantize(np.asarray(blocks), _qtype(fmt)), dtype=np.float32)


def from_gguf_type(type_name: str) -> str | None:
    """The weight_format for a GGML tensor type name, or None if it has no native kernel."""
    return next((fmt for fmt, (name, _) in FORMATS.items() if name == type_name), None)
