"""`perfxlm bench throughput` and `perfxlm bench latency`: vLLM bench's flags and summary lines.

throughput: --num-prompts random-token prompts of --input-len tokens, each generating exactly
  --output-len tokens (ignore_eos), submitted at once: "Throughput: X requests/s, Y total
  tokens/s, Z output tokens/s".
latency: --batch-size prompts stepped through the engine --num-iters times (after warm-up);
  TTFT is the time to the first token (prefill), ITL the time of each later step; TPOT is
  the mean ITL, and decode tokens/s = batch size / TPOT.
Both then place their rates under the machine's roofs (measured once, about three seconds):
achieved GB/s of decode against the read bandwidth, GFLOP/s (GOP/s for GGUF blocks) of
prefill and batches against the peak of the arithmetic the weights use.
"""

import argparse
import dataclasses
import json
import logging
import statistics
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="anything LLM() accepts (default: the embedded GGUF)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--quantization", default=None, help="'gguf' keeps GGUF blocks (the default for dtype auto)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype), bfloat16, float32")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--hw-plugin", default=None, help="cpu, torch, ... (default: the best available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, help="write the figures as JSON")
    p.add_argument("--plot", default=None, help="draw the figures into FILE.png (needs matplotlib)")
    p.add_argument("--profile-ops", action="store_true",
                   help="also print the time per op kind in the cpu plugin's compiled steps, in all and split into "
                        "prefill and decode steps (timed run only)")
    p.add_argument("--no-roofline", action="store_true",
                   help="skip measuring the machine's roofs and the achieved GB/s / GFLOP/s beside tok/s")


def make_llm(args: argparse.Namespace) -> Any:
    from perfxlm import LLM
    kw = {k: v for k, v in [("max_num_seqs", args.max_num_seqs), ("max_num_batched_tokens",
                                                                   args.max_num_batched_tokens),
                            ("max_model_len", args.max_model_len), ("hw_plugin", args.hw_plugin),
                            ("quantization", args.quantization)] if v is not None}
    return LLM(args.model, dtype=args.dtype, seed=args.seed, kv_cache_dtype=args.kv_cache_dtype, **kw)


def random_prompts(llm: Any, n: int, length: int, seed: int) -> list[dict]:
    """Random token ids (as vLLM's random dataset), avoiding the special tokens."""
    rng = np.random.default_rng(seed)
    tok = llm.get_tokenizer()
    special = set(getattr(tok, "all_special_ids", []) or [])
    vocab = llm.llm_engine.vocab_size
    ids = rng.integers(0, vocab, size=(n, length + 16))
    return [{"prompt_token_ids": [int(t) for t in row if int(t) not in special][:length]} for row in ids]


