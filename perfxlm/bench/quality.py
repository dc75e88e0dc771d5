"""`perfxlm bench quality`: how far a model's token distributions are from a reference's.

The figures `llama-perplexity --kl-divergence` reports, computed the way it computes them:
the text is tokenised once and cut into chunks of `ctx` tokens (the first token of each
replaced by BOS where the tokenizer adds one); in each chunk only the second half is
scored, the logits at positions ctx/2 .. ctx-2 each predicting the next token, so every
scored token has at least ctx/2 tokens of context. Per scored token:

- NLL = -log p(correct token); PPL = exp(mean NLL); its ratio to the reference's, exp(mean (NLL - NLL_ref))
- KLD = sum over the full vocabulary of p_ref * (log p_ref - log p)
- same top-1: argmax p == argmax p_ref
- Δp = p(correct) - p_ref(correct); Δp RMS = sqrt(mean Δp²)

llama.cpp stores the reference as 16-bit log-probabilities and drops terms with
log p_ref < -16 from the KLD; here both distributions are exact float32 log-probabilities
summed in float64 over the whole vocabulary. With `--llama-cpp DIR` llama-perplexity
runs on the same GGUF files (a float dtype as a float file written by llama-quantize)
and the same text, and its own figures join the table.
"""

import gc
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perfxlm.bench.engines import run_command, run_llama_cpp

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
_ROWS_PER_BLOCK = 64  # float64 working set per block: 64 rows x vocab, a few MB


@dataclass
class Scores:
    """One row of the table: a model's figures against the reference."""

    name: str
    ppl: float
    ppl_ratio: float          # PPL / reference PPL
    kld_mean: float
    kld_p99: float
    kld_max: float
    same_top1: float          # fraction of scored tokens, 0..1
    dp_rms: float             # RMS of p(correct) - p_ref(correct), 0..1
    tokens: int               # scored tokens


