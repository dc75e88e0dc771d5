"""Engine arguments as vLLM names them: `EngineArgs` (LLM, LLMEngine) and `AsyncEngineArgs`
(AsyncLLM, `perfxlm serve`), their command-line flags, and their resolution against the model."""

import argparse
import copy
import dataclasses
import enum
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from perfxlm import dtypes
from perfxlm.config import (KV_CACHE_DTYPES, EngineConfig, LoRAConfig, PoolerConfig, check_dtype, check_engine_args,
                            check_kv_cache_dtype, resolve_kv_cache_dtype,
                            config_max_model_len, derive_max_model_len, resolve_dtype, split_dtype)
from perfxlm.engine.structured_output import StructuredOutputsConfig
from perfxlm.models.deployable import DeployableSource
from perfxlm.models.loader import ModelSource, resolve_model
from perfxlm.models.pooling import CONVERTS, RUNNERS, derived_max_model_len, resolve_pooler_config, resolve_runner

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default


class UsageContext(enum.Enum):
    """Who builds the engine; vLLM picks batch-size defaults from it."""

    UNKNOWN_CONTEXT = "UNKNOWN_CONTEXT"
    LLM_CLASS = "LLM_CLASS"
    API_SERVER = "API_SERVER"
    OPENAI_API_SERVER = "OPENAI_API_SERVER"
    OPENAI_BATCH_RUNNER = "OPENAI_BATCH_RUNNER"
    ENGINE_CONTEXT = "ENGINE_CONTEXT"


# vLLM's CPU defaults (engine/arg_utils.py): a server keeps batches smaller than offline runs
_BATCH_DEFAULTS = {UsageContext.LLM_CLASS: (256, 4096), UsageContext.OPENAI_API_SERVER: (128, 2048)}
_ENGINE_CONTEXT_DEFAULTS = (128, 2048)


