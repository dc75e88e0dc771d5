"""PoolingParams with vLLM 0.32's fields, defaults and validation messages.

0.32 has `use_activation` (embed: normalise; classify: softmax / sigmoid) and `dimensions`
(Matryoshka); the older `normalize`, `softmax`, `activation` and `truncate_prompt_tokens`
fields are gone, so passing them is a TypeError there and here.
"""

import copy
from dataclasses import dataclass
from typing import Any

from perfxlm.exceptions import VLLMValidationError
from perfxlm.sampling_params import RequestOutputKind

POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify", "plugin", "embed&token_classify")
_REMOVED_TASKS = {"score": "`score` task was removed; use `classify` instead.",
                  "encode": "`encode` task was removed; use `token_embed` or `token_classify` instead."}


def check_removed_pooling_task(task: object) -> None:
    if isinstance(task, str) and task in _REMOVED_TASKS:
        raise VLLMValidationError(_REMOVED_TASKS[task], parameter="task")


@dataclass
class PoolingParams:
    """API parameters for pooling models.

    use_activation: whether to apply the pooler's activation to its output (embed: L2
        normalisation; classify: softmax, or sigmoid for one label). None: the model's default
        (its sentence-transformers Normalize module; True for classifiers).
    dimensions: keep the first `dimensions` of each embedding (Matryoshka models only), then
        normalise.
    """

    use_activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    # internal use, as in vLLM
    task: str | None = None
    requires_token_ids: bool = False
    skip_reading_prefix_cache: bool | None = None
    late_interaction_params: Any = None
    extra_kwargs: dict[str, Any] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY

    def __post_init__(self) -> None:
        check_removed_pooling_task(self.task)
        if self.output_kind != RequestOutputKind.FINAL_ONLY:
            raise VLLMValidationError(f"For pooling output_kind has to be FINAL_ONLY, got {self.output_kind!r}")

    @property
    def all_parameters(self) -> list[str]:
        return ["dimensions", "use_activation"]

    @property
    def valid_parameters(self) -> dict[str, list[str]]:
        return {"embed": ["dimensions", "use_activation"], "classify": ["use_activation"],
                "token_embed": ["dimensions", "use_activation"], "token_classify": ["use_activation"]}

    def clone(self) -> "PoolingParams":
        """A deep copy."""
        return copy.deepcopy(self)

    def verify(self, model_config: Any) -> None:
        """Fill the unset fields from the model's pooler config and check them against the task
        (set before): vLLM's PoolingParams.verify. `model_config` is the engine's ModelConfig."""
        if self.task == "plugin":
            if self.skip_reading_prefix_cache is None:
                self.skip_reading_prefix_cache = True
            return
        if self.task not in self.valid_parameters:
            return
        self._merge_default_parameters(model_config)
        self._set_default_parameters(model_config)
        self._verify_valid_parameters()

    def _merge_default_parameters(self, model_config: Any) -> None:
        pooler_config = model_config.pooler_config
        if pooler_config is None:
            return
        valid = self.valid_parameters[self.task]
        for k in valid:
            if getattr(pooler_config, k, None) is not None and getattr(self, k, None) is None:
                setattr(self, k, getattr(pooler_config, k))
        if self.skip_reading_prefix_cache is None:
            # a token task's output covers every prompt token: none may come from the prefix cache
            self.skip_reading_prefix_cache = self.task in ("token_embed", "token_classify")
        invalid = [k for k in ("step_tag_id", "returned_token_ids") if getattr(self, k) is not None]
        if invalid:  # (STEP pooling, the only one that takes them, is not supported)
            raise VLLMValidationError(f"Task {self.task} only supports {valid} parameters, does not support "
                                      f"{invalid} parameters")

    def _set_default_parameters(self, model_config: Any) -> None:
        if self.task in ("embed", "token_embed"):
            if self.use_activation is None:
                self.use_activation = True
            if self.dimensions is not None:
                dimensions, name, size = self.dimensions, model_config.served_model_name, model_config.embedding_size
                if not model_config.is_matryoshka:
                    raise VLLMValidationError(f"Model {name!r} does not support Matryoshka embeddings; dimensions "
                                              f"must be unset (received dimensions={dimensions}).",
                                              parameter="dimensions", value=dimensions)
                if not 1 <= dimensions <= size:
                    raise VLLMValidationError(f"Model {name!r} only supports dimensions in range [1, {size}], "
                                              f"got {dimensions}.", parameter="dimensions", value=dimensions)
                mds = model_config.matryoshka_dimensions
                if mds is not None and dimensions not in mds:
                    raise VLLMValidationError(f"Model {name!r} only supports Matryoshka dimensions {mds}, got "
                                              f"{dimensions}.", parameter="dimensions", value=dimensions)
        elif self.task in ("classify", "token_classify"):
            if self.use_activation is None:
                self.use_activation = True
        else:
            raise ValueError(f"Unknown pooling task: {self.task!r}")

    def _verify_valid_parameters(self) -> None:
        valid = self.valid_parameters[self.task]
        invalid = [k for k in self.all_parameters if k not in valid and getattr(self, k, None) is not None]
        if invalid:
            raise VLLMValidationError(f"Task {self.task!r} only supports {valid} parameters, does not support "
                                      f"{invalid} parameters")

    def __repr__(self) -> str:
        return (f"PoolingParams(task={self.task}, dimensions={self.dimensions}, use_activation={self.use_activation}, "
                f"step_tag_id={self.step_tag_id}, returned_token_ids={self.returned_token_ids}, "
                f"requires_token_ids={self.requires_token_ids}, "
                f"skip_reading_prefix_cache={self.skip_reading_prefix_cache}, "
                f"late_interaction_params={self.late_interaction_params}, extra_kwargs={self.extra_kwargs})")
