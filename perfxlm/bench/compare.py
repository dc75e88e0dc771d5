"""`perfxlm bench compare`: perfxlm beside vLLM and llama.cpp on the W1 / W2 / W3 workloads, one table.

Rounds: in each, every model, every engine that runs its format, in fresh processes (the
engine that goes first moves on by one each round, so none always starts on a cold or a warm
machine); each figure is the median of the rounds. Formats: an HF directory runs on perfxlm
and vLLM in one dtype; GGUF files run on perfxlm and llama.cpp as stored; an engine that
cannot run a format shows "—". Beside the engines: perfxlm ÷ the best peer, and perfxlm's
share of this machine's roofline (decode: weights + KV bytes per token against the measured
read bandwidth; prefill and batches: FLOPs per token against the peak of the arithmetic
the format uses: bf16, fp32, or int8 for GGUF blocks), as compare-llama-bench.py reports.
"""

import argparse
import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from perfxlm.bench import roofline
from perfxlm.bench.engines import LlamaCpp, Model, Perfxlm, Vllm, Workloads

logger = logging.getLogger(__name__)

WORKLOADS = ("W1", "W2", "W3")
ENGINES = ("perfxlm", "vLLM", "llama.cpp")
_FILE_DTYPES = {"ALL_F32": "float32", "MOSTLY_BF16": "bfloat16", "MOSTLY_F16": "float16"}


@dataclass
class Row:
    """One (model, workload) line of the table."""

    model: str
    workload: str                    # "W1", "W2", "W3"
    title: str                       # the workload with its sizes
    samples: dict[str, list[float]] = field(default_factory=dict)   # engine -> tok/s of each round
    roofline: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine -> its median under its roof

    def median(self, engine: str) -> float | None:
        return statistics.median(self.samples[engine]) if self.samples.get(engine) else None

    def ratio(self) -> float | None:
        """perfxlm ÷ the best peer."""
        peers = [v for e in ENGINES[1:] if (v := self.median(e)) is not None]
        ours = self.median("perfxlm")
        return ours / max(peers) if peers and ours is not None else None


@dataclass
class Comparison:
    """What the command found: the rows, the commands each engine ran, the roofs."""

    rows: list[Row]
    commands: dict[str, list[str]]   # engine -> the commands of its first successful run on each model
    roofs: roofline.Roofs | None
    failures: list[str]              # "engine on model: error" for each run that failed
    rounds: int


def hf_model(source: Any, dtype: str) -> Model:
    """An HF directory in dtype (auto: vLLM's rule), the same on every engine."""
    from perfxlm.config import resolve_dtype
    resolved = str(resolve_dtype(dtype, source.hf_config)).removeprefix("torch.")
    return Model(f"{source.path.name} {resolved}", str(source.path), False, resolved, resolved)


def gguf_model(source: Any) -> Model:
    """A GGUF file as stored: its blocks where perfxlm keeps them, a float file in its own dtype."""
    import gguf
    field_ = gguf.GGUFReader(source.path).fields.get("general.file_type")
    kind = gguf.LlamaFileType(int(field_.parts[field_.data[0]][0])).name if field_ else "?"
    name = f"{source.path.name} ({kind.removeprefix('MOSTLY_').removeprefix('ALL_')})"
    if kind in _FILE_DTYPES:
        return Model(name, str(source.path), True, _FILE_DTYPES[kind], _FILE_DTYPES[kind])
    if source.is_quantized():
        return Model(name, str(source.path), True, "auto", "gguf")
    dense = hf_model(source, "auto").weights  # blocks perfxlm has no kernels for: dequantised at load
    return Model(name, str(source.path), True, "auto", dense)


def models(model: str | None, ggufs: list[str], dtype: str) -> list[Model]:
    """--model (anything LLM() accepts: an HF directory runs in dtype, a GGUF file as stored)
    and the --gguf files; neither: the embedded SmolLM2 GGUF."""
    from perfxlm.models.default_model import EMBEDDED_NAMES
    from perfxlm.models.loader import resolve_model
    for f in ggufs:
        if not (f.endswith(".gguf") and Path(f).is_file()):
            raise ValueError(f"--gguf {f!r} is not a .gguf file")
    names = ([model] if model else []) + ggufs or [EMBEDDED_NAMES[0]]
    out: dict[str, Model] = {}
    for name in names:
        source = resolve_model(name)
        m = gguf_model(source) if source.is_gguf else hf_model(source, dtype)
        out.setdefault(m.label, m)  # a file named twice runs once
    return list(out.values())


