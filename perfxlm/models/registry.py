"""HF `architectures` name -> the perfxlm model family that runs it (vLLM's ModelRegistry)."""

from perfxlm.models import bert, gemma, gpt2, llama, mixtral, opt, phi3, qwen3, qwen_moe
from perfxlm.models.adapters import as_embedding_model, as_seq_cls_model
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
    # pooling models (vLLM's runner "pooling")
    "BertModel": bert.BertModel,
    "BertForSequenceClassification": bert.BertForSequenceClassification,
    "LlamaForSequenceClassification": as_seq_cls_model(llama.LlamaForCausalLM),
    "MistralForSequenceClassification": as_seq_cls_model(llama.LlamaForCausalLM),
    "Qwen2ForSequenceClassification": as_seq_cls_model(llama.LlamaForCausalLM),
    "Qwen3ForSequenceClassification": as_seq_cls_model(qwen3.Qwen3ForCausalLM),
}
# the decoders whose forward ends `self.output(self.norm(x))`: convert="embed" / "classify" adapt them
_CONVERTIBLE = (llama.LlamaForCausalLM, qwen3.Qwen3ForCausalLM, phi3.Phi3ForCausalLM, mixtral.MixtralForCausalLM,
                qwen_moe.Qwen2MoeForCausalLM, qwen_moe.Qwen3MoeForCausalLM)


class ModelRegistry:
    """The families perfxlm can load; `register_model` adds one (as vLLM's out-of-tree models do)."""

    @staticmethod
    def register_model(architecture: str, model_cls: type[CausalLM]) -> None:
        _MODELS[architecture] = model_cls

    @staticmethod
    def get_supported_archs() -> list[str]:
        return sorted(_MODELS)


def registered_family(architectures: list[str]) -> type[CausalLM] | None:
    """The family of the first registered architecture, as registered (unconverted); None: none is."""
    return next((_MODELS[a] for a in architectures if a in _MODELS), None)


def supported_architectures() -> list[str]:
    return ModelRegistry.get_supported_archs()


def model_class(architectures: list[str], convert: str = "none") -> type[CausalLM]:
    """The family of the first supported architecture; convert "embed" / "classify" adapts a
    generative one into a pooling model (vLLM's --convert), a pooling one must already be of
    that kind."""
    for arch in architectures:
        if arch in _MODELS:
            return _converted(_MODELS[arch], convert)
    raise ValueError(f"Model architectures {architectures} are not supported by perfxlm. "
                     f"Supported architectures: {supported_architectures()}")


def _converted(cls: type[CausalLM], convert: str) -> type[CausalLM]:
    if convert in ("none", "auto") or cls.pooling_task == convert:
        return cls
    if cls.pooling_task is None and cls in _CONVERTIBLE:
        return as_embedding_model(cls) if convert == "embed" else as_seq_cls_model(cls)
    raise ValueError(f"perfxlm cannot convert {cls.__name__} with convert={convert!r}: it converts the decoders "
                     f"{[c.__name__ for c in _CONVERTIBLE]} to 'embed' or 'classify'")


def gguf_architecture(gguf_arch: str) -> str | None:
    """The HF architecture a GGUF's general.architecture loads as (None: no family reads it)."""
    for cls in set(_MODELS.values()):
        if gguf_arch in cls.gguf_architectures:
            return cls.gguf_architectures[gguf_arch]
    return None


def gguf_architectures() -> list[str]:
    return sorted({a for cls in _MODELS.values() for a in cls.gguf_architectures})
