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


# GGML types without kernels of their own whose blocks another format holds exactly: the loader
# rewrites them at load (llama.cpp's Q4_K_M falls back to Q5_0 on tensors whose rows are not
# whole 256-blocks, most of a narrow model's)
TRANSCODED = {"Q5_0": "q8_0"}


# GGML types no native format holds alone but two hold exactly as a sum: a Linear on such a
# weight becomes two Linears on the same x, added (Q5_1: the Q4_1 and Q4_0 blocks of split())
SPLIT = frozenset({"Q5_1"})
ADDEND = "+"  # a split weight's second part, in a `quantized` map: under its name + ADDEND


def split(blocks: np.ndarray, type_name: str) -> list[tuple[str, np.ndarray]] | None:
    """GGML blocks of a SPLIT type, uint8 (..., row bytes) -> [(weight_format, blocks)] of two
    weights whose sum is exactly the stored one, or None where a block's scale would overflow.
    Q5_1 (fp16 d, fp16 m, 32 fifth bits, 16 bytes of low nibbles: w = d q + m, q 0-31) ->
    Q4_1 (the same d and m, q's low nibbles as stored: d (q mod 16) + m) plus Q4_0 (d' = 16 d,
    nibbles 8 + q's fifth bit h: d' (nibble - 8) = 16 d h); 16 d is exact in fp16."""
    if type_name != "Q5_1":
        raise ValueError(f"no exact split for GGML type {type_name!r}; known: {', '.join(SPLIT)}")
    q5, lead, n = _block_rows(blocks, type_name, 24)
    d16 = q5[:, :2].copy().view(np.float16) * np.float16(16)            # (n, 1)
    if not np.isfinite(d16).all():
        return None
    low = np.concatenate([q5[:, :4], q5[:, 8:]], axis=1)                # d, m, nibbles: Q4_1's layout
    high_bits = q5[:, 4:8].copy().view("<u4")                           # (n, 1): bit j is value j's fifth bit
    h = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) + 8   # (n, 32) nibbles 8 or 9
    high = np.empty((q5.shape[0], 18), np.uint8)
    high[:, :2] = d16.view(np.uint8)
    high[:, 2:] = h[:, :16] | (h[:, 16:] << 4)                          # values 0-15 low, 16-31 high nibbles
    return [("q4_1", low.reshape(*lead, n * 20)), ("q4_0", high.reshape(*lead, n * 18))]


def transcode(blocks: np.ndarray, type_name: str) -> tuple[str, np.ndarray]:
    """GGML blocks of a TRANSCODED type, uint8 (..., row bytes) -> (weight_format, the same
    weights in its blocks). Q5_0 (fp16 d, 32 high bits, 16 bytes of low nibbles: w = d (q - 16),
    q 5 bits) -> Q8_0 (d, int8 q - 16): the same d and integers, so the same values exactly."""
    if type_name != "Q5_0":
        raise ValueError(f"no exact transcoding for GGML type {type_name!r}; known: {', '.join(TRANSCODED)}")
    q5, lead, n = _block_rows(blocks, type_name, 22)
    high = q5[:, 2:6].copy().view("<u4")                               # (n, 1): bit j is value j's fifth bit
    bits = (high >> np.arange(32, dtype=np.uint32)) & 1                 # (n, 32)
    low = np.concatenate([q5[:, 6:] & 0x0F, q5[:, 6:] >> 4], axis=1)    # values 0-15, then 16-31
    out = np.empty((q5.shape[0], 34), np.uint8)
    out[:, :2] = q5[:, :2]                                              # d, as stored
    out[:, 2:] = (low.astype(np.int16) + (bits << 4).astype(np.int16) - 16).astype(np.int8).view(np.uint8)
    return "q8_0", out.reshape(*lead, n * 34)


def _block_rows(blocks: np.ndarray, type_name: str, nbytes: int) -> tuple[np.ndarray, tuple[int, ...], int]:
    """uint8 (..., row bytes) of `nbytes`-byte blocks -> (one block a row, the leading shape,
    blocks a row)."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    lead, row = b.shape[:-1], b.shape[-1]
    if row % nbytes:
        raise ValueError(f"a {type_name} row of {row} bytes is not whole {nbytes}-byte blocks")
    return b.reshape(-1, nbytes), lead, row // nbytes
