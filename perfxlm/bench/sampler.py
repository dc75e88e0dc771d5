"""Random sampling from logits: the cpu plugin's C kernel vs torch, side by side in one run.

Both draw every row by inverse CDF from the same logits and the same uniforms: ours straight
from the logits (`CpuPlugin.sample_rows`, csrc/core/pxl_sample.c), the reference through torch's
softmax and the engine's numpy fallback (`inverse_cdf`). The logits are random at a decode step's spread (a
few units), and times are the best of `reps` calls, each timed twice: with the logits in the
caches, and with them evicted first, as a decode step leaves them (the lm_head stores them
around the caches). The tokens should agree except where a uniform sits at a CDF step's edge,
where the two float roundings may fall either way.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch

from perfxlm.bench import best_of


@dataclass
class Result:
    rows: int
    vocab: int
    logits: str  # where the calls find them: "cached" or "DRAM"
    ours_us: float
    torch_us: float
    same_tokens: int  # rows where both drew the same token


def run(batches: list[int], vocab: int = 49152, reps: int = 20) -> list[dict]:
    from hw_plugins.cpu.plugin import CpuPlugin
    from perfxlm.engine.sampler import inverse_cdf

    plugin = CpuPlugin()
    if not plugin.is_available():
        raise SystemExit(f"perfxlm bench sampler: the cpu plugin is unavailable: {plugin.unavailable_reason()}")
    gen = torch.Generator().manual_seed(0)
    flush = np.zeros(64 << 20, np.uint8)  # written between calls: more than a last-level cache holds

    def evict() -> None:
        np.add(flush, 1, out=flush)

    results = []
    for rows in batches:
        logits = torch.randn(rows, vocab, generator=gen) * 3
        u = torch.rand(rows, 1, generator=gen)
        ln, un = logits.numpy(), u.numpy().reshape(-1)
        ours = plugin.sample_rows(ln, un)
        ref = inverse_cdf(logits.softmax(dim=-1).numpy(), un)
        for cold in (False, True):
            before = evict if cold else None
            t_ours = best_of(lambda: plugin.sample_rows(ln, un), reps, before)
            t_ref = best_of(lambda: inverse_cdf(logits.softmax(dim=-1).numpy(), un), reps, before)
            results.append(Result(rows, vocab, "DRAM" if cold else "cached", 1e6 * t_ours, 1e6 * t_ref,
                                  int((ours == ref).sum())))
    return [asdict(r) for r in results]


def report(rows: list[dict]) -> str:
    lines = [f"{'rows':>6}{'vocab':>8}{'logits':>8}{'ours us':>10}{'torch us':>10}{'x torch':>9}{'same tokens':>13}"]
    for r in rows:
        lines.append(f"{r['rows']:>6}{r['vocab']:>8}{r['logits']:>8}{r['ours_us']:>10.1f}{r['torch_us']:>10.1f}"
                     f"{r['torch_us'] / r['ours_us']:>8.2f}x{r['same_tokens']:>8}/{r['rows']}")
    return "\n".join(lines)
