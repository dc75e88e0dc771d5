"""A model family written for the one-file test: Llama whose FFN adds a linear skip path,
y = down(silu(gate x) * up x) + skip x. Registering it is one line:
`ModelRegistry.register_model("ToyForCausalLM", ToyForCausalLM)`."""

import torch

from graph_export import functional as F
from perfxlm.models.layers import Linear
from perfxlm.models.llama import LlamaForCausalLM, LlamaMLP, ModelParams


class ToyMLP(LlamaMLP):
    def __init__(self, params: ModelParams) -> None:
        super().__init__(params)
        self.w4 = Linear(params.dim, params.dim)  # skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.add(super().forward(x), self.w4(x))


class ToyForCausalLM(LlamaForCausalLM):
    hf_weight_names = LlamaForCausalLM.hf_weight_names + [
        (r"^model\.layers\.(\d+)\.mlp\.skip_proj\.", r"layers.\1.feed_forward.w4.")]
    gguf_architectures = {}

    def __init__(self, params: ModelParams) -> None:
        super().__init__(params)
        for layer in self.layers:
            layer.feed_forward = ToyMLP(params)
