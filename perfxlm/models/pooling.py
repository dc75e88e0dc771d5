"""What makes a model a pooling model, resolved as vLLM 0.32 does: the runner ("generate" or
"pooling") and convert ("none", "embed", "classify") from the arguments, the architecture and
a sentence-transformers directory (modules.json); then the pooler config from the user's,
the model's sentence-transformers files (1_Pooling/config.json, a Normalize module) and the
family's defaults; and the maximum length a sentence-transformers model was trained for.
"""

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch at import: a deployable directory resolves its runner from its metadata
    from perfxlm.models.layers import CausalLM
    from perfxlm.models.loader import ModelSource

logger = logging.getLogger(__name__)

RUNNERS = ("auto", "generate", "pooling", "draft")
SEQ_POOLING_TYPES = ("CLS", "LAST", "MEAN")   # one output per prompt
TOK_POOLING_TYPES = ("ALL", "STEP")           # one output per token
CONVERTS = ("auto", "none", "embed", "classify")
_ST_POOLING = {"sentence_transformers.models.Pooling",
               "sentence_transformers.sentence_transformer.modules.pooling.Pooling"}
_ST_NORMALIZE = {"sentence_transformers.models.Normalize", "sentence_transformers.base.modules.normalize.Normalize",
                 "sentence_transformers.sentence_transformer.modules.normalize.Normalize"}
_ST_ENCODER_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json",
                       "sentence_camembert_config.json", "sentence_albert_config.json",
                       "sentence_xlm-roberta_config.json", "sentence_xlnet_config.json")
# vLLM's architecture-suffix defaults for architectures it does not know: (runner, convert)
_SUFFIX_DEFAULTS = [("ForCausalLM", ("generate", "none")), ("ForConditionalGeneration", ("generate", "none")),
                    ("ChatModel", ("generate", "none")), ("LMHeadModel", ("generate", "none")),
                    ("ForTextEncoding", ("pooling", "embed")), ("EmbeddingModel", ("pooling", "embed")),
                    ("ForSequenceClassification", ("pooling", "classify")),
                    ("ForTokenClassification", ("pooling", "classify")),
                    ("ClassificationModel", ("pooling", "classify")),
                    ("ForRewardModeling", ("pooling", "embed")), ("RewardModel", ("pooling", "embed")),
                    ("Model", ("pooling", "embed"))]


def resolve_runner(source: "ModelSource", runner: str, convert: str) -> tuple[str, str]:
    """(runner_type, convert_type) for LLM(runner=..., convert=...), with vLLM's errors for a
    model that cannot run as asked."""
    if runner not in RUNNERS:
        raise ValueError(f"Invalid runner {runner!r}; choose one of {list(RUNNERS)}")
    if convert not in CONVERTS:
        raise ValueError(f"Invalid convert {convert!r}; choose one of {list(CONVERTS)}")
    if runner == "draft":
        raise NotImplementedError("perfxlm does not support runner='draft' (speculative decoding)")
    archs = source.hf_config.get("architectures") or ["LlamaForCausalLM"]
    family = source.registered_family()
    is_pooling = family is not None and family.pooling_task is not None
    runner_type = runner
    if runner == "auto":
        runner_type = "pooling" if convert not in ("auto", "none") else _default_runner(source, archs, family)
        if runner_type != "generate":
            logger.info("Resolved `--runner auto` to `--runner %s`. Pass the value explicitly to silence this "
                        "message.", runner_type)
    convert_type = convert
    if convert == "auto":
        convert_type = _default_convert(archs, family, runner_type)
        if convert_type != "none":
            logger.info("Resolved `--convert auto` to `--convert %s`. Pass the value explicitly to silence this "
                        "message.", convert_type)
    if is_pooling and runner_type == "generate":
        raise ValueError("Embedding models do not support `--runner generate`. Use `--runner pooling` or "
                         "`--runner auto` for embedding models.")
    if runner_type == "pooling" and not is_pooling and convert_type not in ("embed", "classify"):
        raise ValueError("This model does not support `--runner pooling`. You can pass `--convert <embed|classify> "
                         "to adapt it into a pooling model.")
    if runner_type == "generate" and convert_type != "none":
        raise ValueError("This model does not support `--runner generate`.")
    return runner_type, convert_type


