"""The dtypes the engine runs (float32, bfloat16, float16): torch's where torch is installed,
as vLLM's configs hold torch dtypes; named stand-ins where it is not (a deployable directory
served on a board without PyTorch), which print as torch's do."""

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """A torch dtype's stand-in: its name only."""

    name: str

    def __str__(self) -> str:
        return f"torch.{self.name}"  # as str(torch.float32): callers strip the "torch." prefix

    __repr__ = __str__


try:
    import torch
except ImportError:  # the torch-free runtime
    torch = None

if torch is not None:
    float32, bfloat16, float16 = torch.float32, torch.bfloat16, torch.float16
    DTYPE_TYPES: tuple[type, ...] = (torch.dtype, DType)
else:
    float32, bfloat16, float16 = DType("float32"), DType("bfloat16"), DType("float16")
    DTYPE_TYPES = (DType,)


def dtype_name(dtype: object) -> str:
    """'float32' for torch.float32 or its stand-in."""
    return str(dtype).removeprefix("torch.")
