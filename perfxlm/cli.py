"""`perfxlm` command line: serve, export, plugins, bench, run."""

import argparse
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # everything after the script is the script's own: no parsing here
        from perfxlm.vllm_shim.runner import run
        return run(argv[1:])
    parser = argparse.ArgumentParser(prog="perfxlm", description="perfxlm: vLLM-compatible inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", add_help=False, help="run a script written for vLLM, unedited: `import vllm` is served "
                                               "by perfxlm (perfxlm run script.py [args] | -m module [args])")
    exp = sub.add_parser("export", help="export a model to a perfxlm ONNX graph, or to a deployable directory "
                                        "that LLM(model=DIR) and `perfxlm serve DIR` run without PyTorch")
    exp.add_argument("model", help="anything LLM() accepts: HF directory, .gguf file, cached or embedded name")
    exp.add_argument("-o", "--output", required=True,
                     help="FILE.onnx: the graph alone (weights go to FILE.onnx.data); any other path: a deployable "
                          "directory (graph, weights, tokenizer, chat template, configs, perfxlm.json)")
    exp.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    exp.add_argument("--quantization", choices=["gguf"], default=None,
                     help="gguf: keep a GGUF's Q8_0/Q4_0/Q4_1 weights as quantised blocks (default with --dtype "
                          "auto on a quantised GGUF)")
    exp.add_argument("--verify", action="store_true",
                     help="run the graph's standard-ONNX lowering in onnxruntime and compare with PyTorch")
    sub.add_parser("plugins", help="list hardware plugins and whether each is available")
    from perfxlm.entrypoints.openai.cli_args import make_arg_parser, normalize_flags
    make_arg_parser(sub.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible API and a chat "
                                                 "page at /"))
    bench = sub.add_parser("bench", help="benchmarks, each beside a reference measured in the same run")
    bsub = bench.add_subparsers(dest="bench", required=True)
    gemv = bsub.add_parser("gemv", help="GEMV (--rows 1) / GEMM on SmolLM2 shapes and 4096x4096 (or --shapes): "
                                         "ours, OpenBLAS, torch")
    gemv.add_argument("--threads", type=int, default=None, help="threads for all three (default: all cores)")
    gemv.add_argument("--formats", default="fp32,bf16,q4_1",
                      help="comma list of fp32, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k")
    gemv.add_argument("--rows", type=int, default=1, help="tokens per call: 1 = decode GEMV, e.g. 512 = prefill GEMM")
    gemv.add_argument("--shapes", default=None, metavar="KxN,...",
                      help="Linears to time, input x output features (default: SmolLM2-135M's and 4096x4096; "
                           "e.g. 2048x2048,2048x512,2048x8192,8192x2048 for Llama-3.2-1B's)")
    gemv.add_argument("--baseline-lib", default=None, metavar="PATH",
                      help="another build of libperfxlm_kernels.so (e.g. the last commit's) timed beside ours, "
                           "alternating, in this process")
    gemv.add_argument("--cold", action="store_true",
                      help="each call reads the next of enough weight copies to fill twice the last-level cache, "
                           "so they come from memory as in a model's decode step (default: one copy, which a "
                           "small shape keeps in the caches)")
    gemv.add_argument("--output-json", default=None, help="also write the rows as JSON")
    att = bsub.add_parser("attention", help="paged attention, decode and prefill over many layers' caches: ours, "
                                             "torch's SDPA")
    att.add_argument("--batch", type=int, default=64, help="sequences (default: W1's 64)")
    att.add_argument("--context", type=int, default=192, help="cached tokens a decoding sequence attends to")
    att.add_argument("--prefill-len", type=int, default=128, help="prompt tokens per sequence for the prefill")
    att.add_argument("--layers", type=int, default=30, help="distinct caches walked per pass (SmolLM2: 30)")
    att.add_argument("--heads", default="9,3,64", help="query heads, KV heads, head dim (SmolLM2: 9,3,64)")
    att.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    att.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="the caches' dtype (auto: --dtype's; a bf16 model in the engine: --dtype float32 "
                          "--kv-cache-dtype bfloat16)")
    att.add_argument("--baseline-lib", default=None, metavar="PATH",
                     help="another build of libperfxlm_kernels.so (e.g. the last commit's) timed beside ours, "
                          "in turn, in this process")
    att.add_argument("--output-json", default=None, help="also write the rows as JSON")
    smp = bsub.add_parser("sampler", help="random sampling from logits rows: ours (C, from the logits), torch "
                                           "(softmax + inverse CDF)")
    smp.add_argument("--rows", default="1,64", help="comma list of batch sizes (default: W2's 1 and W1's 64)")
    smp.add_argument("--vocab", type=int, default=49152, help="logits per row (SmolLM2: 49152)")
    smp.add_argument("--output-json", default=None, help="also write the rows as JSON")
    roof = bsub.add_parser("roofline", help="memory bandwidth and peak fp32/bf16/int8 rates, and each workload's "
                                             "ceiling on a model")
    roof.add_argument("--model", default=None, help="a GGUF file or an HF directory (default: the embedded SmolLM2)")
    roof.add_argument("--threads", type=int, default=None, help="default: all cores")
    roof.add_argument("--output-json", default=None, help="also write the figures as JSON")
    qual = bsub.add_parser("quality", help="perplexity, KL divergence, same top-1 and Δp against a reference's full "
                                           "distributions, as llama-perplexity --kl-divergence reports them")
    qual.add_argument("model", help="anything LLM() accepts (e.g. the embedded HuggingFaceTB/SmolLM2-135M-Instruct)")
    qual.add_argument("--reference", default=None, help="the reference model (default: MODEL)")
    qual.add_argument("--dtype", default="auto", help="MODEL's dtype (auto: a quantised GGUF runs its blocks)")
    qual.add_argument("--reference-dtype", default="float32", help="the reference's dtype (default: float32)")
    qual.add_argument("--kv-cache-dtype", default="auto", help="MODEL's KV cache dtype (auto: the model's dtype)")
    qual.add_argument("--text", default=None, help="a text file (default: /usr/share/common-licenses/GPL-3)")
    qual.add_argument("--ctx", type=int, default=512, help="tokens per chunk; the second half of each is scored")
    qual.add_argument("--chunks", type=int, default=4, help="chunks scored (default: 4)")
    qual.add_argument("--llama-cpp", default=None, metavar="DIR",
                      help="a directory with llama-perplexity and llama-quantize: also run llama.cpp on the same "
                           "GGUF files and text")
    qual.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: all cores)")
    qual.add_argument("--output-json", default=None, help="also write the rows as JSON")
    from perfxlm.bench import compare as bench_compare
    bench_compare.add_cli_args(bsub.add_parser("compare", help="perfxlm beside vLLM and llama.cpp (where installed) "
                                                               "on W1/W2/W3, engines alternating: one table of tok/s, "
                                                               "the ratio to the best peer and %% of roofline"))
    from perfxlm.bench.serving import add_common_args
    thr = bsub.add_parser("throughput", help="offline throughput (vLLM bench throughput's flags and summary)")
    add_common_args(thr)
    thr.add_argument("--num-prompts", type=int, default=64)
    lat = bsub.add_parser("latency", help="TTFT, TPOT/ITL and decode tokens/s (vLLM bench latency's flags)")
    add_common_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--num-iters", type=int, default=5)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    from perfxlm.bench import serve as bench_serve
    bench_serve.add_cli_args(bsub.add_parser("serve", help="load a running OpenAI-compatible server (ours or "
                                                           "vLLM's) as `vllm bench serve` does"))
    if argv[:1] == ["serve"]:  # vLLM's serve flags also take underscores (--max_model_len)
        argv = normalize_flags(argv)
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "serve":
        from perfxlm.entrypoints.openai.api_server import run_server
        run_server(args)
        return 0
    if args.command == "bench":
        if args.bench == "gemv":
            return _bench_gemv(args)
        if args.bench == "roofline":
            return _bench_roofline(args)
        if args.bench == "attention":
            return _bench_attention(args)
        if args.bench == "sampler":
            return _bench_sampler(args)
        if args.bench == "quality":
            return _bench_quality(args)
        if args.bench == "compare":
            return bench_compare.main(args)
        if args.bench == "serve":
            return bench_serve.main(args)
        import perfxlm  # noqa: F401 - configures logging
        from perfxlm.bench import serving
        getattr(serving, args.bench)(args)
        return 0
    return _plugins()