@dataclass
class EngineArgs:
    """vLLM's engine arguments that perfxlm honours; `None` means the model's or vLLM's default."""

    model: str = DEFAULT_MODEL
    runner: str = "auto"                    # "generate" / "pooling"; auto: from the architecture
    convert: str = "auto"                   # "embed" / "classify" adapt a decoder into a pooling model
    served_model_name: str | list[str] | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Any = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_logprobs: int = 20
    generation_config: str = "auto"
    override_generation_config: dict[str, Any] | None = None  # merged over the generation config
    scheduling_policy: str = "fcfs"
    quantization: str | None = None
    hw_plugin: str | None = None            # perfxlm's own: the plugin that runs the graph
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"            # auto: the model's dtype; also bfloat16, float16, float32 (perfxlm's own)
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    disable_log_stats: bool = False
    hf_overrides: dict[str, Any] | Callable[[dict], dict] | None = None
    structured_outputs_config: StructuredOutputsConfig | dict[str, Any] | None = None  # None: vLLM's defaults
    pooler_config: PoolerConfig | dict[str, Any] | None = None  # a pooling model's; None: the model's own
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    @property
    def served_model_names(self) -> list[str]:
        names = self.served_model_name
        if not names:
            return [self.model]
        return [names] if isinstance(names, str) else list(names)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """The engine flags (not the model, which `perfxlm serve` takes as its positional)."""
        bool_flag = argparse.BooleanOptionalAction
        g = parser.add_argument_group("engine")
        g.add_argument("--runner", default="auto", choices=list(RUNNERS),
                       help="'pooling' serves an embedding or classification model; auto: from the architecture")
        g.add_argument("--convert", default="auto", choices=list(CONVERTS),
                       help="'embed' or 'classify' adapt a decoder into a pooling model")
        g.add_argument("--pooler-config", type=json_dict_arg, default=None,
                       help='JSON, e.g. \'{"pooling_type": "MEAN", "use_activation": false}\'')
        g.add_argument("--enable-lora", action="store_true", help="serve requests with PEFT LoRA adapters")
        g.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (LoRA slots)")
        g.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank")
        g.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in memory (default: max_loras)")
        g.add_argument("--served-model-name", nargs="+", default=None,
                       help="names the server answers to; the first is echoed in responses (default: the model)")
        g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
        g.add_argument("--revision", default=None)
        g.add_argument("--dtype", default="auto", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--max-model-len", type=parse_model_len, default=None,
                       help="context length; accepts 1k (1000), 1K (1024); default: the model's")
        g.add_argument("--max-num-seqs", type=int, default=None)
        g.add_argument("--max-num-batched-tokens", type=int, default=None)
        g.add_argument("--block-size", type=int, default=None)
        g.add_argument("--enable-prefix-caching", action=bool_flag, default=None)
        g.add_argument("--enable-chunked-prefill", action=bool_flag, default=None)
        g.add_argument("--max-logprobs", type=int, default=20, help="cap on logprobs per token; -1: no cap")
        g.add_argument("--generation-config", default="auto",
                       help="'auto': the model's generation_config.json gives the default sampling values; "
                            "'vllm': vLLM's neutral defaults")
        g.add_argument("--override-generation-config", type=json_dict_arg, default=None,
                       help='JSON merged over the generation config, e.g. \'{"temperature": 0.5}\'')
        g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                       help="fcfs (first come, first served); priority is not supported yet")
        g.add_argument("--quantization", "-q", default=None, help="'gguf' keeps GGUF blocks (the default for "
                                                                 "a quantised GGUF with dtype auto)")
        g.add_argument("--hw-plugin", default=None, help="cpu, torch, rvv, ... (default: the best available)")
        g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
        g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="auto: the model's dtype (bf16 for a bf16 model, whose activations run in float32); "
                            "float16 (llama.cpp's cache) rounds keys and values to f16, float32 keeps them unrounded")
        g.add_argument("--skip-tokenizer-init", action=bool_flag, default=False)
        g.add_argument("--trust-remote-code", action=bool_flag, default=False)
        g.add_argument("--disable-log-stats", action=bool_flag, default=False)
        g.add_argument("--structured-outputs-config", type=json_dict_arg, default=None,
                       help='JSON, e.g. \'{"backend": "xgrammar", "disable_any_whitespace": true}\' '
                            "(backends: auto, xgrammar)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def check(self) -> None:
        """Every check that needs no model: a bad argument fails before anything is read."""
        check_engine_args(dtype=self.dtype, seed=self.seed, max_model_len=self.max_model_len,
                          max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                          block_size=self.block_size, kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                          enable_prefix_caching=self.enable_prefix_caching,
                          enable_chunked_prefill=self.enable_chunked_prefill, max_logprobs=self.max_logprobs,
                          skip_tokenizer_init=self.skip_tokenizer_init, trust_remote_code=self.trust_remote_code,
                          generation_config=self.generation_config, hw_plugin=self.hw_plugin, select_hw_plugin=True)
        self.lora_config()
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.scheduling_policy != "fcfs":
            raise NotImplementedError(f"perfxlm: scheduling_policy={self.scheduling_policy!r} is not supported; "
                                      "requests are scheduled first come, first served ('fcfs')")
        if self.override_generation_config is not None and not isinstance(self.override_generation_config, dict):
            raise ValueError(f"override_generation_config must be a dict, got {self.override_generation_config!r}.")
        if self.quantization not in (None, "gguf"):
            raise NotImplementedError(f"perfxlm: quantization={self.quantization!r} is not supported; only "
                                      "'gguf' (GGUF blocks run natively)")
        StructuredOutputsConfig.coerce(self.structured_outputs_config)  # a backend we lack fails here
        if self.runner not in RUNNERS:
            raise ValueError(f"Invalid runner {self.runner!r}; choose one of {list(RUNNERS)}")
        if self.convert not in CONVERTS:
            raise ValueError(f"Invalid convert {self.convert!r}; choose one of {list(CONVERTS)}")
        PoolerConfig.coerce(self.pooler_config)

    def lora_config(self) -> LoRAConfig | None:
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras) if self.enable_lora else None

    def create_engine_config(self, usage_context: UsageContext | None = None) -> tuple[EngineConfig, ModelSource]:
        """Resolve the arguments against the model's config (no weights are read)."""
        self.check()
        source = resolve_model(self.model, self.revision)
        if self.hf_overrides is not None:
            source.hf_config = (self.hf_overrides(source.hf_config) if callable(self.hf_overrides)
                                else {**source.hf_config, **self.hf_overrides})
        runner_type, convert_type = resolve_runner(source, self.runner, self.convert)
        pooler_config = None
        if runner_type == "pooling":
            source.convert = convert_type  # the family adapted before anything reads it
            user = PoolerConfig.coerce(self.pooler_config)
            pooler_config = resolve_pooler_config(source, copy.copy(user) if user else PoolerConfig())
            if self.enable_lora:
                raise NotImplementedError("perfxlm does not support LoRA adapters on pooling models yet")
        elif self.pooler_config is not None:
            raise ValueError("pooler_config is only for pooling models (runner='pooling')")
        if self.quantization == "gguf" and not source.is_gguf:
            raise ValueError(f"quantization='gguf' needs a .gguf model file; {self.model!r} is not one")
        # vLLM runs a GGUF quantised; so do we unless an explicit dtype asks for dense weights
        keep_blocks = self.quantization == "gguf" or (
            self.quantization is None and self.dtype == "auto" and source.is_quantized())
        max_seqs, max_tokens = _BATCH_DEFAULTS.get(usage_context, _ENGINE_CONTEXT_DEFAULTS)
        optional = {"block_size": self.block_size, "hw_plugin": self.hw_plugin,
                    **self._chunking_and_prefix_caching(source, pooler_config)}
        max_model_len = derive_max_model_len(source.hf_config, self.max_model_len, derived_max_model_len(
            source, runner_type, config_max_model_len(source.hf_config)))
        if optional["enable_chunked_prefill"] is False:  # vLLM's default then fits a whole prompt
            max_tokens = max(max_tokens, max_model_len)
        dtype, weight_dtype = resolve_dtypes(source, self.dtype, keep_blocks, self.hw_plugin)
        kv_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype, weight_dtype or dtype)
        if isinstance(source, DeployableSource):  # its graph fixes the caches' dtype
            from perfxlm.engine.graph_runner import GraphSpec, load_graph
            caches = GraphSpec.of_graph(load_graph(source.graph_path)[0]).caches
            exported = caches[0].dtype if caches else str(kv_dtype).removeprefix("torch.")
            if self.kv_cache_dtype not in ("auto", exported):
                raise ValueError(f"{source.path} was exported with a {exported} KV cache; it cannot run with "
                                 f"kv_cache_dtype={self.kv_cache_dtype!r}. Use kv_cache_dtype='auto'.")
            kv_dtype = getattr(dtypes, exported)
        config = EngineConfig(
            model=self.model,
            dtype=dtype,
            weight_dtype=weight_dtype,
            kv_cache_dtype=kv_dtype,
            max_model_len=max_model_len,
            seed=0 if self.seed is None else self.seed,
            tokenizer=self.tokenizer,
            max_num_seqs=self.max_num_seqs or max_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or max_tokens,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            max_logprobs=self.max_logprobs,
            skip_tokenizer_init=self.skip_tokenizer_init,
            trust_remote_code=self.trust_remote_code,
            generation_config=self.generation_config,
            override_generation_config=dict(self.override_generation_config or {}),
            quantization="gguf" if keep_blocks else None,
            structured_outputs_config=StructuredOutputsConfig.coerce(self.structured_outputs_config),
            runner_type=runner_type,
            convert_type=convert_type,
            pooler_config=pooler_config,
            lora_config=self.lora_config(),
            **{k: v for k, v in optional.items() if v is not None},
        )
        return config, source

    def _chunking_and_prefix_caching(self, source: ModelSource, pooler: PoolerConfig | None) -> dict[str, Any]:
        """enable_chunked_prefill and enable_prefix_caching (None: the default, on). vLLM turns both
        off for a pooling model that needs every token of a prompt in one step: a bidirectional
        encoder, or CLS / MEAN pooling over a decoder. perfxlm keeps them off even when asked, since
        chunks or cached blocks would give wrong embeddings there, and says so."""
        wanted = {"enable_chunked_prefill": self.enable_chunked_prefill,
                  "enable_prefix_caching": self.enable_prefix_caching}
        if pooler is None or (source.family.is_causal and pooler.seq_pooling_type == "LAST"
                              and pooler.tok_pooling_type != "STEP"):
            return wanted
        for name, value in wanted.items():
            if value:
                logger.warning("%s=True is not supported for this pooling model (%s pooling%s): disabled", name,
                               pooler.seq_pooling_type, "" if source.family.is_causal else ", bidirectional attention")
        return dict.fromkeys(wanted, False)