def compare(models: list[Model], engines: list[Perfxlm | Vllm | LlamaCpp], wl: Workloads, selected: list[str],
            rounds: int, roofs: bool = True) -> Comparison:
    """Run every engine that can on every model, rounds times, alternating; then (roofs) measure
    the machine's roofs and place perfxlm's and each peer's medians under them."""
    rows = {(m.label, w): Row(m.label, w, wl.describe(w)) for m in models for w in selected}
    commands: dict[str, list[str]] = {}
    failures: list[str] = []
    shown: set[tuple[str, str]] = set()
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for m in models:
            for e in order:
                if not e.can_run(m):
                    continue
                logger.info("round %d/%d: %s on %s", r + 1, rounds, e.name, m.label)
                try:
                    run = e.run(m, wl, selected)
                except RuntimeError as err:  # the other engines' figures still stand
                    logger.error("%s on %s failed: %s", e.name, m.label, err)
                    failures.append(f"{e.name} on {m.label}: {str(err).splitlines()[0]}")
                    continue
                if (e.name, m.label) not in shown:  # each round runs the same commands: list them once
                    shown.add((e.name, m.label))
                    commands.setdefault(e.name, []).extend(run.commands)
                for w, v in run.tok_s.items():
                    rows[m.label, w].samples.setdefault(e.name, []).append(v)
    measured = roofline.measured() if roofs else None
    if measured is not None:
        for m in models:
            _place(measured, m, wl, [rows[m.label, w] for w in selected])
    return Comparison(list(rows.values()), commands, measured, failures, rounds)


def _place(roofs: roofline.Roofs, m: Model, wl: Workloads, rows: list[Row]) -> None:
    """Each engine's median on m's rows under its roof (the cost of m as the engines run it)."""
    try:
        cost = roofline.model_cost(m.path)
    except (ValueError, KeyError) as e:
        logger.warning("no roofline for %s: %s", m.label, e)
        return
    n, i, o = wl.w1
    for row in rows:
        for engine in row.samples:
            tok_s = row.median(engine)
            ours = cost if engine == "perfxlm" else None  # (the kernel set in use is ours)
            if row.workload == "W2":
                u = roofline.decode_usage(roofs, cost, m.weights, tok_s, *wl.w2)
            elif row.workload == "W1":
                u = roofline.compute_usage(roofs, m.weights, roofline.batch_flops(cost, i, o), tok_s, ours)
            else:
                u = roofline.compute_usage(roofs, m.weights, roofline.prefill_flops(cost, wl.w3), tok_s, ours)
            row.roofline[engine] = {**asdict(u), "percent": u.percent}


