"""HF `architectures` name -> the perfxlm model class that runs it."""

import torch
from torch import nn

from perfxlm.models import llama

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": llama.Transformer,
    "MistralForCausalLM": llama.Transformer,
    "Qwen2ForCausalLM": llama.Transformer,
}
_PARAMS = {llama.Transformer: llama.ModelParams}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def model_class(architectures: list[str]) -> type[nn.Module]:
    for arch in architectures:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(f"Model architectures {architectures} are not supported by perfxlm. "
                     f"Supported architectures: {supported_architectures()}")


def build_model(hf_config: dict) -> nn.Module:
    """An uninitialised model (on the meta device) for an HF config dict."""
    cls = model_class(hf_config.get("architectures") or ["LlamaForCausalLM"])
    with torch.device("meta"):
        return cls(_PARAMS[cls].from_hf_config(hf_config))
