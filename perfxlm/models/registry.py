"""HF `architectures` name -> the perfxlm model family that runs it (vLLM's ModelRegistry)."""

from perfxlm.models import gemma, gpt2, llama, mixtral, opt, phi3, qwen3, qwen_moe
from perfxlm.models.layers import CausalLM

_MODELS: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": llama.LlamaForCausalLM,
    "MistralForCausalLM": llama.LlamaForCausalLM,
    "Qwen2ForCausalLM": llama.LlamaForCausalLM,
    "Gemma2ForCausalLM": gemma.Gemma2ForCausalLM,
    "Gemma3ForCausalLM": gemma.Gemma3ForCausalLM,
    "Qwen3ForCausalLM": qwen3.Qwen3ForCausalLM,
    "Phi3ForCausalLM": phi3.Phi3ForCausalLM,
    "GPT2LMHeadModel": gpt2.GPT2LMHeadModel,
    "OPTForCausalLM": opt.OPTForCausalLM,
    "MixtralForCausalLM": mixtral.MixtralForCausalLM,
    "Qwen2MoeForCausalLM": qwen_moe.Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": qwen_moe.Qwen3MoeForCausalLM,
}


class ModelRegistry:
    """The families perfxlm can load; `register_model` adds one (as vLLM's out-of-tree models do)."""

    @staticmethod
    def register_model(architecture: str, model_cls: type[CausalLM]) -> None:
        _MODELS[architecture] = model_cls

    @staticmethod
    def get_supported_archs() -> list[str]:
        return sorted(_MODELS)


def supported_architectures() -> list[str]:
    return ModelRegistry.get_supported_archs()


def model_class(architectures: list[str]) -> type[CausalLM]:
    for arch in architectures:
        if arch in _MODELS:
            return _MODELS[arch]
    raise ValueError(f"Model architectures {architectures} are not supported by perfxlm. "
                     f"Supported architectures: {supported_architectures()}")


def gguf_architecture(gguf_arch: str) -> str | None:
    """The HF architecture a GGUF's general.architecture loads as (None: no family reads it)."""
    for cls in set(_MODELS.values()):
        if gguf_arch in cls.gguf_architectures:
            return cls.gguf_architectures[gguf_arch]
    return None


def gguf_architectures() -> list[str]:
    return sorted({a for cls in _MODELS.values() for a in cls.gguf_architectures})