def _baseline_lib(bench: str, path: str | None):
    """--baseline-lib's library, or None without the flag; a missing file or a build for another
    ABI exits naming it."""
    from hw_plugins.cpu import library

    if not path:
        return None
    try:
        return library.load_at(path)
    except OSError as e:
        raise SystemExit(f"perfxlm bench {bench}: --baseline-lib {path}: {e}")


def _bench_gemv(args: argparse.Namespace) -> int:
    import os

    import perfxlm  # noqa: F401 - configures logging
    from hw_plugins.cpu import library
    from perfxlm.bench import gemv, openblas

    threads = args.threads or len(os.sched_getaffinity(0))
    formats = args.formats.split(",")
    bad = [f for f in formats if f not in gemv.FORMATS]
    if bad or args.rows < 1 or threads < 1:
        raise SystemExit(f"perfxlm bench gemv: unknown --formats {bad} (choose from {', '.join(gemv.FORMATS)})"
                         if bad else "perfxlm bench gemv: --rows and --threads must be >= 1")
    try:
        shapes = gemv.parse_shapes(args.shapes) if args.shapes else gemv.SHAPES
    except ValueError as e:
        raise SystemExit(f"perfxlm bench gemv: {e}")
    odd = [f"{K}x{N}" for K, N in shapes if K % 32]
    if odd and set(formats) - {"fp32"}:  # GGUF blocks hold 32 weights; bf16 packs K in pairs
        raise SystemExit(f"perfxlm bench gemv: --shapes {odd}: K must be a multiple of 32 for --formats "
                         f"{sorted(set(formats) - {'fp32'})}")
    kq, not_256 = sorted(set(formats) & set(gemv.K_QUANTS)), [f"{K}x{N}" for K, N in shapes if K % 256]
    if kq and not_256:
        raise SystemExit(f"perfxlm bench gemv: --shapes {not_256}: K must be a multiple of 256 for --formats {kq} "
                         "(e.g. --shapes 2048x2048,2048x8192,8192x2048)")
    baseline = _baseline_lib("gemv", args.baseline_lib)
    rows = gemv.run(threads, formats, args.rows, baseline, shapes, args.cold)
    print(f"{'bs=1 GEMV' if args.rows == 1 else f'GEMM with {args.rows} rows'}, {threads} threads"
          f"{f', weights from memory (copies filling {2 * gemv.last_level_cache_bytes() >> 20} MiB)' if args.cold else ''}"
          f"; ours: {library.load().pxl_isa().decode()} kernels; "
          f"OpenBLAS {openblas.corename()}; torch {__import__('torch').__version__}"
          + (f"; baseline: {args.baseline_lib}, {baseline.pxl_isa().decode()} kernels" if baseline else ""))
    return _report(gemv.report(rows), rows, args.output_json)