def token_stats(logprobs: np.ndarray, ref_logprobs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token figures of (T, V) log-probabilities against the reference's, for the (T,)
    correct tokens: nll, nll_ref, kld, same_top1 (bool), p_diff; all float64 but same_top1."""
    T = len(targets)
    out = {k: np.empty(T) for k in ("nll", "nll_ref", "kld", "p_diff")}
    out["same_top1"] = np.empty(T, bool)
    rows = np.arange(T)
    for lo in range(0, T, _ROWS_PER_BLOCK):
        sl = slice(lo, min(lo + _ROWS_PER_BLOCK, T))
        lp, lr = logprobs[sl].astype(np.float64), ref_logprobs[sl].astype(np.float64)
        out["kld"][sl] = np.sum(np.exp(lr) * (lr - lp), axis=1)
        out["same_top1"][sl] = lp.argmax(1) == lr.argmax(1)
        out["nll"][sl] = -lp[rows[sl] - lo, targets[sl]]
        out["nll_ref"][sl] = -lr[rows[sl] - lo, targets[sl]]
    out["p_diff"] = np.exp(-out["nll"]) - np.exp(-out["nll_ref"])
    return out


def summarize(name: str, stats: dict[str, np.ndarray]) -> Scores:
    """Aggregate token_stats over all scored tokens, as llama-perplexity does (its p99 is the
    linearly interpolated percentile, numpy's default)."""
    kld = stats["kld"]
    return Scores(name=name, ppl=float(np.exp(stats["nll"].mean())),
                  ppl_ratio=float(np.exp(stats["nll"].mean() - stats["nll_ref"].mean())),
                  kld_mean=float(kld.mean()), kld_p99=float(np.percentile(kld, 99)), kld_max=float(kld.max()),
                  same_top1=float(stats["same_top1"].mean()), dp_rms=float(np.sqrt(np.mean(stats["p_diff"] ** 2))),
                  tokens=len(kld))


def text_chunks(tokenizer: Any, text: str, ctx: int, n_chunks: int) -> list[list[int]]:
    """The first n_chunks chunks of ctx tokens of text, as llama-perplexity cuts them."""
    if ctx < 4:
        raise ValueError(f"--ctx must be at least 4, got {ctx}")
    if n_chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {n_chunks}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    probe, plain = tokenizer.encode("x"), tokenizer.encode("x", add_special_tokens=False)
    bos = tokenizer.bos_token_id if len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id else None
    if len(ids) < n_chunks * ctx:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --chunks {n_chunks} x --ctx {ctx}")
    chunks = [ids[i * ctx:(i + 1) * ctx] for i in range(n_chunks)]
    if bos is not None:  # llama-perplexity overwrites each chunk's first token with BOS
        for c in chunks:
            c[0] = bos
    return chunks


def evaluate(model: Any, reference: Any, chunks: list[list[int]], names: tuple[str, str] = ("reference", "model")
             ) -> tuple[Scores, Scores]:
    """Score `model` against `reference` (two perfxlm LLMs, or one twice) on the chunks:
    -> (the reference's row, against itself; the model's row)."""
    if model.llm_engine.vocab_size != reference.llm_engine.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.llm_engine.vocab_size} tokens) differs from the "
                         f"reference's ({reference.llm_engine.vocab_size}): their distributions do not compare")
    per_token: list[dict[str, np.ndarray]] = []
    ref_tokens: list[dict[str, np.ndarray]] = []
    for i, chunk in enumerate(chunks):
        first = len(chunk) // 2
        targets = np.asarray(chunk[first + 1:], np.int64)
        ref_lp = reference.llm_engine.score_prompt(chunk, first + 1)
        lp = ref_lp if model is reference else model.llm_engine.score_prompt(chunk, first + 1)
        per_token.append(token_stats(lp, ref_lp, targets))
        ref_tokens.append(token_stats(ref_lp, ref_lp, targets))
        logger.info("chunk %d/%d: PPL so far %.4f", i + 1, len(chunks),
                    np.exp(np.concatenate([s["nll"] for s in per_token]).mean()))

    def merged(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
    return summarize(names[0], merged(ref_tokens)), summarize(names[1], merged(per_token))


# ---- llama.cpp -----------------------------------------------------------------------

_GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_LLAMA_FIGURES = {  # Scores field -> the line of llama-perplexity's KL divergence summary
    "ppl": r"Mean PPL\(Q\)\s*:\s*(\S+)", "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*(\S+)",
    "kld_mean": r"Mean\s+KLD:\s*(\S+)", "kld_p99": r"99\.0%\s+KLD:\s*(\S+)", "kld_max": r"Maximum KLD:\s*(\S+)",
    "same_top1": r"Same top p:\s*(\S+)", "dp_rms": r"RMS Δp\s*:\s*(\S+)"}


def llama_cpp_source(llm: Any) -> tuple[Path, str | None]:
    """The GGUF file llama.cpp runs for what a perfxlm LLM runs, and the type llama-quantize
    rewrites it to first: None when perfxlm keeps the file's blocks, else the LLM's dtype."""
    engine = llm.llm_engine
    if not engine.source.is_gguf:
        raise ValueError(f"--llama-cpp needs GGUF models; {engine.config.model!r} is not a .gguf file")
    if engine.config.quantization == "gguf":
        return engine.source.path, None
    return engine.source.path, _GGUF_TYPES[str(engine.config.model_dtype).removeprefix("torch.")]


def llama_cpp_file(source: tuple[Path, str | None], bin_dir: Path, workdir: Path, threads: int) -> Path:
    """llama_cpp_source's file, rewritten by llama-quantize into workdir where it says so."""
    path, gguf_type = source
    if gguf_type is None:
        return path
    out = workdir / f"{path.stem}.{gguf_type}.gguf"
    if not out.exists():
        run_command([bin_dir / "llama-quantize", "--allow-requantize", path, out, gguf_type, threads])
    return out


def llama_cpp_rows(bin_dir: str | Path, model_file: Path, ref_file: Path, text_file: str, ctx: int,
                   n_chunks: int, threads: int, workdir: Path) -> tuple[Scores, Scores]:
    """Run llama-perplexity on the reference (--kl-divergence-base writes its log-probabilities)
    then on the model (--kl-divergence); -> its (reference, model) rows, parsed from its output."""
    exe = Path(bin_dir) / "llama-perplexity"
    base = workdir / "base.kld"
    common = ["-c", ctx, "-t", threads, "--kl-divergence-base", base]
    ref_out = _run([exe, "-m", ref_file, "-f", text_file, "--chunks", n_chunks, *common])
    found = re.search(r"Final estimate: PPL = (\S+)", ref_out)
    if found is None:
        raise RuntimeError(f"llama-perplexity printed no final estimate for {ref_file}:\n{ref_out[-2000:]}")
    model_out = _run([exe, "-m", model_file, "--kl-divergence", *common])
    figures = {}
    for name, pattern in _LLAMA_FIGURES.items():
        m = re.search(pattern, model_out)
        if m is None:  # it prints no summary under 100 scored tokens
            raise RuntimeError(f"llama-perplexity --kl-divergence printed no {name!r} ({pattern}); "
                               f"score at least 100 tokens:\n{model_out[-2000:]}")
        figures[name] = float(m.group(1)) / (100 if name in ("same_top1", "dp_rms") else 1)
    tokens = n_chunks * (ctx - 1 - ctx // 2)
    return (Scores("llama.cpp reference", float(found.group(1)), 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, tokens),
            Scores(name="llama.cpp model", tokens=tokens, **figures))


def _run(cmd: list[Any]) -> str:
    """A llama.cpp tool's stdout and stderr together (engines.run_llama_cpp's rerun after SIGILL or SIGSEGV)."""
    _, stdout, stderr = run_llama_cpp(cmd, ["--no-repack"])
    return stdout + stderr


# ---- the command ---------------------------------------------------------------------

def run(model: str, reference: str, dtype: str = "auto", reference_dtype: str = "float32",
        text_file: str = DEFAULT_TEXT, ctx: int = 512, n_chunks: int = 4, llama_cpp: str | None = None,
        threads: int | None = None, kv_cache_dtype: str = "auto") -> list[Scores]:
    """Load both models (one LLM when they are the same), score them on the text and, with
    llama_cpp, run llama-perplexity on their GGUF files: -> the table's rows."""
    from perfxlm import LLM

    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    for tool in ("llama-perplexity", "llama-quantize") if llama_cpp else ():
        if not os.access(Path(llama_cpp) / tool, os.X_OK):  # before minutes of loading and scoring, not after
            raise ValueError(f"--llama-cpp {llama_cpp}: no {tool} there")
    ref_llm = LLM(reference, dtype=reference_dtype, max_model_len=ctx + 1)
    same = (model, dtype, kv_cache_dtype) == (reference, reference_dtype, "auto")
    model_llm = ref_llm if same else LLM(model, dtype=dtype, max_model_len=ctx + 1, kv_cache_dtype=kv_cache_dtype)
    chunks = text_chunks(ref_llm.get_tokenizer(), text, ctx, n_chunks)
    mode = model_llm.llm_engine.config.quant_activations  # (PERFXLM_QUANT_ACTIVATIONS)
    label = f"model ({dtype}" + (f", x {mode}" if mode != "auto" else "") + (
        f", kv {kv_cache_dtype}" if kv_cache_dtype != "auto" else "") + ")"
    rows = list(evaluate(model_llm, ref_llm, chunks, (f"reference ({reference_dtype})", label)))
    if llama_cpp:
        sources = [llama_cpp_source(llm) for llm in (ref_llm, model_llm)]
        # our engines go before llama.cpp's runs: a 1B-class float32 reference in both at once
        # outgrows a 24 GiB machine
        del ref_llm, model_llm
        gc.collect()
        threads = threads or len(os.sched_getaffinity(0))
        with tempfile.TemporaryDirectory(prefix="perfxlm-quality-") as tmp:
            work = Path(tmp)
            ref_file, model_file = (llama_cpp_file(s, Path(llama_cpp), work, threads) for s in sources)
            rows += llama_cpp_rows(llama_cpp, model_file, ref_file, text_file, ctx, n_chunks, threads, work)
    return rows


def report(rows: list[Scores]) -> str:
    """The table: one line per row."""
    lines = [f"{'':<28} {'PPL':>9} {'vs ref':>8} {'mean KLD':>9} {'p99 KLD':>9} {'max KLD':>9} "
             f"{'same top-1':>10} {'Δp RMS':>8}", "-" * 98]
    for r in rows:
        lines.append(f"{r.name:<28} {r.ppl:9.4f} {100 * (r.ppl_ratio - 1):+7.2f}% {r.kld_mean:9.5f} "
                     f"{r.kld_p99:9.5f} {r.kld_max:9.5f} {100 * r.same_top1:9.2f}% {100 * r.dp_rms:7.3f}%")
    return "\n".join(lines)


def as_json(rows: list[Scores]) -> list[dict[str, Any]]:
    """The rows for --output-json (fractions, not percentages)."""
    return [asdict(r) for r in rows]
