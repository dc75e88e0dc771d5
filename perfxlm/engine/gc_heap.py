"""The Python heap around an engine's start-up: collector paused while it is built, then frozen.

Building an engine allocates hundreds of thousands of long-lived objects (tokenizer, graph,
weights' wrappers, modules imported on the way). Each automatic collection during that walks
all that came before, for nothing: they all stay. Afterwards vLLM's EngineCore freezes them
(`vllm.utils.gc_utils.freeze_gc_heap`), so no full collection walks them between steps.
"""

import atexit
import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collection inside the block; the collector's state as it was after it, on
    success or error. The garbage it leaves goes at the next collection (freeze_gc_heap's)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def freeze_gc_heap() -> None:
    """Moves every object alive now out of the collector's reach, as vLLM does after warm-up.
    Frozen objects are still freed when their last reference goes."""
    gc.collect()  # (what is garbage now goes first: frozen, a cycle would stay for good)
    gc.freeze()
    # back in reach for the interpreter's last collection, so extensions that count their live
    # objects at exit (nanobind-built ones, such as triton's) find none left; registered once
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
