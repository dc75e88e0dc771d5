"""perfxlm: a vLLM-compatible inference engine. `from perfxlm import LLM, SamplingParams`."""

import importlib
import logging
import os

from perfxlm.version import __version__, __version_tuple__

_MODULE_ATTRS = {
    "LLM": "perfxlm.entrypoints.llm",
    "LLMEngine": "perfxlm.engine.llm_engine",
    "AsyncLLM": "perfxlm.engine.async_llm",
    "AsyncLLMEngine": "perfxlm.engine.async_llm",
    "EngineArgs": "perfxlm.engine.arg_utils",
    "ModelRegistry": "perfxlm.models.registry",
    "AsyncEngineArgs": "perfxlm.engine.arg_utils",
    "EngineConfig": "perfxlm.config",
    "SamplingParams": "perfxlm.sampling_params",
    "RequestOutputKind": "perfxlm.sampling_params",
    "StructuredOutputsParams": "perfxlm.sampling_params",
    "PoolingParams": "perfxlm.pooling_params",
    "RequestOutput": "perfxlm.outputs",
    "CompletionOutput": "perfxlm.outputs",
    "PoolingOutput": "perfxlm.outputs",
    "PoolingRequestOutput": "perfxlm.outputs",
    "EmbeddingOutput": "perfxlm.outputs",
    "EmbeddingRequestOutput": "perfxlm.outputs",
    "ClassificationOutput": "perfxlm.outputs",
    "ClassificationRequestOutput": "perfxlm.outputs",
    "ScoringOutput": "perfxlm.outputs",
    "ScoringRequestOutput": "perfxlm.outputs",
    "PromptType": "perfxlm.inputs",
    "TextPrompt": "perfxlm.inputs",
    "TokensPrompt": "perfxlm.inputs",
    "Logprob": "perfxlm.logprobs",
}

__all__ = ["__version__", "__version_tuple__", *_MODULE_ATTRS]


def __getattr__(name: str):  # lazy, as vllm/__init__.py: `import perfxlm` stays cheap
    if name in _MODULE_ATTRS:
        return getattr(importlib.import_module(_MODULE_ATTRS[name]), name)
    raise AttributeError(f"module 'perfxlm' has no attribute {name!r}")


def _configure_logging() -> None:
    """Log INFO lines to stderr like vLLM does, unless PERFXLM_CONFIGURE_LOGGING=0."""
    if os.environ.get("PERFXLM_CONFIGURE_LOGGING", os.environ.get("VLLM_CONFIGURE_LOGGING", "1")) == "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    level = os.environ.get("PERFXLM_LOGGING_LEVEL", os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))
    for name in ("perfxlm", "graph_export", "hw_plugins"):  # the three packages of this project
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = False


_configure_logging()
