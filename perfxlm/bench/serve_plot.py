"""`perfxlm bench serve --plot FILE.png`: the latency distributions and the throughput timeline."""

from collections.abc import Sequence

import numpy as np

from perfxlm.bench.serve_client import RequestFuncOutput
from perfxlm.bench.serve_metrics import BenchmarkMetrics


def plot(metrics: BenchmarkMetrics, outputs: Sequence[RequestFuncOutput], path: str, title: str) -> None:
    """Write a PNG: empirical CDFs of TTFT, TPOT, ITL and E2EL (ms), output tokens per second
    over the run, and the requests in flight over the run."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a server or a board
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise SystemExit(f"perfxlm bench serve: --plot needs matplotlib (pip install matplotlib): {e}") from e
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, values) in zip(axes.flat, [("TTFT", metrics.ttft), ("TPOT", metrics.tpot),
                                              ("ITL", metrics.itl), ("E2EL", metrics.e2el)]):
        ms = np.sort(np.asarray(values, dtype=float)) * 1000
        if len(ms):
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post")
            ax.axvline(float(np.median(ms)), color="grey", linestyle=":", label=f"median {np.median(ms):.1f} ms")
            ax.axvline(float(np.percentile(ms, 99)), color="red", linestyle=":",
                       label=f"P99 {np.percentile(ms, 99):.1f} ms")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{name} CDF ({len(ms)} samples)", xlabel=f"{name} (ms)", ylabel="fraction of samples",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    ax = axes.flat[4]
    tps = metrics.tokens_per_second
    ax.bar(np.arange(len(tps)), tps, width=1.0, align="edge")
    ax.axhline(metrics.output_throughput, color="red", linestyle=":",
               label=f"mean {metrics.output_throughput:.1f} tok/s")
    ax.set(title="Output throughput over time", xlabel="seconds since the first request", ylabel="tokens/s")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    ax = axes.flat[5]
    done = [o for o in outputs if o.success]
    if done:
        t0 = min(o.start_time for o in done)
        edges = sorted([(o.start_time - t0, 1) for o in done] + [(o.start_time + o.latency - t0, -1) for o in done])
        times = [0.0] + [t for t, _ in edges]
        ax.step(times, np.concatenate([[0], np.cumsum([d for _, d in edges])]), where="post")
    ax.set(title=f"Requests in flight (peak {metrics.max_concurrent_requests})",
           xlabel="seconds since the first request", ylabel="requests")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.suptitle(f"perfxlm bench serve: {title}; {metrics.completed} ok, {metrics.failed} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
