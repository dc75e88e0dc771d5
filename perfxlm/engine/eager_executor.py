"""The torch side of the model runner: the torch module run directly (PERFXLM_EXECUTOR=eager),
and the GraphSpec a torch model's exported graph has. Kept apart from model_runner.py so the
graph path imports no torch."""

import numpy as np
import torch

from graph_export.functional import StepInputs
from graph_export.ops import cache_input_names
from perfxlm.engine.graph_runner import CacheSpec, GraphSpec
from perfxlm.models.layers import CausalLM


class EagerExecutor:
    """Runs the torch module directly over KV caches it owns."""

    native_sampler = None

    def __init__(self, model: CausalLM, spec: GraphSpec, num_blocks: int, block_size: int) -> None:
        self.model, self.spec = model, spec
        # Zeroed, so padded slots that masked attention rows still read are finite; numpy's
        # calloc gives zero pages the OS commits only when touched, so a large budget costs
        # nothing up front.
        caches = [torch.from_numpy(np.zeros(c.bytes_per_block(block_size) * num_blocks, np.uint8))
                  .view(getattr(torch, c.dtype)).view(c.shape(num_blocks, block_size)) for c in spec.caches]
        self.kv_caches = list(zip(caches[0::2], caches[1::2]))

    def write_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Overwrite model buffers (a LoRA slot's stacks) by name."""
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for name, array in weights.items():
                buffers[name].copy_(torch.from_numpy(array))

    @torch.inference_mode()
    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        step = StepInputs(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return self.model(step, self.kv_caches).float().numpy()


def model_spec(model: CausalLM, cache_dtype: torch.dtype, lora: bool = False) -> GraphSpec:
    """The GraphSpec the model's exported graph has (the model may be on the meta device), with
    KV caches in cache_dtype and LoRA slots (lora_ids) or not."""
    caches = []
    for i, shapes in enumerate(model.kv_cache_shapes()):
        for name, shape in zip(cache_input_names(i), shapes):
            caches.append(CacheSpec(name, tuple(shape), str(cache_dtype).removeprefix("torch.")))
    return GraphSpec(model.vocab_size, tuple(caches), tuple(model.optional_inputs) + (("lora_ids",) if lora else ()))
