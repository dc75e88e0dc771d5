"""`perfxlm bench`: the commands run end to end on small inputs, print vLLM's summary lines,
write the figures they print, and refuse bad arguments by name. (Speed itself is never
asserted: numbers are read off the bench output.)"""

import json

import pytest

from perfxlm import cli
from perfxlm.bench import gemv


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


def test_throughput_counts_every_token(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "thr.json"
    assert cli.main(["bench", "throughput", "--model", str(tiny_llama_dir), "--dtype", "float32", "--num-prompts", "6",
                     "--input-len", "10", "--output-len", "7", "--output-json", str(out)]) == 0
    assert "Throughput:" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["num_requests"] == 6 and res["total_num_tokens"] == 6 * (10 + 7)  # ignore_eos: exact lengths
    assert res["output_tokens_per_second"] == pytest.approx(6 * 7 / res["elapsed_time"])


def test_gemv_bench_prints_ours_openblas_and_torch(monkeypatch, tmp_path, capsys):
    from hw_plugins.base import available_plugins
    if not dict((n, ok) for n, ok, _ in available_plugins()).get("cpu"):
        pytest.skip("the native cpu kernels are not built here")
    monkeypatch.setattr(gemv, "SHAPES", [(64, 48)])
    monkeypatch.setattr(gemv, "_time", lambda fn, min_time=0.2: (fn(), 1e-6)[1])  # one call each: no timing loop
    out = tmp_path / "gemv.json"
    assert cli.main(["bench", "gemv", "--formats", "fp32,q4_1", "--rows", "3", "--output-json", str(out)]) == 0
    assert "GEMM with 3 rows" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [(r["format"], r["rows"]) for r in rows] == [("fp32", 3), ("q4_1", 3)]
    assert all("openblas_us" in r and "torch_us" in r for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--formats", "fp33"], "unknown --formats ['fp33']"),
    (["--rows", "0"], "--rows and --threads must be >= 1"),
])
def test_gemv_bench_refuses_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.main(["bench", "gemv", *argv])
