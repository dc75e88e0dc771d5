"""How an engine gets its executor: the model's graph spec (before any weight is read), the KV
cache's size in blocks, and the executor itself, the exported graph on the hardware plugins or
torch (PERFXLM_EXECUTOR=eager)."""

import logging
import os
from pathlib import Path
from typing import Any

from hw_plugins.base import REFERENCE, select_plugin
from perfxlm.config import EngineConfig, config_hidden_size, resolve_quant_activations
from perfxlm.engine.graph_runner import GraphRunner, GraphSpec, load_graph
from perfxlm.engine.model_runner import Executor, GraphExecutor
from perfxlm.models.deployable import DeployableSource
from perfxlm.models.loader import ModelSource

logger = logging.getLogger(__name__)


def graph_spec(source: ModelSource | DeployableSource, cache_dtype: Any, lora: bool) -> GraphSpec:
    """The model's graph's spec, which sizes the KV cache before any weight is read: a deployable
    directory's from its graph, a checkpoint's from the model's shapes (torch, meta device) with
    caches in cache_dtype (the engine's kv_cache_dtype resolved, which the export writes them in),
    with LoRA slots or not."""
    if isinstance(source, DeployableSource):
        if lora:
            raise NotImplementedError(f"{source.path} is a deployable directory: LoRA needs a graph exported with "
                                      "LoRA slots from the model's checkpoint (run LLM on the checkpoint)")
        return GraphSpec.of_graph(load_graph(source.graph_path)[0])
    from perfxlm.engine.eager_executor import model_spec
    return model_spec(source.meta_model(), cache_dtype, lora=lora)


def build_executor(config: EngineConfig, source: ModelSource | DeployableSource, spec: GraphSpec,
                   num_blocks: int) -> Executor:
    """The executor: the exported graph on the hardware plugins, or torch (PERFXLM_EXECUTOR=eager)."""
    lora = (config.lora_config.max_loras, config.lora_config.max_lora_rank) if config.lora_config else None
    if os.environ.get("PERFXLM_EXECUTOR", "graph") == "eager":
        if config.batch_invariant:
            raise ValueError("PERFXLM_BATCH_INVARIANT=1 needs the graph executor (PERFXLM_EXECUTOR=eager "
                             "runs torch, whose GEMMs depend on the batch)")
        if config.quant_activations != "auto" and config.quantization:
            raise ValueError(f"PERFXLM_QUANT_ACTIVATIONS={config.quant_activations} needs the graph executor "
                             "(PERFXLM_EXECUTOR=eager runs torch on weights dequantised to the model's dtype)")
        # a deployable directory refuses: its weights are in its graph
        model = source.load_weights(config.dtype, config.weight_dtype)
        if lora:
            from perfxlm.models.lora import enable_lora
            enable_lora(model, *lora)
        from perfxlm.engine.eager_executor import EagerExecutor  # torch: only for this executor
        return EagerExecutor(model, spec, num_blocks, config.block_size)
    graph = _graph(source, config.dtype, config.quantization, lora, config.weight_dtype, config.cache_dtype)
    executor = _graph_executor(config, graph, num_blocks, _quant_activations(config, source))
    if executor.spec != spec:
        raise RuntimeError(f"the exported graph's vocabulary and KV caches {executor.spec} differ from the "
                           f"model's {spec}")
    return executor


def kv_cache_blocks(config: EngineConfig, spec: GraphSpec) -> int:
    """KV cache blocks in the configured budget; ValueError (vLLM's message) when they cannot hold
    one request of max_model_len."""
    per_block = spec.kv_bytes_per_block(config.block_size)
    num_blocks = config.kv_cache_bytes() // per_block
    if num_blocks * config.block_size < config.max_model_len:
        need = -(-config.max_model_len // config.block_size) * per_block
        raise ValueError(
            f"To serve at least one request with the model's max seq len ({config.max_model_len}), "
            f"{need / (1 << 30):.2f} GiB KV cache is needed, which is larger than the available KV "
            f"cache memory ({config.kv_cache_bytes() / (1 << 30):.2f} GiB). Based on the available "
            f"memory, the estimated maximum model length is {num_blocks * config.block_size}. Try "
            "increasing `kv_cache_memory_bytes` (or VLLM_CPU_KVCACHE_SPACE) or decreasing "
            "`max_model_len` when initializing the engine.")
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s); maximum concurrency for %d tokens "
                "per request: %.2fx", num_blocks, config.block_size, num_blocks * per_block / (1 << 30),
                spec.caches[0].dtype if spec.caches else "-", config.max_model_len,
                num_blocks * config.block_size / config.max_model_len)
    return num_blocks


def _quant_activations(config: EngineConfig, source: ModelSource | DeployableSource) -> str:
    """The activations this model's GGUF blocks multiply: PERFXLM_QUANT_ACTIVATIONS, "auto"
    resolved for the model's width (config.resolve_quant_activations)."""
    if not config.quantization:
        return config.quant_activations
    return resolve_quant_activations(config.quant_activations, config_hidden_size(source.hf_config))


def _graph_executor(cfg: EngineConfig, graph: Path, num_blocks: int, quant_activations: str) -> Executor:
    """The graph on its plugins, each told the engine's numeric modes. quant_activations is
    cfg's resolved for the model: where a plugin cannot run that, every plugin keeps the mode
    asked for, which one that cannot run is refused. cfg.quant_activations ends as the mode
    that runs (bench quality's rows name it)."""
    runner = GraphRunner(graph, select_plugin(cfg.hw_plugin), lambda: select_plugin(REFERENCE),
                         cfg.max_num_batched_tokens, num_blocks, cfg.block_size)
    plugins = {node.plugin for node in runner.nodes}
    for plugin in plugins:
        if not plugin.set_batch_invariant(cfg.batch_invariant):
            raise ValueError(f"PERFXLM_BATCH_INVARIANT=1: hw_plugin {plugin.name!r} runs nodes here but "
                             "cannot make them batch invariant (the cpu and rvv plugins can)")
    if not all([plugin.set_quant_activations(quant_activations) for plugin in plugins]):
        quant_activations = cfg.quant_activations
        for plugin in plugins:
            if not plugin.set_quant_activations(quant_activations):
                raise ValueError(f"PERFXLM_QUANT_ACTIVATIONS={quant_activations}: hw_plugin {plugin.name!r} runs "
                                 "nodes here and cannot run quantised weights on those activations (bf16 needs "
                                 "the cpu plugin on an AVX512-BF16 or AMX CPU)")
    if quant_activations != cfg.quant_activations:
        logger.info("GGUF blocks multiply x at 16 bits in decode (PERFXLM_QUANT_ACTIVATIONS=auto on a model this "
                    "narrow; =int16 for 16 bits in prefill too, =int8 for llama.cpp's arithmetic)")
    cfg.quant_activations = quant_activations
    return GraphExecutor(runner)


def _graph(source: ModelSource | DeployableSource, dtype: Any, quantization: str | None,
           lora: tuple[int, int] | None, weight_dtype: Any, cache_dtype: Any) -> Path:
    """The graph to run: a deployable directory's own, else the graph cache's (exported on first use)."""
    if isinstance(source, DeployableSource):
        return source.graph_path
    from perfxlm.models.graph_cache import cached_graph  # exports through torch
    return cached_graph(source, dtype, quantization, lora, weight_dtype, cache_dtype)
