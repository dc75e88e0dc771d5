"""The plugin interface, in the spirit of ggml's backends: small and hardware-neutral.

A plugin runs graph nodes on its device. Host data crosses the boundary as numpy
arrays (`upload` / `download`); everything else stays in the plugin's own buffers.
Plugins are found through the entry-point group `perfxlm.hw_plugins`, so a plugin
can ship as its own wheel:

    entry_points={"perfxlm.hw_plugins": ["mychip = mychip_perfxlm:MyChipPlugin"]}
"""

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "perfxlm.hw_plugins"
REFERENCE = "torch"
API_VERSION = 1  # bumped when this interface changes incompatibly; a plugin states the one it implements
# this project's own plugins (setup.py's entry points), found also where perfxlm runs from a source tree
# that was never pip-installed (a board's Python with PYTHONPATH set): no entry point metadata there
BUILTIN_PLUGINS = {"torch": "hw_plugins.torch_ref:TorchPlugin", "cpu": "hw_plugins.cpu:CpuPlugin",
                   "rvv": "hw_plugins.cpu:RvvPlugin", "cuda": "hw_plugins.cuda:CudaPlugin",
                   "dcu": "hw_plugins.cuda:DcuPlugin"}


@dataclass
class Node:
    """One graph node as the runner hands it to a plugin (attrs decoded to Python values)."""

    op_type: str                  # a row of graph_export/ops.py
    name: str
    inputs: list[str]             # value names in the op's input order; "" for an absent optional input
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    plugin: "HwPlugin | None" = None  # the plugin the runner gave it to


class CompiledStep(Protocol):
    """A whole graph step compiled by a plugin (HwPlugin.compile_step)."""

    logits: np.ndarray            # (max N, V) float32: the last step's logits rows

    def run(self, feeds: dict[str, np.ndarray]) -> None:
        """One step: feeds are the graph inputs (ops.GRAPH_INPUTS) as int64 host arrays."""


# (logits (R, V) float32 host rows, u (R,) float32 in [0, 1)) -> (R,) int64 tokens by inverse
# CDF of softmax(row); -1 where a row has no finite max
NativeSampler = Callable[[np.ndarray, np.ndarray], np.ndarray]