def report(c: Comparison) -> str:
    """The table (markdown, as compare-llama-bench.py prints it), then the commands."""
    head = ["model", "workload", *(f"{e} tok/s" for e in ENGINES), "perfxlm ÷ best peer", "perfxlm % of roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in c.rows:
        cells = [row.model, row.title]
        cells += [f"{v:.1f}" if (v := row.median(e)) is not None else "—" for e in ENGINES]
        ratio = row.ratio()
        cells.append(f"{ratio:.2f}×" if ratio is not None else "—")
        roof = row.roofline.get("perfxlm")
        cells.append(f"{roofline.figure(roof['percent'])} % of {roof['roof_name']}"
                     if roof and roof["percent"] == roof["percent"] else "—")  # NaN: no such roof on this CPU
        lines.append("| " + " | ".join(cells) + " |")
    r = c.roofs
    lines.append(f"\nmedian of {c.rounds} round{'s' * (c.rounds > 1)}; " + (
        f"roofs: read {r.read_GBs:.1f} GB/s, fp32 {r.fp32_GFLOPs:.0f} GFLOP/s, bf16 {r.bf16_GFLOPs:.0f} GFLOP/s, "
        f"int8 {r.int8_GOPs:.0f} GOP/s" if r else "roofs not measured"))
    for engine, cmds in c.commands.items():
        lines.append(f"\n{engine}:")
        lines += [f"  {cmd}" for cmd in cmds]
    if c.failures:
        lines.append("\nfailed runs:")
        lines += [f"  {f}" for f in c.failures]
    return "\n".join(lines)


def as_json(c: Comparison) -> dict[str, Any]:
    """The figures for --output-json: every round's tok/s, the medians, ratios and roofline shares."""
    return {"rounds": c.rounds, "roofs": asdict(c.roofs) if c.roofs else None, "commands": c.commands,
            "failures": c.failures,
            "rows": [{"model": r.model, "workload": r.workload, "title": r.title, "samples": r.samples,
                      "tok_s": {e: r.median(e) for e in ENGINES}, "ratio_to_best_peer": r.ratio(),
                      "roofline": r.roofline} for r in c.rows]}


# ---- the command ---------------------------------------------------------------------

def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="anything LLM() accepts: an HF directory runs on perfxlm and vLLM "
                                                 "in --dtype, a GGUF file on perfxlm and llama.cpp as stored "
                                                 "(default: the embedded SmolLM2 GGUF, unless --gguf)")
    p.add_argument("--dtype", default="auto", help="the HF model's dtype on every engine (auto: vLLM's rule)")
    p.add_argument("--gguf", nargs="+", default=[], metavar="FILE", help="GGUF files, each run as stored")
    p.add_argument("--llama-cpp", default=os.environ.get("PERFXLM_LLAMA_CPP"), metavar="DIR",
                   help="a directory with llama-bench and llama-batched-bench (default: $PERFXLM_LLAMA_CPP)")
    p.add_argument("--vllm-python", default=os.environ.get("PERFXLM_VLLM_PYTHON"), metavar="PY",
                   help="a python that imports vllm, e.g. ~/peers/vllm-venv/bin/python (default: "
                        "$PERFXLM_VLLM_PYTHON)")
    p.add_argument("--workloads", default="W1,W2,W3", help="comma list of W1, W2, W3")
    p.add_argument("--w1", default="64,128,128", metavar="N,IN,OUT", help="W1: N prompts x IN tokens -> OUT each")
    p.add_argument("--w2", default="32,256", metavar="IN,OUT", help="W2: one IN-token prompt -> OUT tokens")
    p.add_argument("--w3", default="512", metavar="IN", help="W3: the prompt's tokens")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every engine; figures are their medians")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the roofs and the %% column")
    p.add_argument("--output-json", default=None, help="also write every round's figures as JSON")


def main(args: argparse.Namespace) -> int:
    """Check every flag and peer before the first run (a bad one would surface only minutes
    in), run the rounds, print the table: -> exit status, 1 when a run failed."""
    import perfxlm  # noqa: F401 - configures logging

    def fail(message: str) -> SystemExit:
        return SystemExit(f"perfxlm bench compare: {message}")

    selected = list(dict.fromkeys(args.workloads.split(",")))  # in the order given, each once
    if bad := [w for w in selected if w not in WORKLOADS]:
        raise fail(f"unknown --workloads {bad} (choose from {', '.join(WORKLOADS)})")
    sizes = {}
    for flag, value, n in (("--w1", args.w1, 3), ("--w2", args.w2, 2), ("--w3", args.w3, 1)):
        try:
            sizes[flag] = tuple(int(x) for x in value.split(","))
        except ValueError:
            sizes[flag] = ()
        if len(sizes[flag]) != n or min(sizes[flag]) < 1:
            raise fail(f"{flag} must be {n} comma-separated integers >= 1, got {value!r}")
    if sizes["--w2"][1] < 2:
        raise fail(f"--w2 {args.w2}: OUT must be >= 2 (decode is timed after the first token)")
    if args.rounds < 1:
        raise fail(f"--rounds must be >= 1, got {args.rounds}")
    cpus = sorted(os.sched_getaffinity(0))
    engines: list[Perfxlm | Vllm | LlamaCpp] = [Perfxlm()]
    if args.vllm_python:
        vllm = Vllm(args.vllm_python, cpus)
        if why := vllm.check():
            raise fail(f"--vllm-python {args.vllm_python}: {why}")
        engines.append(vllm)
    if args.llama_cpp:
        llama = LlamaCpp(args.llama_cpp, len(cpus))
        if missing := llama.missing(selected):
            raise fail(f"--llama-cpp {args.llama_cpp}: no {' or '.join(missing)} there (llama.cpp's tools: "
                       f"cmake --build BUILD --target {' '.join(missing)})")
        engines.append(llama)
    try:
        chosen = models(args.model, args.gguf, args.dtype)
    except ValueError as e:
        raise fail(str(e))
    wl = Workloads(sizes["--w1"], sizes["--w2"], sizes["--w3"][0])
    result = compare(chosen, engines, wl, selected, args.rounds, roofs=not args.no_roofline)
    print(report(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(as_json(result), f, indent=1)
    return 1 if result.failures else 0
