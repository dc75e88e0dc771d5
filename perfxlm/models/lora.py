"""LoRA slots on a model's Linear layers: what the exported graph computes per row.

`enable_lora(model, max_loras, max_rank)` gives every LoRA-able Linear (the decoder layers'
projections; not the LM head, the embeddings or MoE experts) a `LoRASlots` child: float32
stacks A (L, R, K), B (L, N, R) and scale (L,), zero until the engine writes an adapter into
a slot. Each Linear then ends with the LoRA op, which adds scale[l] * (x A[l]^T) B[l]^T to the
rows whose `lora_ids` entry is l (-1: none). An adapter of rank r < R fills the first r rows
of A and columns of B; the zero rest adds nothing.
"""

import torch
from torch import nn

from graph_export import functional as F
from perfxlm.models.layers import Linear


class LoRAIds:
    """The step's per-token adapter slots (T,), shared by every LoRASlots of a model: set from
    StepInputs.lora_ids before each forward (a forward pre-hook on the model)."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None


class LoRASlots(nn.Module):
    def __init__(self, out_features: int, in_features: int, max_loras: int, max_rank: int, ids: LoRAIds) -> None:
        super().__init__()
        self.register_buffer("a", torch.zeros(max_loras, max_rank, in_features), persistent=False)   # (L, R, K)
        self.register_buffer("b", torch.zeros(max_loras, out_features, max_rank), persistent=False)  # (L, N, R)
        self.register_buffer("scale", torch.zeros(max_loras), persistent=False)                      # (L,)
        self.step_ids = ids

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (T, K), y (T, N): the Linear's input and output -> y plus each row's adapter product."""
        if self.step_ids.ids is None:
            raise RuntimeError("a LoRA model ran without the step's lora_ids")
        return F.lora(x, y, self.a, self.b, self.scale, self.step_ids.ids)


def lora_targets(model: nn.Module) -> list[str]:
    """The module paths of the Linears an adapter may target."""
    return [name for name, m in model.named_modules()
            if type(m) is Linear and name.startswith("layers.")]


def enable_lora(model: nn.Module, max_loras: int, max_rank: int) -> dict[str, LoRASlots]:
    """Attach LoRA slots to the model's LoRA-able Linears (after its weights are loaded and cast:
    the slots stay float32). Returns module path -> its slots."""
    ids = LoRAIds()
    slots = {}
    for name in lora_targets(model):
        linear = model.get_submodule(name)
        n, k = linear.weight.shape
        linear.lora = slots[name] = LoRASlots(n, k, max_loras, max_rank, ids)
    if not slots:
        raise ValueError(f"{type(model).__name__} has no Linear layers LoRA can adapt")

    def take_ids(module: nn.Module, args: tuple) -> None:
        ids.ids = args[0].lora_ids
    model.register_forward_pre_hook(take_ids)
    return slots
