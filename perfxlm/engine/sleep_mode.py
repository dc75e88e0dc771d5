"""Sleep mode (vLLM's `LLM.sleep` / `wake_up`): what is asleep, and freeing the KV cache in place.

vLLM's levels: 0 pauses scheduling; 1 also discards the KV cache (and moves the weights to host
memory, where perfxlm's cpu plugin keeps them anyway); 2 also discards the weights. perfxlm
discards the KV cache without moving it: the compiled step holds the caches' addresses, so
their pages are handed back to the OS (MADV_DONTNEED on the cpu plugin's anonymous mappings,
which read back as zeros) or, for buffers that are not such mappings, zero-filled. Level 2
drops the whole executor; `wake_up` builds a new one from the graph cache.
"""

import logging
import mmap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph_export.ops import is_cache_input

logger = logging.getLogger(__name__)

SLEEP_TAGS = ("weights", "kv_cache")
SLEEP_MODES = ("abort", "wait", "keep")


@dataclass
class SleepMode:
    """The engine's sleep state: `paused` stops scheduling; `sleeping_tags` are what is released."""

    paused: bool = False
    sleeping_tags: set[str] = field(default_factory=set)
    level: int = 0                  # the deepest level slept at since the last full wake-up

    def is_sleeping(self) -> bool:
        return self.paused or bool(self.sleeping_tags)

    def check_awake(self) -> None:
        # vLLM queues requests on a sleeping engine and never runs them (an offline generate hangs);
        # refuse them instead
        if self.is_sleeping():
            raise RuntimeError(f"The engine is sleeping (sleep(level={self.level})): call wake_up() before "
                               "adding requests")

    def check_sleep_args(self, level: int, mode: str, has_requests: bool) -> None:
        if level not in (0, 1, 2):
            raise ValueError(f"Invalid sleep level {level!r}: expected 0, 1 or 2")
        if mode not in SLEEP_MODES:
            raise ValueError(f"Invalid pause mode {mode!r}: expected one of {SLEEP_MODES}")
        if level >= 1 and mode != "abort" and has_requests:
            raise RuntimeError(f"sleep(level={level}, mode={mode!r}) would discard the KV cache of running "
                               "requests; finish or abort them first, or use mode='abort'")

    def take_tags(self, tags: list[str] | None) -> set[str]:
        """The released tags `wake_up(tags)` brings back, removed from `sleeping_tags` (vLLM's
        rules: a tag that is not asleep wakes nothing; "scheduling" only resumes)."""
        wanted = set(SLEEP_TAGS) if tags is None else {t for t in tags if t != "scheduling"}
        if tags is not None and not wanted:
            return set()
        if not self.sleeping_tags:
            if self.paused and tags is None:
                return set()
            logger.warning("Executor is not sleeping.")
            return set()
        unknown = wanted - self.sleeping_tags if tags is not None else set()
        if unknown:
            logger.warning("Tag %s is not in sleeping tags %s", sorted(unknown)[0], self.sleeping_tags)
            return set()
        wanted &= self.sleeping_tags
        self.sleeping_tags -= wanted
        return wanted

    def resume_if_awake(self) -> bool:
        if self.sleeping_tags:
            return False
        self.paused = False
        self.level = 0
        return True


def kv_cache_buffers(executor: Any) -> list[Any]:
    """The KV cache buffers of a GraphExecutor (graph runner values) or an EagerExecutor."""
    if executor is None:
        return []
    runner = getattr(executor, "runner", None)
    if runner is not None:
        return [buf for (name, _), buf in runner.values.items() if is_cache_input(name)]
    return [t for pair in executor.kv_caches for t in pair]


def discard_kv_cache(executor: Any) -> None:
    """Forget the KV cache's contents and give its pages back where they are host mappings."""
    released = 0
    for buf in kv_cache_buffers(executor):
        mapping = _anonymous_mapping(buf)
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)  # private anonymous: the pages read back as zeros
            released += len(mapping)
        elif hasattr(buf, "zero_"):  # an EagerExecutor's torch tensor
            buf.zero_()
        else:
            buf[...] = 0
    logger.info("KV cache discarded (%.2f GiB of pages released)", released / (1 << 30))


def recommit_kv_cache(executor: Any) -> None:
    """Commit the released KV cache pages again, as the cpu plugin does at load (else the first
    steps after waking fault them in)."""
    populate = getattr(mmap, "MADV_POPULATE_WRITE", None)
    if populate is None:
        return
    for buf in kv_cache_buffers(executor):
        mapping = _anonymous_mapping(buf)
        if mapping is not None:
            try:
                mapping.madvise(populate)
            except OSError:  # kernels before 5.14: first touch commits them instead
                return


def _anonymous_mapping(buf: Any) -> mmap.mmap | None:
    """The mmap a numpy buffer views from its start to its end (hw_plugins.cpu.buffers.host_zeros)."""
    if not isinstance(buf, np.ndarray):
        return None
    base: Any = buf
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer(mapping) views it through a memoryview
        base = base.obj
    if isinstance(base, mmap.mmap) and len(base) == buf.nbytes:
        return base
    return None