class HwPlugin(ABC):
    """One device. Subclasses set `name` and `priority` (higher wins the default choice)."""

    name: str = ""
    priority: int = 0
    api_version: int | None = None  # each plugin class states the API_VERSION it implements
    # a bfloat16 model runs bf16 weights under float32 activations here (perfxlm.config.split_dtype):
    # True where bf16 products accumulate in fp32 anyway, so fp32 activations cost no arithmetic
    bf16_weights_f32_activations: bool = False

    @abstractmethod
    def is_available(self) -> bool:
        """Whether this plugin can run here. Must never raise."""

    def unavailable_reason(self) -> str | None:
        """Why is_available() is False, in one line (None when available)."""
        return None

    @abstractmethod
    def supports(self, op_type: str, dtypes: tuple[str, ...]) -> bool:
        """Whether run() implements op_type for these input dtypes (numpy names)."""

    @abstractmethod
    def alloc(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A new uninitialised buffer on the device."""

    @abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """Host array -> device buffer."""

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A new zero-filled buffer on the device (the KV caches)."""
        return self.upload(np.zeros(shape, dtype=dtype))

    @abstractmethod
    def download(self, buf: Any) -> np.ndarray:
        """Device buffer -> host array."""

    @abstractmethod
    def run(self, node: Node, inputs: list[Any], outputs: list[Any]) -> None:
        """Execute one graph node: read `inputs`, write into the preallocated `outputs`."""

    def synchronize(self) -> None:
        """Wait until every run() issued so far has finished (no-op on synchronous devices)."""

    def compile_step(self, nodes: list[Node], buffer: Callable[[str], Any], inputs: dict[str, np.ndarray],
                     rows_n: set[str]) -> CompiledStep | None:
        """Optional: when this plugin runs every node, compile the whole step once (fusions, one
        call a step). `buffer(name)` is the fixed buffer of a weight, cache or planned
        activation at its largest size; `inputs` are host staging arrays for the graph inputs;
        `rows_n` names the values whose row count is the step's N (logits rows), not T.
        None (the default): the runner calls run() node by node."""
        return None

    def native_sampler(self) -> NativeSampler | None:
        """Optional: a sampler for the unseeded random rows of logits this plugin produced."""
        return None

    def set_batch_invariant(self, on: bool) -> bool:
        """Batch invariance (PERFXLM_BATCH_INVARIANT=1): make every op's result for a token
        bitwise independent of the other tokens in the step. Returns whether the plugin
        can; by default a plugin cannot, and is only ever asked to turn it off."""
        return not on

    def set_quant_activations(self, mode: str) -> bool:
        """The activations that quantised (GGUF block) weights multiply
        (PERFXLM_QUANT_ACTIVATIONS): "auto", the plugin's own choice; "int8", "int16" or "bf16"
        at every token count; "int16-decode" ("auto" on a narrow model), int16 in decode and a
        prefill as the plugin likes. Returns whether the plugin can; by default only "auto"."""
        return mode == "auto"


def discover_plugins() -> dict[str, type[HwPlugin]]:
    """name -> plugin class for every installed `perfxlm.hw_plugins` entry point that loads and
    implements this API_VERSION."""
    found: dict[str, type[HwPlugin]] = {}
    eps = list(entry_points(group=ENTRY_POINT_GROUP))
    names = {ep.name for ep in eps}
    eps += [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in BUILTIN_PLUGINS.items() if name not in names]
    for ep in eps:
        try:
            cls = ep.load()
        except ImportError as e:  # e.g. the torch plugin where PyTorch is not installed
            logger.debug("hw plugin %r (%s) cannot be imported here: %s", ep.name, ep.value, e)
            continue
        except Exception as e:  # a broken third-party plugin must not break perfxlm
            logger.warning("hw plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        version = getattr(cls, "api_version", None)  # a subclass's own: HwPlugin states none
        if version != API_VERSION:
            logger.warning("hw plugin %r (%s) implements plugin API %s; this perfxlm needs %d: skipped",
                           ep.name, ep.value, version, API_VERSION)
            continue
        found[ep.name] = cls
    return found


def available_plugins() -> list[tuple[str, bool, str | None]]:
    """(name, available, reason if not) for every discovered plugin, best first."""
    rows = []
    for name, cls in discover_plugins().items():
        plugin = cls()
        ok = _safe_available(plugin)
        rows.append((name, ok, None if ok else (plugin.unavailable_reason() or "not available"), plugin.priority))
    rows.sort(key=lambda r: (not r[1], -r[3]))
    return [r[:3] for r in rows]


def select_plugin(name: str | None = None) -> HwPlugin:
    """The plugin `name` (or $PERFXLM_PLUGIN), else the best available one."""
    name = name or os.environ.get("PERFXLM_PLUGIN") or None
    plugins = discover_plugins()
    if name is not None:
        if name not in plugins:
            raise ValueError(f"Unknown hw_plugin {name!r}; installed plugins: {sorted(plugins)}")
        plugin = plugins[name]()
        if not _safe_available(plugin):
            raise RuntimeError(f"hw_plugin {name!r} is not available here: {plugin.unavailable_reason()}")
        return plugin
    candidates = [cls() for cls in plugins.values()]
    candidates = [p for p in candidates if _safe_available(p)]
    if not candidates:
        raise RuntimeError(f"No hw plugin is available; installed: {sorted(plugins)}")
    return max(candidates, key=lambda p: p.priority)


def _safe_available(plugin: HwPlugin) -> bool:
    try:
        return bool(plugin.is_available())
    except Exception as e:  # is_available must not raise; treat a plugin that does as absent
        logger.debug("%s.is_available() raised %s", plugin.name, e)
        return False
