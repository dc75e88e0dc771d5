"""`perfxlm bench`: the commands run end to end on small inputs, print vLLM's summary lines,
write the figures they print, and refuse bad arguments by name. (Speed itself is never
asserted: numbers are read off the bench output.)"""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from perfxlm import cli
from perfxlm.bench import gemv

# llama.cpp's tools as ../shared/peers/build_llamacpp.sh builds them
LLAMA_CPP = Path(os.environ.get("PERFXLM_LLAMA_CPP") or Path.home() / "peers" / "llamacpp" / "bin")
_NUMBER = r"([\d.]+(?:e[-+]\d+)?)"
_ROOFLINE_LINE = re.compile(rf"^Roofline \((\w+)\): {_NUMBER} (GB/s|GFLOP/s|GOP/s), {_NUMBER} % of the (.+) \(", re.M)


def has_cpu_kernels() -> bool:
    from hw_plugins.base import available_plugins
    return bool(dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"))


def roofline_lines(text: str) -> dict[str, tuple[float, str, float, str]]:
    """phase -> (achieved, unit, percent, roof name) from the "Roofline (phase): ..." lines."""
    return {m[1]: (float(m[2]), m[3], float(m[4]), m[5]) for m in _ROOFLINE_LINE.finditer(text)}


def test_latency_prints_and_writes_its_figures(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert cli.main(["bench", "latency", "--model", str(tiny_llama_dir), "--dtype", "float32", "--input-len", "12",
                     "--output-len", "5", "--num-iters", "2", "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TTFT (ms): mean" in text and "TPOT (ms): mean" in text and "Decode:" in text
    res = json.loads(out.read_text())
    assert res["output_len"] == 5 and res["dtype"] == "float32"
    # 2 iterations x 4 inter-token gaps; TPOT is their mean, decode rate its inverse
    assert res["ttft_mean_ms"] > 0 and res["decode_tokens_per_second"] == pytest.approx(1e3 / res["tpot_mean_ms"])
    assert res["itl_p50_ms"] <= res["itl_p99_ms"]
    if not has_cpu_kernels():
        assert "Roofline: not measured" in text
        return
    # beside tok/s: decode's achieved read bandwidth, prefill's fp32 GFLOP/s, each as a share of its roof
    # (a tiny model's weights sit in the caches, so the share may pass 100 %: only its sign is known)
    lines = roofline_lines(text)
    assert set(lines) == {"decode", "prefill"}
    assert lines["decode"][1] == "GB/s" and lines["decode"][3] == "read bandwidth"
    assert lines["prefill"][1] == "GFLOP/s" and lines["prefill"][3] == "fp32 peak"
    assert all(achieved > 0 and percent > 0 for achieved, _, percent, _ in lines.values())
    assert res["roofline"]["decode"]["percent"] == pytest.approx(
        100 * res["roofline"]["decode"]["achieved"] / res["roofs"]["read_GBs"])


def test_latency_with_one_output_token_has_no_decode_figures(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert cli.main(["bench", "latency", "--model", str(tiny_llama_dir), "--dtype", "float32", "--input-len", "8",
                     "--output-len", "1", "--num-iters", "1", "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    # the one token comes with the prefill: no TPOT, no decode rate, no decode roofline (and no NaN in the JSON)
    assert "no decode step (--output-len 1)" in text and "TPOT" not in text and "nan" not in text
    res = json.loads(out.read_text())
    assert res["prefill_tokens_per_second"] > 0 and "decode_tokens_per_second" not in res
    assert "decode" not in res.get("roofline", {})


def test_latency_no_roofline_skips_the_roofs(tiny_llama_dir, capsys):
    assert cli.main(["bench", "latency", "--model", str(tiny_llama_dir), "--dtype", "float32", "--input-len", "4",
                     "--output-len", "2", "--num-iters", "1", "--no-roofline"]) == 0
    assert "Roofline" not in capsys.readouterr().out


def test_throughput_counts_every_token(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "thr.json"
    assert cli.main(["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "6",
                     "--input-len", "10", "--output-len", "7", "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Throughput:" in text
    res = json.loads(out.read_text())
    assert res["num_requests"] == 6 and res["total_num_tokens"] == 6 * (10 + 7)  # ignore_eos: exact lengths
    assert res["output_tokens_per_second"] == pytest.approx(6 * 7 / res["elapsed_time"])
    if has_cpu_kernels():  # the whole batch's FLOPs against the fp32 peak
        (achieved, unit, percent, roof), = roofline_lines(text).values()
        assert unit == "GFLOP/s" and roof == "fp32 peak" and achieved > 0 and percent > 0
        assert res["roofline"]["batch"]["achieved"] == pytest.approx(achieved, rel=0.05)  # as printed


@pytest.mark.parametrize("flags, cache", [([], "bfloat16"), (["--kv-cache-dtype", "float32"], "float32")])
def test_throughput_names_the_kv_cache_dtype(tiny_llama_dir, tmp_path, flags, cache):
    """A bf16 model's cache is bf16 unless --kv-cache-dtype float32 keeps it unrounded; the
    figures say which ran."""
    out = tmp_path / "thr.json"
    assert cli.main(["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "bfloat16", "--num-prompts",
                     "2", "--input-len", "6", "--output-len", "3", "--no-roofline", "--output-json", str(out),
                     *flags]) == 0
    res = json.loads(out.read_text())
    assert (res["dtype"], res["kv_cache_dtype"]) == ("bfloat16", cache)
    assert res["total_num_tokens"] == 2 * (6 + 3)


def test_throughput_profiles_the_ops_of_the_timed_run(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoConfig
    layers = AutoConfig.from_pretrained(tiny_llama_dir).num_hidden_layers
    out = tmp_path / "thr.json"
    assert cli.main(["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "3",
                     "--input-len", "10", "--output-len", "4", "--hw-plugin", "cpu", "--profile-ops",
                     "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PagedAttention" in text and "ms/call" in text
    prof = json.loads(out.read_text())
    ops = prof["op_profile"]
    # gate, up and SiluMul run as one pass where the kernel set packs fp32 weights in panels
    from hw_plugins.cpu import library
    fused = library.load().pxl_packed_bytes(library.F32, 128, 64) != 0
    mlp = {"Linear+SiluMul"} if fused else {"SiluMul"}
    # q, k and v as one Linear (and so gate and up where they are not fused with SiluMul); each
    # residual Add with the RMSNorm after it: all but the last Add, all but 2 norms
    assert set(ops) == {"Gather", "RMSNorm", "Linear", "Linear parts", "RoPE", "PagedAttention", "Add",
                        "Add+RMSNorm"} | mlp
    assert ops["Add+RMSNorm"]["calls"] == 4 * (2 * layers - 1)
    assert ops["Add"]["calls"] == ops["RMSNorm"]["calls"] / 2 == 4
    # only the timed generate: one prefill step and 3 decode steps (the warm-up is not counted)
    assert ops["PagedAttention"]["calls"] == 4 * layers
    assert ops["Linear"]["calls"] == 4 * (2 * layers + 1)  # o, down; the lm_head
    assert ops["Linear parts"]["calls"] == 4 * (1 if fused else 2) * layers
    assert ops[mlp.pop()]["calls"] == 4 * layers
    # split by phase: the prefill step, then the decode steps
    assert ops["PagedAttention"]["prefill_calls"] == layers and ops["PagedAttention"]["decode_calls"] == 3 * layers
    for o in ops.values():
        assert o["prefill_seconds"] + o["decode_seconds"] == pytest.approx(o["seconds"])
        assert o["prefill_calls"] + o["decode_calls"] == o["calls"]
    assert 0 < sum(o["seconds"] for o in ops.values()) <= prof["elapsed_time"]
    # and the engine's own time around them
    assert 0 < prof["outside_ops_seconds"] < prof["elapsed_time"] and "outside the ops:" in text


def test_profile_ops_says_when_no_cpu_step_ran(tiny_llama_dir, capsys):
    assert cli.main(["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "2",
                     "--input-len", "6", "--output-len", "2", "--hw-plugin", "torch", "--profile-ops"]) == 0
    assert "no compiled cpu-plugin step ran" in capsys.readouterr().out


def test_gemv_bench_prints_ours_openblas_and_torch(monkeypatch, tmp_path, capsys):
    from hw_plugins.base import available_plugins
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    monkeypatch.setattr(gemv, "SHAPES", [(64, 48), (32, 40)])
    monkeypatch.setattr(gemv, "GATED", (64, 48))  # and the one that also runs as gate/up with SiLU
    monkeypatch.setattr(gemv, "_time", lambda fn, min_time=0.2: (fn(), 1e-6)[1])  # one call each: no timing loop
    out = tmp_path / "gemv.json"
    assert cli.main(["bench", "gemv", "--formats", "fp32,bf16,q4_1", "--rows", "3", "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GEMM with 3 rows" in printed
    rows = json.loads(out.read_text())
    assert [(r["K"], r["format"], r["rows"]) for r in rows] == [
        (64, "fp32", 3), (64, "gated", 3), (64, "bf16", 3), (64, "bf16 x/y", 3), (64, "gated", 3), (64, "q4_1", 3),
        (32, "fp32", 3), (32, "bf16", 3), (32, "bf16 x/y", 3), (32, "q4_1", 3)]
    assert all("torch_us" in r for r in rows)
    # no bf16 in OpenBLAS, and no fused SiLU
    assert all("openblas_us" in r for r in rows if r["format"] not in ("bf16", "bf16 x/y", "gated"))
    gated = [r for r in rows if r["format"] == "gated"]
    assert all(r["weight_MB"] == 2 * p["weight_MB"] for r, p in zip(gated, [rows[0], rows[2]]))  # gate and up
    for plain, xy in zip(rows, rows[1:]):  # the same kernel and weights, beside the same torch mm
        if xy["format"] == "bf16 x/y":
            assert plain["format"] == "bf16" and xy["torch_us"] == plain["torch_us"]
            assert xy["weight_MB"] == plain["weight_MB"] and xy["ours_us"] > 0
            assert xy["bf16_row_max_rel"] <= 2 ** -8  # the bf16 row's y, rounded to bf16 (x is bf16 in both)


def _kernels_copy(tmp_path) -> Path:
    """A copy of the native kernels' library, to pass as --baseline-lib (skips where none is built)."""
    import shutil
    from hw_plugins.cpu import library
    try:
        library.load()
    except OSError as e:
        pytest.skip(f"the native cpu kernels are not built here: {e}")
    copy = tmp_path / library.LIB_NAME
    shutil.copy(next(p for p in library.candidates() if p.is_file()), copy)
    return copy


def test_gemv_bench_times_a_baseline_library_beside_ours(monkeypatch, tmp_path, capsys):
    """--baseline-lib: every row, the gated one too, also runs another copy of the kernels on its
    own packed weights (here the same build: the same bits)."""
    copy = _kernels_copy(tmp_path)
    monkeypatch.setattr(gemv, "SHAPES", [(64, 48)])
    monkeypatch.setattr(gemv, "GATED", (64, 48))
    monkeypatch.setattr(gemv, "_time", lambda fn, min_time=0.2: (fn(), 1e-6)[1])
    out = tmp_path / "gemv.json"
    assert cli.main(["bench", "gemv", "--formats", "bf16,q4_0", "--rows", "5", "--baseline-lib", str(copy),
                     "--output-json", str(out)]) == 0
    assert f"baseline: {copy}" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["format"] for r in rows] == ["bf16", "bf16 x/y", "gated", "q4_0"]
    for r in rows:
        assert r["baseline_us"] > 0 and r["baseline_max_abs_diff"] == 0.0, r
    with pytest.raises(SystemExit, match=r"perfxlm bench gemv: --baseline-lib \S*nowhere\.so: "):
        cli.main(["bench", "gemv", "--baseline-lib", str(tmp_path / "nowhere.so")])


def test_gemv_cold_rotation_fills_twice_the_last_level_cache(monkeypatch):
    """--cold's weights: the array and copies of it, together at least twice the last-level cache,
    each call the next one's address in turn; without --cold the one array."""
    monkeypatch.setattr(gemv, "last_level_cache_bytes", lambda: 2500)
    a = np.arange(250, dtype=np.float32)  # 1000 bytes: 5 arrays hold 2 x 2500
    cold = gemv.Rotation(a, cold=True)
    assert len(cold.arrays) == 5 and all(np.array_equal(c, a) for c in cold.arrays)
    addresses = [cold.next() for _ in range(10)]
    assert len(set(addresses[:5])) == 5 and addresses[5:] == addresses[:5]
    assert {c.__array_interface__["data"][0] for c in cold.arrays} == set(addresses)
    tensors = cold.tensors(lambda c: c.sum())
    assert [tensors() for _ in range(6)] == [a.sum()] * 6
    warm = gemv.Rotation(a, cold=False)
    assert warm.arrays == [a] and warm.next() == warm.next() == a.__array_interface__["data"][0]


def test_gemv_bench_cold_reads_each_call_from_its_own_copy(monkeypatch, tmp_path, capsys):
    """--cold: the same rows, every format's weights rotated (both builds on equal copies: the same
    bits), and the header says how much memory the copies fill."""
    copy = _kernels_copy(tmp_path)
    monkeypatch.setattr(gemv, "last_level_cache_bytes", lambda: 1 << 20)
    monkeypatch.setattr(gemv, "_time", lambda fn, min_time=0.2: ([fn() for _ in range(3)], 1e-6)[1])
    used: dict = {}  # each rotation (kept alive here): its addresses, in the order the calls took them
    next_copy = gemv.Rotation.next
    monkeypatch.setattr(gemv.Rotation, "next", lambda self: used.setdefault(self, []).append(next_copy(self))
                        or used[self][-1])
    out = tmp_path / "gemv.json"
    assert cli.main(["bench", "gemv", "--formats", "fp32,bf16,q4_0", "--rows", "4", "--shapes", "64x48", "--cold",
                     "--baseline-lib", str(copy), "--output-json", str(out)]) == 0
    assert "weights from memory (copies filling 2 MiB)" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["format"] for r in rows] == ["fp32", "bf16", "bf16 x/y", "q4_0"]
    for r in rows:
        assert r["baseline_max_abs_diff"] == 0.0 and r["torch_us"] > 0, r
    # ours, the baseline's, OpenBLAS's: each call reads the next copy, all of them before any again
    assert len(used) >= 8
    for rotation, a in used.items():
        n = len(rotation.arrays)
        assert n > 100 and len(a) >= 3 and len(set(a[:n])) == min(len(a), n) and a[n:] == a[:len(a) - n], a


def test_last_level_cache_is_the_largest_level_linux_lists(monkeypatch, tmp_path):
    for level, size in ((1, "48K"), (2, "2048K"), (3, "480M")):
        (tmp_path / f"index{level}").mkdir()
        (tmp_path / f"index{level}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{level}" / "size").write_text(f"{size}\n")
    real = gemv.Path
    monkeypatch.setattr(gemv, "Path", lambda p: tmp_path if p == "/sys/devices/system/cpu/cpu0/cache" else real(p))
    assert gemv.last_level_cache_bytes() == 480 << 20
    monkeypatch.setattr(gemv, "Path", lambda p: tmp_path / "none")
    assert gemv.last_level_cache_bytes() == 64 << 20


def test_gemv_bench_times_k_quants_on_whole_super_blocks(monkeypatch, tmp_path):
    """q4_k / q5_k / q6_k: random blocks the kernels run as the engine does (repacked where the set
    repacks), both builds alike, beside torch and OpenBLAS on their dequantisation; a K that is
    not whole 256-weight super-blocks is refused, naming the shape."""
    copy = _kernels_copy(tmp_path)
    monkeypatch.setattr(gemv, "_time", lambda fn, min_time=0.2: (fn(), 1e-6)[1])
    out = tmp_path / "gemv.json"
    assert cli.main(["bench", "gemv", "--formats", "q4_k,q5_k,q6_k", "--rows", "9", "--shapes", "512x40",
                     "--baseline-lib", str(copy), "--output-json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["format"], r["K"], r["N"]) for r in rows] == [("q4_k", 512, 40), ("q5_k", 512, 40), ("q6_k", 512, 40)]
    assert [r["weight_MB"] for r in rows] == [40 * 2 * b / 1e6 for b in (144, 176, 210)]  # the blocks' bytes
    for r in rows:
        assert r["baseline_max_abs_diff"] == 0.0 and "openblas_us" in r and "torch_us" in r, r
    with pytest.raises(SystemExit, match=r"--shapes \['576x40'\]: K must be a multiple of 256 for --formats \['q4_k'\]"):
        cli.main(["bench", "gemv", "--formats", "q4_k", "--shapes", "576x40"])


def test_gemv_bench_times_the_shapes_asked_for(monkeypatch, tmp_path):
    """--shapes replaces the SmolLM2 list: each KxN once per format, in the order given."""
    from hw_plugins.base import available_plugins
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    monkeypatch.setattr(gemv, "_time", lambda fn, min_time=0.2: (fn(), 1e-6)[1])
    out = tmp_path / "gemv.json"
    assert cli.main(["bench", "gemv", "--formats", "fp32,q4_0", "--rows", "2", "--shapes", "96x40,64X8",
                     "--output-json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["K"], r["N"], r["format"]) for r in rows] == [
        (96, 40, "fp32"), (96, 40, "q4_0"), (64, 8, "fp32"), (64, 8, "q4_0")]
    assert all(r["ours_us"] > 0 and r["torch_us"] > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--formats", "fp33"], "unknown --formats ['fp33']"),
    (["--rows", "0"], "--rows and --threads must be >= 1"),
    (["--shapes", "2048"], "--shapes: '2048' is not KxN"),
    (["--shapes", "64x8,0x8"], "--shapes: '0x8' is not KxN"),
    (["--shapes", "70x8", "--formats", "fp32,q4_0"], "--shapes ['70x8']: K must be a multiple of 32 for --formats ['q4_0']"),
])
def test_gemv_bench_refuses_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.main(["bench", "gemv", *argv])


def test_roofline_measures_the_roofs_and_derives_each_ceiling(monkeypatch, gguf_path, tmp_path, capsys):
    from hw_plugins.base import available_plugins
    from perfxlm.bench import roofline
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    monkeypatch.setattr(roofline, "MiB", 1 << 16)  # a 4 MiB read stream: enough to run, quick
    out = tmp_path / "roof.json"
    assert cli.main(["bench", "roofline", "--output-json", str(out)]) == 0
    assert "roofs (" in capsys.readouterr().out
    res = json.loads(out.read_text())
    roofs, rows = res["roofs"], {r["workload"]: r for r in res["workloads"]}
    assert roofs["read_GBs"] > 0 and roofs["fp32_GFLOPs"] > 0
    q4 = rows["W2 decode, Q4_1/Q8_0 GGUF blocks"]
    # SmolLM2's Q4_1 blocks (66.4 MB) and Q8_0 lm_head (30.1 MB) plus the KV read
    assert 96e6 < q4["bytes_per_token"] < 101e6
    assert q4["ceiling_tok_s"] == pytest.approx(roofs["read_GBs"] * 1e9 / q4["bytes_per_token"])
    w3 = rows["W3 prefill 512, bf16"]
    if roofs["bf16_GFLOPs"] == roofs["bf16_GFLOPs"]:  # NaN where the CPU has no AVX512-BF16
        assert w3["ceiling_tok_s"] == pytest.approx(roofs["bf16_GFLOPs"] * 1e9 / w3["flops_per_token"])


def test_gguf_prefill_is_placed_under_the_arithmetic_its_kernel_set_runs(gguf_path, monkeypatch):
    """Q4_1/Q8_0 blocks (and Q4_K / Q6_K) run int8 dot products, except on the amx set, whose
    prefill runs them as bf16 tiles, and under PERFXLM_QUANT_ACTIVATIONS=bf16: the rate goes
    under that peak.
    A model as narrow as SmolLM2-135M runs "auto" as int16-decode: its prefill takes the panels
    on every set with them (AVX512-BF16 too), int16 x (int8 products) elsewhere."""
    from hw_plugins.base import available_plugins
    from perfxlm import config
    from perfxlm.bench import roofline
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    from hw_plugins.cpu import library
    cost = roofline.model_cost(gguf_path)
    assert cost.panel_quants and cost.hidden == 576  # SmolLM2's Q4_1 blocks
    roofs = roofline.Roofs(read_GBs=30.0, fp32_GFLOPs=400.0, bf16_GFLOPs=6000.0, int8_GOPs=1500.0)
    panels = library.load().pxl_isa() in (b"amx", b"avx512bf16")
    assert roofline.compute_usage(roofs, "gguf", 1e9, 600.0, cost).roof_name == ("bf16" if panels else "int8") + " peak"
    monkeypatch.setattr(config, "INT16_X_MAX_HIDDEN", 0)  # "auto": the kernel set's own paths
    u = roofline.compute_usage(roofs, "gguf", 1e9, 600.0, cost)
    tiles = library.load().pxl_isa() == b"amx"
    assert (u.roof, u.roof_name) == ((6000.0, "bf16 peak") if tiles else (1500.0, "int8 peak"))
    assert u.percent == pytest.approx(10.0 if tiles else 40.0)
    assert roofline.compute_usage(roofs, "gguf", 1e9, 600.0).roof_name == "int8 peak"  # no cost: int8
    if tiles:  # the same CPU on its AVX512-BF16 set: int8 again
        lib = library.load()
        assert lib.pxl_set_isa(b"avx512bf16") == 0
        try:
            assert roofline.compute_usage(roofs, "gguf", 1e9, 600.0, cost).roof_name == "int8 peak"
        finally:
            lib.pxl_set_isa(b"amx")
    for mode, kind in (("int8", "int8"), ("int16", "int8"), ("bf16", "bf16")):  # whatever the set
        monkeypatch.setenv("PERFXLM_QUANT_ACTIVATIONS", mode)
        assert roofline.compute_usage(roofs, "gguf", 1e9, 600.0, cost).roof_name == f"{kind} peak", mode


def test_roofline_refuses_a_model_that_is_not_a_gguf(tmp_path):
    with pytest.raises(SystemExit, match="--model must be a GGUF file or an HF directory, got 'nope.safetensors'"):
        cli.main(["bench", "roofline", "--model", "nope.safetensors"])


def test_model_cost_of_an_hf_directory_counts_transformers_weights(tiny_llama_dir):
    """Read off the safetensors headers: every Linear of the blocks and the lm_head, as
    transformers' own model has them."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from perfxlm.bench import roofline
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    linears = [m for name, m in model.named_modules() if ".layers." in name and type(m).__name__ == "Linear"]
    cost = roofline.model_cost(tiny_llama_dir)
    assert cost.linear_params == sum(m.weight.numel() for m in linears)
    assert cost.lm_head_params == model.lm_head.weight.numel()
    assert cost.quant_bytes == 4 * (cost.linear_params + cost.lm_head_params)  # stored as float32
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert (cost.layers, cost.q_width, cost.kv_width) == (
        cfg.num_hidden_layers, cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim)


@pytest.fixture
def no_peers(monkeypatch):
    """No peer engine configured through the environment: only the flags name them."""
    monkeypatch.delenv("PERFXLM_LLAMA_CPP", raising=False)
    monkeypatch.delenv("PERFXLM_VLLM_PYTHON", raising=False)


def table_rows(text: str) -> list[list[str]]:
    """The cells of the compare table's rows (after its header and rule)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_compare_alone_prints_the_table_with_dashes_for_absent_peers(no_peers, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert cli.main(["bench", "compare", "--rounds", "1", "--workloads", "W2", "--w2", "4,3",
                     "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| model | workload | perfxlm tok/s | vLLM tok/s | llama.cpp tok/s | perfxlm ÷ best peer |")
    (row,) = table_rows(text)
    # the embedded default, run as stored; no peer: dashes, and no ratio
    assert row[:2] == ["SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1)", "W2 decode 4 -> 3, tok/s"]
    assert float(row[2]) > 0 and row[3:6] == ["—", "—", "—"]
    res = json.loads(out.read_text())
    (r,) = res["rows"]
    assert r["tok_s"]["perfxlm"] == pytest.approx(float(row[2]), abs=0.051) and len(r["samples"]["perfxlm"]) == 1
    assert r["ratio_to_best_peer"] is None and r["tok_s"]["vLLM"] is None and r["tok_s"]["llama.cpp"] is None
    # the command it ran, for a reader to repeat, runs the same decode
    (cmd,) = res["commands"]["perfxlm"]
    assert " bench latency " in cmd and "--input-len 4 --output-len 3" in cmd and cmd in text
    if has_cpu_kernels():  # decode: weights and KV bytes per token against the read bandwidth
        assert row[6].endswith("% of read bandwidth") and float(row[6].split()[0]) > 0
        assert r["roofline"]["perfxlm"]["unit"] == "GB/s" and r["roofline"]["perfxlm"]["achieved"] > 0


@pytest.mark.parametrize("args,message", [
    (["--workloads", "W1,W4"], r"unknown --workloads \['W4'\] \(choose from W1, W2, W3\)"),
    (["--w1", "64,128"], "--w1 must be 3 comma-separated integers >= 1, got '64,128'"),
    (["--w3", "0"], "--w3 must be 1 comma-separated integers >= 1, got '0'"),
    (["--w2", "32,1"], r"--w2 32,1: OUT must be >= 2 \(decode is timed after the first token\)"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--gguf", "model.bin"], "--gguf 'model.bin' is not a .gguf file"),
    (["--vllm-python", sys.executable], "no vllm is importable there"),
    (["--vllm-python", "/nonexistent/python"], "--vllm-python /nonexistent/python: cannot run it"),
])
def test_compare_names_bad_flags_before_running_anything(no_peers, args, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", "compare", *args])


def test_compare_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "compare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--gguf", "--llama-cpp", "--vllm-python", "--workloads", "--no-roofline"))


def test_compare_refuses_a_llama_cpp_dir_without_its_tools(no_peers, tmp_path):
    (tmp_path / "llama-cli").touch()
    with pytest.raises(SystemExit, match=rf"--llama-cpp {tmp_path}: no llama-bench or llama-batched-bench there"):
        cli.main(["bench", "compare", "--llama-cpp", str(tmp_path)])
    # each workload asks only for the tool it runs
    with pytest.raises(SystemExit, match=r"no llama-batched-bench there"):
        cli.main(["bench", "compare", "--llama-cpp", str(tmp_path), "--workloads", "W1"])


def test_vllm_side_script_speaks_vllms_api(tiny_llama_dir):
    """The script compare hands to vLLM's python, run here by `perfxlm run` (which serves
    `import vllm` with vLLM's API): every workload prints its figure."""
    import subprocess
    from perfxlm.bench import engines
    proc = subprocess.run([sys.executable, "-m", "perfxlm.cli", "run", str(engines.VLLM_SCRIPT), "--model",
                           str(tiny_llama_dir), "--dtype", "float32", "--w1", "2,5,3", "--w2", "4,3", "--w3", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(engines.VLLM_RESULT))
    figures = json.loads(line.removeprefix(engines.VLLM_RESULT))
    assert set(figures) == {"W1", "W2", "W3"} and all(v > 0 for v in figures.values())


@pytest.mark.parametrize("sig", ["ILL", "SEGV"])
def test_a_llama_cpp_tool_that_traps_runs_again_without_repacking(tmp_path, sig):
    """llama.cpp's repacked AMX kernels trap or crash on some VMs; its plain kernels are timed
    instead, and only those two signals earn the rerun."""
    from perfxlm.bench import engines
    tool = tmp_path / "llama-tool"  # a process that dies as that build does, unless repacking is off
    tool.write_text(f'#!/bin/sh\ncase "$*" in *--no-repack*) echo ran "$@"; exit 0;; esac\nkill -{sig} $$\n')
    tool.chmod(0o755)
    cmd, stdout, _ = engines.run_llama_cpp([tool, "-m", "x.gguf"], ["--no-repack"])
    assert cmd == [tool, "-m", "x.gguf", "--no-repack"] and stdout == "ran -m x.gguf --no-repack\n"
    tool.write_text("#!/bin/sh\nexit 3\n")  # any other failure is reported as it is
    with pytest.raises(engines.CommandError, match="exit status 3") as err:
        engines.run_llama_cpp([tool], ["--no-repack"])
    assert err.value.returncode == 3


def test_llama_bench_times_decode_and_prefill_apart(tmp_path):
    """W2 (tg) and W3 (pp) are two llama-bench commands: where only the repacked prompt path
    crashes, decode keeps the repacked kernels and prefill alone reruns without them."""
    from perfxlm.bench import engines
    bench = tmp_path / "llama-bench"  # dies on a prompt unless repacking is off; else one JSON test per fa
    bench.write_text(f"""#!{sys.executable}
import json, os, signal, sys
a = sys.argv
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
if p and "--repack" not in a:
    os.kill(os.getpid(), signal.SIGSEGV)
print(json.dumps([{{"n_prompt": p, "n_gen": n, "avg_ts": 10.0 + fa}} for fa in (0, 1)]))
""")
    bench.chmod(0o755)
    model = engines.Model("m.gguf", "m.gguf", True, "auto", "gguf")
    run = engines.LlamaCpp(str(tmp_path), 2).run(model, engines.Workloads(w2=(8, 4), w3=16), ["W2", "W3"])
    assert run.tok_s == {"W2": 11.0, "W3": 11.0}  # the better of flash attention off and on
    assert run.commands == [f"{bench} -m m.gguf -p 16 -n 0 -t 2 -fa 0,1 -r 1 -o json --repack 0",
                            f"{bench} -m m.gguf -p 0 -n 4 -t 2 -fa 0,1 -r 1 -o json"]


def test_compare_runs_llama_cpp_beside_perfxlm_on_the_same_gguf(no_peers, gguf_path, tmp_path, capsys):
    tools = ("llama-bench", "llama-batched-bench")
    if not all(os.access(LLAMA_CPP / t, os.X_OK) for t in tools):
        pytest.skip(f"llama.cpp's {' and '.join(tools)} are not built in {LLAMA_CPP} "
                    "(../shared/peers/build_llamacpp.sh, or point $PERFXLM_LLAMA_CPP at them)")
    out = tmp_path / "cmp.json"
    assert cli.main(["bench", "compare", "--gguf", str(gguf_path), "--llama-cpp", str(LLAMA_CPP), "--rounds", "1",
                     "--workloads", "W1,W3", "--w1", "2,8,4", "--w3", "16", "--no-roofline",
                     "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    rows = table_rows(text)
    assert [r[1] for r in rows] == ["W1 2 x 8 -> 4, out tok/s", "W3 prefill 16, tok/s"]
    for r in rows:  # both engines measured, vLLM cannot run a GGUF file
        assert float(r[2]) > 0 and float(r[4]) > 0 and r[3] == "—"
    for r in json.loads(out.read_text())["rows"]:
        ours, theirs = r["tok_s"]["perfxlm"], r["tok_s"]["llama.cpp"]
        assert r["ratio_to_best_peer"] == pytest.approx(ours / theirs)
    # llama.cpp at its best: every core, flash attention off and on (the better kept) for llama-bench
    threads = len(os.sched_getaffinity(0))
    assert f"llama-bench -m {gguf_path} -p 16 -n 0 -t {threads} -fa 0,1" in text
    assert f"llama-batched-bench -m {gguf_path} -npl 2 -npp 8 -ntg 4 -c 24 -t {threads} -fa on" in text


def test_side_by_side_script_prints_both_engines_and_the_ratio():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "side_by_side.py"
    proc = subprocess.run([sys.executable, str(script), "--workloads", "W3"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("perfxlm: W3 prefill tok/s") for line in lines)
    assert any(line.startswith("transformers: W3 prefill tok/s") for line in lines)
    row = next(line for line in lines if line.startswith("W3 prefill tok/s"))
    ours, theirs, ratio = (float(v.rstrip("x")) for v in row.split()[-3:])
    assert ratio == pytest.approx(ours / theirs, rel=0.02)


@pytest.mark.parametrize("dtype,cache,tol", [("float32", "auto", 1e-5), ("bfloat16", "auto", 3e-2),
                                             ("float32", "float16", 1e-5)])
def test_attention_bench_agrees_with_torch_sdpa(tmp_path, capsys, dtype, cache, tol):
    """Decode and prefill over several layers' paged caches, beside torch's SDPA on the same
    values laid out densely: both timed, and our output is torch's to rounding (an f16 cache's
    rows are the same values for both, so float32 activations stay within float32's)."""
    from hw_plugins.base import available_plugins
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    out = tmp_path / "attn.json"
    assert cli.main(["bench", "attention", "--batch", "3", "--context", "37", "--prefill-len", "21", "--layers", "2",
                     "--heads", "4,2,32", "--dtype", dtype, "--kv-cache-dtype", cache, "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x torch" in printed and f"({dtype if cache == 'auto' else cache} KV cache)" in printed
    rows = json.loads(out.read_text())
    assert [r["phase"] for r in rows] == ["decode", "prefill"]
    for r in rows:
        assert r["ours_us"] > 0 and r["torch_us"] > 0 and r["max_abs_diff"] < tol, r


def test_attention_bench_times_a_baseline_library_beside_ours(tmp_path, capsys):
    """--baseline-lib: a second copy of the kernels (here the same build, so the same bits) runs
    in the same process in turn with ours; a file that is not a kernel library is refused by name."""
    import shutil
    from hw_plugins.cpu import library
    try:
        lib = library.load()
    except OSError as e:
        pytest.skip(f"the native cpu kernels are not built here: {e}")
    path = next(p for p in library.candidates() if p.is_file())
    copy = tmp_path / "base" / library.LIB_NAME
    copy.parent.mkdir()
    shutil.copy(path, copy)
    assert library.load_at(copy)._handle != lib._handle  # a copy of its own, not the loaded one again
    out = tmp_path / "attn.json"
    assert cli.main(["bench", "attention", "--batch", "3", "--context", "37", "--prefill-len", "21", "--layers", "2",
                     "--heads", "4,2,32", "--dtype", "float32", "--baseline-lib", str(copy),
                     "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"baseline: {copy}, {lib.pxl_isa().decode()} kernels" in printed and "x baseline" in printed
    for r in json.loads(out.read_text()):
        assert r["baseline_us"] > 0 and r["baseline_max_abs_diff"] == 0.0, r
    (tmp_path / "not_a_lib.so").write_text("no")
    with pytest.raises(SystemExit, match=r"--baseline-lib \S*not_a_lib\.so: "):
        cli.main(["bench", "attention", "--baseline-lib", str(tmp_path / "not_a_lib.so")])


@pytest.mark.parametrize("flag,value,message", [("--heads", "9,2,64", "multiple of KV heads"),
                                                ("--heads", "9,3", "three integers"),
                                                ("--layers", "0", "--layers must be >= 1")])
def test_attention_bench_names_bad_flags(flag, value, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", "attention", flag, value])


def test_sampler_bench_draws_the_same_tokens_as_torch(tmp_path, capsys):
    from hw_plugins.base import available_plugins
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    out = tmp_path / "smp.json"
    assert cli.main(["bench", "sampler", "--rows", "1,16", "--vocab", "3000", "--output-json", str(out)]) == 0
    assert "x torch" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["rows"], r["vocab"], r["logits"]) for r in rows] == [(1, 3000, "cached"), (1, 3000, "DRAM"),
                                                                     (16, 3000, "cached"), (16, 3000, "DRAM")]
    for r in rows:  # (a uniform at a CDF edge may round either way: almost never at these sizes)
        assert r["ours_us"] > 0 and r["torch_us"] > 0 and r["same_tokens"] >= r["rows"] - 1, r


@pytest.mark.parametrize("args,message", [(["--rows", "1,x"], "comma list of integers"),
                                          (["--rows", "0"], "must be >= 1"), (["--vocab", "0"], "must be >= 1")])
def test_sampler_bench_names_bad_flags(args, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", "sampler", *args])


def test_gemv_bench_without_openblas_names_the_extra(monkeypatch):
    from perfxlm.bench import openblas
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # as if the extra were not installed
    openblas.load.cache_clear()
    try:
        with pytest.raises(SystemExit, match=r"needs scipy-openblas32: pip install 'perfxlm\[bench\]'"):
            openblas.load()
    finally:
        openblas.load.cache_clear()