def throughput(args: argparse.Namespace) -> dict:
    from perfxlm import SamplingParams
    llm = make_llm(args)
    prompts = random_prompts(llm, args.num_prompts, args.input_len, args.seed)
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    _profile_ops(args, start=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    res = {"elapsed_time": elapsed, "num_requests": len(outs), "total_num_tokens": n_in + n_out,
           "requests_per_second": len(outs) / elapsed, "tokens_per_second": (n_in + n_out) / elapsed,
           "output_tokens_per_second": n_out / elapsed}
    print(f"Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} total tokens/s, "
          f"{res['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens:  {n_in}\nTotal num output tokens:  {n_out}")
    return _describe(args, llm, res)


def latency(args: argparse.Namespace) -> dict:
    from perfxlm import SamplingParams
    from perfxlm.sampling_params import RequestOutputKind
    llm = make_llm(args)
    engine = llm.llm_engine
    ttfts, itls, e2e = [], [], []
    for it in range(args.num_iters_warmup + args.num_iters):
        # fresh prompts every iteration: a repeated prompt would be served from the prefix cache
        prompts = random_prompts(llm, args.batch_size, args.input_len, args.seed + it)
        for i, p in enumerate(prompts):
            sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.output_len)
            sp.output_kind = RequestOutputKind.FINAL_ONLY
            engine.add_request(f"lat-{it}-{i}", p["prompt_token_ids"], sp)
        if it == args.num_iters_warmup:
            _profile_ops(args, start=True)
        start = time.perf_counter()
        marks = []
        while engine.has_unfinished_requests():
            engine.step()
            marks.append(time.perf_counter())
        if it < args.num_iters_warmup:
            continue
        # every step after the prefill gives each sequence one token: the first
        # len(marks) - output_len + 1 steps are the prefill (chunks) and the first token
        first = len(marks) - args.output_len
        ttfts.append(marks[first] - start)
        itls += [b - a for a, b in zip(marks[first:], marks[first + 1:])]
        e2e.append(marks[-1] - start)
    res = {"batch_size": args.batch_size, "avg_latency": statistics.fmean(e2e),
           "ttft_mean_ms": 1e3 * statistics.fmean(ttfts), "ttft_p50_ms": 1e3 * _pct(ttfts, 50),
           "ttft_p99_ms": 1e3 * _pct(ttfts, 99),
           "prefill_tokens_per_second": args.batch_size * args.input_len / statistics.fmean(ttfts)}
    print(f"Avg latency: {res['avg_latency']:.4f} seconds")
    print(f"TTFT (ms): mean {res['ttft_mean_ms']:.2f}, p50 {res['ttft_p50_ms']:.2f}, p99 {res['ttft_p99_ms']:.2f}")
    if itls:
        tpot = statistics.fmean(itls)
        res.update({"tpot_mean_ms": 1e3 * tpot, "itl_p50_ms": 1e3 * _pct(itls, 50),
                    "itl_p99_ms": 1e3 * _pct(itls, 99), "decode_tokens_per_second": args.batch_size / tpot})
        print(f"TPOT (ms): mean {res['tpot_mean_ms']:.3f}; ITL (ms): p50 {res['itl_p50_ms']:.3f}, "
              f"p99 {res['itl_p99_ms']:.3f}")
        print(f"Decode: {res['decode_tokens_per_second']:.1f} tokens/s; prefill: "
              f"{res['prefill_tokens_per_second']:.1f} tokens/s")
    else:  # --output-len 1: the first token comes with the prefill, there is no decode step
        print(f"Decode: no decode step (--output-len 1); prefill: {res['prefill_tokens_per_second']:.1f} tokens/s")
    return _describe(args, llm, res)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _profile_ops(args: argparse.Namespace, start: bool) -> dict[str, dict[str, float | int]]:
    """Starts (start=True) or reads and prints the cpu plugin's per-op times (--profile-ops):
    per op kind its calls and seconds, in all and split into prefill and decode steps."""
    if not args.profile_ops:
        return {}
    from hw_plugins.cpu import library
    by_phase = library.op_profile(on=start)
    if start:
        return {}
    prof: dict[str, dict[str, float | int]] = {}
    for phase, ops in by_phase.items():
        for op, (t, n) in ops.items():
            row = prof.setdefault(op, {"seconds": 0.0, "calls": 0, "prefill_seconds": 0.0, "prefill_calls": 0,
                                       "decode_seconds": 0.0, "decode_calls": 0})
            row["seconds"] += t
            row["calls"] += n
            row[f"{phase}_seconds"] += t
            row[f"{phase}_calls"] += n
    if not prof:
        print("--profile-ops: no compiled cpu-plugin step ran (it times the cpu plugin's steps only)")
        return prof
    total = sum(r["seconds"] for r in prof.values()) or float("nan")
    print(f"{'op':<16}{'calls':>8}{'seconds':>10}{'ms/call':>10}{'share':>8}{'prefill s':>11}{'decode s':>10}")
    for op, r in sorted(prof.items(), key=lambda kv: -kv[1]["seconds"]):
        print(f"{op:<16}{r['calls']:>8}{r['seconds']:>10.3f}{1e3 * r['seconds'] / r['calls']:>10.3f}"
              f"{100 * r['seconds'] / total:>7.1f}%{r['prefill_seconds']:>11.3f}{r['decode_seconds']:>10.3f}")
    return prof


