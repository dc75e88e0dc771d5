"""`perfxlm bench ...`: benchmarks that print our numbers beside a reference run in the same process."""

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> float:
    """The fastest of `reps` timed calls of fn, in seconds, after one untimed warm-up call;
    `before`, when given, runs untimed before each timed call (e.g. to evict the caches)."""
    fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def best_of_each(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """best_of for several fns timed in turn, each rep calling every one once: what drifts on a
    shared machine (clock, neighbours) drifts for all of them alike."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best
