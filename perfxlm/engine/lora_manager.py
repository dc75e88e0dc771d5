"""Which adapter sits in which LoRA slot, as vLLM's LoRA model manager does it.

The graph holds `max_loras` slots per LoRA-able Linear (perfxlm/lora/layers.py). Adapters are
read from disk once and kept (up to `max_cpu_loras`, least recently used dropped first); a
request's adapter is written into a slot when the scheduler admits it, evicting the least
recently used adapter that no running request holds. The scheduler admits a request only when
its adapter has a slot or one can be freed, so at most `max_loras` adapters run in a step.
"""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from perfxlm.config import LoRAConfig
from perfxlm.lora.peft import LoRAAdapter, load_adapter
from perfxlm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


# writes the slot's stacks into the executor: (graph weight name -> whole (L, ...) array)
WriteWeights = Callable[[dict[str, np.ndarray]], None]


class LoRAManager:
    def __init__(self, config: LoRAConfig, shapes: dict[str, tuple[int, int]], module_of: Callable[[str], str | None],
                 write_weights: WriteWeights) -> None:
        """shapes: LoRA-able module path -> its Linear's (out, in) features; module_of: an HF module
        path -> ours (None: not LoRA-able)."""
        self.config = config
        self.module_of = module_of
        self.write_weights = write_weights
        L, R = config.max_loras, config.max_lora_rank
        self.a = {m: np.zeros((L, R, k), np.float32) for m, (n, k) in shapes.items()}   # (L, R, K)
        self.b = {m: np.zeros((L, n, R), np.float32) for m, (n, k) in shapes.items()}   # (L, N, R)
        self.scale = np.zeros(L, np.float32)                                             # (L,)
        self.slots: list[str | None] = [None] * L            # adapter name in each slot
        self.slot_use: OrderedDict[str, int] = OrderedDict()  # adapter name -> slot, least recent first
        self.cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, config: LoRAConfig, model: Any, write_weights: WriteWeights) -> "LoRAManager":
        """The manager of a model family's LoRA-able Linears (`model` may be on the meta device).
        An adapter's HF module path maps to ours through the family's checkpoint names."""
        from perfxlm.models.lora import lora_targets
        from perfxlm.models.loader import hf_parameter_name
        targets = lora_targets(model)
        shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in targets}

        def module_of(hf_module: str) -> str | None:
            ours = hf_parameter_name(type(model), f"{hf_module}.weight").removesuffix(".weight")
            return ours if ours in shapes else None
        return cls(config, shapes, module_of, write_weights)

    def load(self, lora: LoRARequest) -> LoRAAdapter:
        """The adapter, read once (errors raise here, before a request is queued). AsyncLLM calls
        it from the caller's thread while the engine thread writes slots: one at a time."""
        with self._lock:
            return self._load(lora)

    def _load(self, lora: LoRARequest) -> LoRAAdapter:
        adapter = self.cpu.get(lora.lora_name)
        if adapter is None:
            adapter = load_adapter(lora.lora_path, self.config.max_lora_rank, self.module_of)
            self.cpu[lora.lora_name] = adapter
            limit = self.config.max_cpu_loras or self.config.max_loras
            # drop the least recently used adapters not in a slot (those in one must stay)
            spare = [n for n in self.cpu if n not in self.slot_use and n != lora.lora_name]
            for name in spare[:max(0, len(self.cpu) - limit)]:
                del self.cpu[name]
        self.cpu.move_to_end(lora.lora_name)
        return adapter

    def can_run(self, lora: LoRARequest | None, running: set[str]) -> bool:
        """Whether a request with this adapter can join a step whose running requests hold the
        adapters `running`."""
        return lora is None or lora.lora_name in running or len(running) < self.config.max_loras

    def slot(self, lora: LoRARequest, running: set[str]) -> int:
        """The adapter's slot, written there first if need be, evicting the least recently used
        adapter no running request holds."""
        name = lora.lora_name
        if name in self.slot_use:
            self.slot_use.move_to_end(name)
            return self.slot_use[name]
        free = [i for i, n in enumerate(self.slots) if n is None]
        if free:
            s = free[0]
        else:
            victim = next(n for n in self.slot_use if n not in running)  # can_run said one exists
            s = self.slot_use.pop(victim)
            logger.debug("LoRA slot %d: %s replaces %s", s, name, victim)
        self._write(s, self.load(lora))
        self.slots[s] = name
        self.slot_use[name] = s
        return s

    def _write(self, s: int, adapter: LoRAAdapter) -> None:
        r = adapter.rank
        for m in self.a:
            self.a[m][s] = 0
            self.b[m][s] = 0
            pair = adapter.modules.get(m)
            if pair is not None:
                self.a[m][s, :r] = pair.a
                self.b[m][s, :, :r] = pair.b
        self.scale[s] = adapter.scaling
        weights = {f"{m}.lora.scale": self.scale for m in self.a}
        weights.update({f"{m}.lora.a": self.a[m] for m in self.a})
        weights.update({f"{m}.lora.b": self.b[m] for m in self.b})
        self.write_weights(weights)
