"""Weight-only quantised formats a Linear node may carry (its `weight_format` attribute).

The weight initializer then holds GGUF's blocks as raw bytes, uint8 (N, K/block * block
bytes): the exact bytes of the GGUF file, so every plugin reads the same blocks llama.cpp
does. Blocks are 32 weights (Q8_0, Q4_0, Q4_1) or 256-weight super-blocks (the K-quants
Q4_K, Q5_K, Q6_K). Quantising and dequantising use llama.cpp's own `gguf` package (whose
Python side dequantises K-quants but does not quantise them).
"""

import numpy as np

# weight_format -> (GGML type name, bytes per block, weights per block)
FORMATS = {"q8_0": ("Q8_0", 34, 32), "q4_0": ("Q4_0", 18, 32), "q4_1": ("Q4_1", 20, 32),
           "q4_k": ("Q4_K", 144, 256), "q5_k": ("Q5_K", 176, 256), "q6_k": ("Q6_K", 210, 256)}
BLOCK = 32  # weights per block of the 32-block formats (block_size() gives any format's)


def block_size(fmt: str) -> int:
    """Weights per block of `fmt`: 32, or 256 for a K-quant."""
    _check(fmt)
    return FORMATS[fmt][2]


def in_features(fmt: str, row_bytes: int) -> int:
    """K of a weight in `fmt` stored as rows of `row_bytes` bytes (no `gguf` needed: plugins
    call this where only numpy is installed, e.g. on a RISC-V board)."""
    _check(fmt)
    _, nbytes, size = FORMATS[fmt]
    if row_bytes % nbytes:
        raise ValueError(f"a {fmt} row of {row_bytes} bytes is not whole {nbytes}-byte blocks")
    return row_bytes // nbytes * size


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown weight_format {fmt!r}; known: dense, {', '.join(FORMATS)}")


def _qtype(fmt: str):
    from gguf import GGMLQuantizationType
    _check(fmt)
    return GGMLQuantizationType[FORMATS[fmt][0]]


def quantize(w: np.ndarray, fmt: str) -> np.ndarray:
    """float (N, K) with K a multiple of the block size -> uint8 (N, K/block * block bytes)."""
    if w.shape[-1] % block_size(fmt):
        raise ValueError(f"{fmt} needs the input features to be a multiple of {block_size(fmt)}, got {w.shape}")
    import gguf
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _qtype(fmt))


def dequantize(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 (N, K/block * block bytes) -> float32 (N, K)."""
    import gguf
    return np.asarray(gguf.quants.dequantize(np.asarray(blocks), _qtype(fmt)), dtype=np.float32)


def from_gguf_type(type_name: str) -> str | None:
    """The weight_format for a GGML tensor type name, or None if it has no native kernel."""
    return next((fmt for fmt, (name, *_) in FORMATS.items() if name == type_name), None)