def _default_runner(source: "ModelSource", archs: list[str], family: "type[CausalLM] | None") -> str:
    if st_pooling_config(source) is not None:  # sentence-transformers models may use *ForCausalLM archs
        return "pooling"
    if family is not None:
        return "generate" if family.pooling_task is None else "pooling"
    for arch in archs:
        for suffix, (runner, _) in _SUFFIX_DEFAULTS:
            if arch.endswith(suffix):
                return runner
    return "generate"


def _default_convert(archs: list[str], family: "type[CausalLM] | None", runner_type: str) -> str:
    if family is not None and (family.pooling_task is None) == (runner_type == "generate"):
        return "none"
    for arch in archs:
        for suffix, (runner, convert) in _SUFFIX_DEFAULTS:
            if runner == runner_type and arch.endswith(suffix):
                return convert
    return "embed" if runner_type == "pooling" else "none"


def resolve_pooler_config(source: "ModelSource", config: Any) -> Any:
    """`config` (a perfxlm.config.PoolerConfig: the user's copy) with its unset fields filled
    from the sentence-transformers config, then the family's default pooling (vLLM: CLS for
    BERT, LAST for the decoders)."""
    for key, value in (st_pooling_config(source) or {}).items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if config.seq_pooling_type is None:
        config.seq_pooling_type = source.family.default_seq_pooling_type
    if config.tok_pooling_type is None:
        config.tok_pooling_type = "ALL"
    return config


def st_pooling_config(source: "ModelSource") -> dict[str, Any] | None:
    """vLLM's get_pooling_config: from a sentence-transformers directory's modules.json, the
    Pooling module's mode ({"seq_pooling_type": "MEAN", ...}) and use_activation = whether a
    Normalize module follows. None for a directory without modules.json (or a GGUF)."""
    modules = _json(source, "modules.json")
    if not isinstance(modules, list):
        return None
    pooling = next((m for m in modules if m.get("type") in _ST_POOLING), None)
    if pooling is None:
        return None
    config: dict[str, Any] = {"use_activation": any(m.get("type") in _ST_NORMALIZE for m in modules)}
    for key, value in (_json(source, f"{pooling.get('path', '')}/config.json") or {}).items():
        if key == "pooling_mode" and isinstance(value, str):
            name = value
        elif value is True:
            name = key
        else:
            continue
        kind = _pooling_name(name)
        if kind in SEQ_POOLING_TYPES:
            config["seq_pooling_type"] = kind
        elif kind in TOK_POOLING_TYPES:
            config["tok_pooling_type"] = kind
    return config


def _pooling_name(name: str) -> str:
    """'pooling_mode_mean_tokens' -> 'MEAN', 'pooling_mode_cls_token' -> 'CLS', 'lasttoken' -> 'LAST'."""
    name = name.replace("pooling_mode_", "").split("_", 1)[0]
    return "LAST" if "lasttoken" in name else name.upper()


def derived_max_model_len(source: "ModelSource", runner_type: str, derived: int) -> int:
    """vLLM's derived max_model_len beyond the config's `derived`: for a pooling model with
    absolute position embeddings, at most the tokenizer's model_max_length; and a
    sentence-transformers max_seq_length replaces it (the length the model was trained for)."""
    if runner_type == "pooling" and source.hf_config.get("position_embedding_type") == "absolute":
        limit = (_json(source, "tokenizer_config.json") or {}).get("model_max_length")
        if isinstance(limit, int):
            derived = min(derived, limit)
    for name in _ST_ENCODER_CONFIGS:
        encoder = _json(source, name)
        if encoder:
            return encoder.get("max_seq_length", derived)
    return derived


def _json(source: "ModelSource", name: str) -> Any:
    if source.is_gguf:
        return None
    path = Path(source.path) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file: {e}") from None