def _bench_attention(args: argparse.Namespace) -> int:
    import torch

    import perfxlm  # noqa: F401 - configures logging
    from hw_plugins.cpu import library
    from perfxlm.bench import attention

    try:
        heads, kv_heads, head_dim = (int(x) for x in args.heads.split(","))
    except ValueError:
        raise SystemExit(f"perfxlm bench attention: --heads must be three integers such as 9,3,64, got {args.heads!r}")
    sizes = {"--batch": args.batch, "--context": args.context, "--prefill-len": args.prefill_len,
             "--layers": args.layers, "--heads": min(heads, kv_heads, head_dim)}
    bad = [name for name, v in sizes.items() if v < 1]
    if bad or heads % kv_heads:
        raise SystemExit(f"perfxlm bench attention: {bad[0]} must be >= 1" if bad else
                         f"perfxlm bench attention: --heads {args.heads}: query heads must be a multiple of KV heads")
    cache = args.dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    lib, baseline = library.load(), _baseline_lib("attention", args.baseline_lib)
    rows = attention.run(args.batch, args.context, args.prefill_len, args.layers, heads, kv_heads, head_dim,
                         args.dtype, cache, baseline=baseline)
    print(f"paged attention, {args.dtype} ({cache} KV cache), {args.batch} sequences, "
          f"{heads}/{kv_heads} heads of {head_dim}, "
          f"{args.layers} layers' caches; decode over {args.context} + 1 keys, prefill of {args.prefill_len} tokens; "
          f"ours: {lib.pxl_isa().decode()} kernels, {lib.pxl_num_threads()} threads; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads"
          + (f"; baseline: {args.baseline_lib}, {baseline.pxl_isa().decode()} kernels" if baseline else ""))
    return _report(attention.report(rows), rows, args.output_json)


def _bench_sampler(args: argparse.Namespace) -> int:
    import torch

    import perfxlm  # noqa: F401 - configures logging
    from hw_plugins.cpu import library
    from perfxlm.bench import sampler

    try:
        batches = [int(x) for x in args.rows.split(",")]
    except ValueError:
        raise SystemExit(f"perfxlm bench sampler: --rows must be a comma list of integers, got {args.rows!r}")
    if min(batches) < 1 or args.vocab < 1:
        raise SystemExit("perfxlm bench sampler: --rows and --vocab must be >= 1")
    rows = sampler.run(batches, args.vocab)
    lib = library.load()
    print(f"sampling by inverse CDF, unseeded rows; ours: {lib.pxl_isa().decode()} kernels, "
          f"{lib.pxl_num_threads()} threads; torch {torch.__version__}, {torch.get_num_threads()} threads")
    return _report(sampler.report(rows), rows, args.output_json)