@dataclass
class AsyncEngineArgs(EngineArgs):
    """EngineArgs for AsyncLLM and `perfxlm serve`."""

    enable_log_requests: bool = False
    stream_interval: int = 1  # tokens per streamed output (the first and last are sent at once)

    def check(self) -> None:
        super().check()
        if isinstance(self.stream_interval, bool) or not isinstance(self.stream_interval, int) \
                or self.stream_interval < 1:
            raise ValueError(f"stream_interval must be an integer of at least 1, got {self.stream_interval!r}.")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        super().add_cli_args(parser)
        parser.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                            help="log each request's id and sampling parameters (its prompt at DEBUG)")
        parser.add_argument("--stream-interval", type=int, default=1,
                            help="tokens per streamed chunk; the first and last are sent at once")
        return parser


def json_dict_arg(value: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {value!r} ({e})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return parsed


def parse_model_len(value: str) -> int:
    """vLLM's --max-model-len: an int, or 1k (1000) / 1K (1024) / 25.6k; -1 and 'auto' are not
    supported here (they size the context from free memory)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid max model length {value!r}: use an integer or a size like "
                                         "1k (1000) or 1K (1024)")
    number, suffix = m.groups()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
    return int(float(number) * scale)


def resolve_dtypes(source: ModelSource | DeployableSource, requested: Any, keep_blocks: bool,
                   hw_plugin: str | None) -> tuple[Any, Any]:
    """(activations' dtype, dense weights' dtype or None), for the engine and `perfxlm export`:
    vLLM's rule (config.resolve_dtype), but GGUF blocks with dtype auto run float32 activations,
    as llama.cpp keeps them, and bfloat16 runs bf16 weights under fp32 activations where the
    plugin says so (split_dtype). A deployable directory runs in the dtypes it was exported in."""
    if not isinstance(source, DeployableSource):
        auto_blocks = keep_blocks and isinstance(requested, str) and requested == "auto"
        dtype = resolve_dtype("float32" if auto_blocks else requested, source.hf_config)
        return (dtype, None) if keep_blocks else split_dtype(dtype, hw_plugin)
    check_dtype(requested)
    name = str(requested).removeprefix("torch.")
    exported = source.weight_dtype_name
    if name != "auto" and {"float": "float32", "half": "float16"}.get(name, name) != exported:
        raise ValueError(f"{source.path} was exported in {exported}; it cannot run in dtype {name!r}. Use "
                         f"dtype='auto', or export it again with `perfxlm export --dtype {name}`.")
    act = getattr(dtypes, source.dtype_name)
    return act, (getattr(dtypes, exported) if exported != source.dtype_name else None)
