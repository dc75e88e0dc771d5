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