def _describe(args: argparse.Namespace, llm: Any, res: dict) -> dict:
    if args.profile_ops:
        res["op_profile"] = prof = _profile_ops(args, start=False)
        if prof and "elapsed_time" in res:  # the rest of a throughput run: Python around the compiled steps
            res["outside_ops_seconds"] = res["elapsed_time"] - sum(r["seconds"] for r in prof.values())
            print(f"outside the ops: {res['outside_ops_seconds']:.3f} s of {res['elapsed_time']:.3f} s "
                  "(scheduler, inputs, sampler, detokenizer: the engine's Python)")
    _roofline(args, llm, res)
    cfg = llm.llm_engine.config
    runner = llm.llm_engine.runner.executor
    plugins = sorted({n.plugin.name for n in runner.runner.nodes}) if hasattr(runner, "runner") else ["eager"]
    res.update({"model": args.model, "dtype": str(cfg.model_dtype).removeprefix("torch."),
                "quantization": cfg.quantization, "hw_plugins": plugins,
                "kv_cache_dtype": str(cfg.cache_dtype).removeprefix("torch."),
                "input_len": args.input_len, "output_len": args.output_len})
    logger.info("bench config: %s", {k: res[k] for k in ("dtype", "kv_cache_dtype", "quantization", "hw_plugins")})
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=1)
    if args.plot:
        _plot(res, args.plot)
    return res


def _roofline(args: argparse.Namespace, llm: Any, res: dict) -> None:
    """Print, and add to res, the achieved GB/s (decode) or GFLOP/s (prefill, batch) and
    their share of the machine's roofs."""
    if args.no_roofline:
        return
    from perfxlm.bench import roofline
    roofs = roofline.measured()
    if roofs is None:
        print("Roofline: not measured (the native cpu kernels are not built here)")
        return
    engine = llm.llm_engine
    weights = "gguf" if engine.config.quantization == "gguf" else str(engine.config.model_dtype).removeprefix("torch.")
    try:
        cost = roofline.model_cost(engine.source.path)
    except (ValueError, KeyError) as e:  # a model the cost reader does not know: the figures stand alone
        print(f"Roofline: no model cost for {engine.source.path}: {e}")
        return
    usages = {}
    if "output_tokens_per_second" in res:  # throughput: prefill and decode of the whole batch
        usages["batch"] = roofline.compute_usage(roofs, weights, roofline.batch_flops(
            cost, args.input_len, args.output_len), res["output_tokens_per_second"], cost)
    else:
        if "decode_tokens_per_second" in res:  # --output-len 1 has no decode step
            usages["decode"] = roofline.decode_usage(
                roofs, cost, weights, res["decode_tokens_per_second"], args.input_len, args.output_len,
                args.batch_size, engine.runner.executor.spec.kv_bytes_per_block(1))
        usages["prefill"] = roofline.compute_usage(roofs, weights, roofline.prefill_flops(cost, args.input_len),
                                                   res["prefill_tokens_per_second"], cost)
    for phase, u in usages.items():
        print(f"Roofline ({phase}): {u.describe()}")
    res["roofs"] = dataclasses.asdict(roofs)
    res["roofline"] = {phase: {**dataclasses.asdict(u), "percent": u.percent} for phase, u in usages.items()}


def _plot(res: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install matplotlib): {e}") from e
    figs = {k: v for k, v in res.items() if isinstance(v, float) and ("per_second" in k or k.endswith("_ms"))}
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(figs) + 1.5))
    ax.barh(list(figs), list(figs.values()))
    for i, v in enumerate(figs.values()):
        ax.text(v, i, f" {v:.1f}", va="center")
    ax.set_title(f"{res['model']} ({res['dtype']}{', ' + res['quantization'] if res['quantization'] else ''}, "
                 f"{'/'.join(res['hw_plugins'])})")
    fig.tight_layout()
    fig.savefig(path)
