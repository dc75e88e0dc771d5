"""Decoder families as pooling models (vLLM's `--convert embed|classify` and the checkpoints
saved as `*ForSequenceClassification`), by swapping their output projection.

The families converted here end their forward with `self.output(self.norm(x))` on the
logits rows (Llama, Mistral, Qwen2, Qwen3, Phi-3 and the MoE families). An embedding model
(Qwen3-Embedding style) replaces `output` by an identity: the graph returns the final
normed hidden states of the rows the engine pools (the last token). A sequence classifier
replaces it by the `score` head (num_labels, hidden), untied, and the engine pools the last
token's logits. Either may be saved without the `model.` prefix (a bare `Qwen3Model`).
"""

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from perfxlm.models.labels import num_labels
from perfxlm.models.layers import CausalLM, Linear


@dataclass
class SeqClsParams:
    """A family's own parameters and the classes of the score head put in its place."""

    base: Any
    num_labels: int


class Identity(nn.Module):
    """The output projection of an embedding model: none (the graph ends with the final norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _bare_names(names: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The checkpoint renames, each also without transformers' `model.` prefix (a base model
    saved on its own, as embedding checkpoints are)."""
    bare = [(r"^" + p.removeprefix(r"^model\."), r) for p, r in names if p.startswith(r"^model\.")]
    return names + bare


def _hidden_size(model: CausalLM) -> int:
    return model.norm.weight.shape[0]


@functools.cache
def as_embedding_model(family: type[CausalLM]) -> type[CausalLM]:
    """`family` returning the final normed hidden states (N, hidden) of the pooled rows."""

    class EmbeddingModel(family):
        hf_weight_names = _bare_names(family.hf_weight_names)
        hf_ignored_names = (*family.hf_ignored_names, r"^lm_head\.")  # a checkpoint may still carry it
        pooling_task = "embed"

        def __init__(self, params: Any) -> None:
            super().__init__(params)
            self.output = Identity()
            self.vocab_size = _hidden_size(self)

    return _named(EmbeddingModel, f"{family.__name__}AsEmbedding")


@functools.cache
def as_seq_cls_model(family: type[CausalLM]) -> type[CausalLM]:
    """`family` with the score head: (N, num_labels) logits of the pooled rows."""

    class SequenceClassifier(family):
        hf_weight_names = [(r"^score\.", "output."), *_bare_names(family.hf_weight_names)]
        hf_ignored_names = (*family.hf_ignored_names, r"^lm_head\.")
        pooling_task = "classify"

        @classmethod
        def params_from_hf(cls, cfg: dict[str, Any]) -> SeqClsParams:
            # the family reads its own architecture name (Qwen2's q/k/v biases follow from it)
            archs = [base_architecture(a) for a in cfg.get("architectures") or []]
            return SeqClsParams(family.params_from_hf({**cfg, "architectures": archs}), num_labels(cfg))

        def __init__(self, params: SeqClsParams) -> None:
            super().__init__(params.base)
            self.output = Linear(_hidden_size(self), params.num_labels)  # untied, whatever the config says
            self.vocab_size = params.num_labels

    return _named(SequenceClassifier, f"{family.__name__}AsSequenceClassifier")


def _named(cls: type, name: str) -> type:
    """A readable class name (logs, the graph cache's code stamp)."""
    cls.__name__ = cls.__qualname__ = name
    return cls


_SUFFIX = re.compile(r"For(SequenceClassification|CausalLM)$")


def base_architecture(arch: str) -> str:
    """`Qwen2ForSequenceClassification` -> `Qwen2ForCausalLM`: the family that runs its body."""
    return _SUFFIX.sub("ForCausalLM", arch)