def _bench_quality(args: argparse.Namespace) -> int:
    import os

    import perfxlm  # noqa: F401 - configures logging
    from perfxlm.bench import quality

    text = args.text or quality.DEFAULT_TEXT
    if not os.path.isfile(text):
        raise SystemExit(f"perfxlm bench quality: --text {text!r} is not a file")
    try:
        rows = quality.run(args.model, args.reference or args.model, args.dtype, args.reference_dtype, text,
                           args.ctx, args.chunks, args.llama_cpp, args.threads, args.kv_cache_dtype)
    except ValueError as e:
        raise SystemExit(f"perfxlm bench quality: {e}")
    print(f"{args.model} ({args.dtype}) against {args.reference or args.model} ({args.reference_dtype}); "
          f"{text}: {args.chunks} chunks of {args.ctx} tokens, the last {args.ctx - 1 - args.ctx // 2} of each "
          f"scored ({rows[0].tokens} tokens)")
    return _report(quality.report(rows), quality.as_json(rows), args.output_json)


def _report(text: str, data: object, json_path: str | None) -> int:
    """Print a bench's table; with --output-json also write its figures."""
    import json
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
    return 0


def _bench_roofline(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    import perfxlm  # noqa: F401 - configures logging
    from perfxlm.bench import roofline

    if args.model is None:
        from perfxlm.models.default_model import embedded_gguf_path
        args.model = str(embedded_gguf_path())
    is_hf_dir = os.path.isfile(os.path.join(args.model, "config.json"))
    if not is_hf_dir and (not str(args.model).endswith(".gguf") or not os.path.isfile(args.model)):
        raise SystemExit(f"perfxlm bench roofline: --model must be a GGUF file or an HF directory, got {args.model!r}")
    threads = args.threads or len(os.sched_getaffinity(0))
    roofs = roofline.measure(threads)
    rows = roofline.ceilings(roofs, roofline.model_cost(args.model))
    return _report(roofline.report(roofs, rows, threads), {"roofs": dataclasses.asdict(roofs), "workloads": rows},
                   args.output_json)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import perfxlm  # noqa: F401 - configures logging
    from graph_export.export import export_model, op_histogram, save_model
    from perfxlm.engine.arg_utils import resolve_dtypes
    from perfxlm.models.deployable import GRAPH, DeployableSource, write_deployable
    from perfxlm.models.loader import load_tokenizer, resolve_model
    from perfxlm.version import __version__

    if args.verify and importlib.util.find_spec("onnxruntime") is None:  # before the export, not after it
        raise SystemExit("perfxlm export --verify needs onnxruntime: pip install 'perfxlm[verify]'")
    source = resolve_model(args.model)
    if isinstance(source, DeployableSource):
        raise SystemExit(f"{args.model} is already a deployable directory; export from the original checkpoint")
    quantization = args.quantization or ("gguf" if args.dtype == "auto" and source.is_quantized() else None)
    if quantization == "gguf" and not source.is_gguf:
        raise SystemExit(f"--quantization gguf needs a .gguf model file; {args.model!r} is not one")
    dtype, weight_dtype = resolve_dtypes(source, args.dtype, quantization == "gguf", None)
    model = source.load_weights(dtype, weight_dtype)
    graph = export_model(model, source=args.model, producer_version=__version__,
                         quantized=source.linear_blocks() if quantization else None, weight_dtype=weight_dtype)
    output = Path(args.output)
    graph_file = output if output.suffix == ".onnx" else output / GRAPH
    save_model(graph, graph_file)
    if graph_file != output:
        write_deployable(source, output, dtype, quantization, graph_file, weight_dtype)
    weights = f", {str(weight_dtype).removeprefix('torch.')} weights" if weight_dtype else ""
    print(f"wrote {args.output} ({str(dtype).removeprefix('torch.')}{weights}"
          f"{', gguf blocks' if quantization else ''}); "
          "op types:")
    for op, count in op_histogram(graph).items():
        print(f"  {op:16s} {count}")
    if not args.verify:
        return 0
    from graph_export.verify import verify_graph
    ids = load_tokenizer(source).encode("The capital of France is Paris, and the capital of Italy is")
    result = verify_graph(graph, model, ids)
    print(f"verify (onnxruntime on the standard-ONNX lowering vs PyTorch): max abs logits diff "
          f"prefill {result.prefill_max_abs_diff:.3g}, decode {result.decode_max_abs_diff:.3g}; "
          f"tolerance {result.tolerance:.3g}: {'PASS' if result.ok else 'FAIL'}")
    return 0 if result.ok else 1


def _plugins() -> int:
    from hw_plugins.base import available_plugins
    print(f"{'plugin':12s} {'available':10s} why not")
    for name, ok, reason in available_plugins():
        print(f"{name:12s} {'yes' if ok else 'no':10s} {reason or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
