"""Export round trip, --verify, format checks, and the graph runner against the torch model."""

import os

import numpy as np
import onnx
import pytest
import torch

from graph_export.export import export_model, op_histogram, save_model
from graph_export.ops import FORMAT_VERSION, OPS
from graph_export.verify import verify_graph
from perfxlm import LLM, SamplingParams
from perfxlm.cli import main
from perfxlm.engine.graph_runner import load_graph
from perfxlm.models.loader import resolve_model


@pytest.fixture(scope="module")
def tiny_export(tiny_llama_dir, tmp_path_factory):
    model = resolve_model(str(tiny_llama_dir)).load_weights(torch.float32)
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    graph = export_model(model, source="tiny")
    save_model(graph, path)
    return model, graph, path


def test_export_is_valid_onnx_with_few_op_types(tiny_export):
    model, graph, path = tiny_export
    onnx.checker.check_model(str(path))
    hist = op_histogram(graph)
    assert set(hist) <= set(OPS) and len(hist) <= 8
    assert hist["PagedAttention"] == len(model.layers)
    m, meta = load_graph(path)
    assert m.producer_name == "perfxlm" and meta["perfxlm.format_version"] == str(FORMAT_VERSION)
    assert {o.domain: o.version for o in m.opset_import}[""] >= 21
    assert (path.parent / "tiny.onnx.data").is_file()  # weights as external data


def test_verify_passes_and_catches_a_wrong_graph(tiny_export, smol_tokenizer):
    model, graph, _ = tiny_export
    ids = smol_tokenizer.encode("The capital of France is Paris, and of Italy")
    result = verify_graph(graph, model, ids)
    assert result.ok and result.prefill_max_abs_diff < 1e-4 and result.decode_max_abs_diff < 1e-4
    broken = onnx.ModelProto.FromString(graph.SerializeToString())
    for node in broken.graph.node:  # a wrong attention scale is a plausible exporter bug
        if node.op_type == "PagedAttention":
            next(a for a in node.attribute if a.name == "scale").f *= 2
    assert not verify_graph(broken, model, ids).ok


@pytest.mark.parametrize("which", ["gguf", "hf_dir"])
def test_cli_export_verify_on_smollm2(which, gguf_path, smol_hf_dir, tmp_path, capsys):
    model = str(gguf_path if which == "gguf" else smol_hf_dir)
    out = tmp_path / "smol.onnx"
    assert main(["export", model, "-o", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "PagedAttention   30" in text and "PASS" in text
    onnx.checker.check_model(str(out))


def test_unknown_op_and_format_version_are_refused(tiny_export, tmp_path):
    _, graph, _ = tiny_export
    bad = onnx.ModelProto.FromString(graph.SerializeToString())
    bad.graph.node[1].op_type = "FancyNorm"
    onnx.save_model(bad, str(tmp_path / "op.onnx"))
    with pytest.raises(ValueError, match=r"ops outside the perfxlm op set: FancyNorm \(node "):
        load_graph(tmp_path / "op.onnx")
    old = onnx.ModelProto.FromString(graph.SerializeToString())
    next(p for p in old.metadata_props if p.key == "perfxlm.format_version").value = "99"
    onnx.save_model(old, str(tmp_path / "ver.onnx"))
    with pytest.raises(ValueError, match="format version 99; this perfxlm reads version 1"):
        load_graph(tmp_path / "ver.onnx")


def test_graph_and_eager_executors_agree(tiny_llama_dir, monkeypatch):
    prompts = ["graph or eager", "the same tokens either way, over a longer prompt too"]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    graph = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20).generate(prompts, p,
                                                                                               use_tqdm=False)
    monkeypatch.setenv("PERFXLM_EXECUTOR", "eager")
    eager = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20).generate(prompts, p,
                                                                                               use_tqdm=False)
    for a, b in zip(graph, eager):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-5)


def test_graph_is_cached_per_model_and_dtype(tiny_llama_dir, tmp_path, monkeypatch):
    root = str(tmp_path)  # a cache of its own: other tests may have exported these graphs already
    monkeypatch.setenv("PERFXLM_GRAPH_CACHE", root)
    LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20)
    before = set(os.listdir(root))
    LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert set(os.listdir(root)) == before  # reused, not exported again
    LLM(str(tiny_llama_dir), dtype="bfloat16", kv_cache_memory_bytes=8 << 20)
    new = set(os.listdir(root)) - before
    assert len(new) == 1 and "bfloat16" in new.pop()
    assert np.all([(d.endswith(f"-v{FORMAT_VERSION}-" + d.split("-")[-1])) for d in os.listdir(root)])


def test_export_verify_without_onnxruntime_names_the_extra_before_exporting(tiny_llama_dir, tmp_path, monkeypatch):
    import importlib.util

    from perfxlm.models.loader import ModelSource
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    monkeypatch.setattr(ModelSource, "load_weights", lambda *a: pytest.fail("exported before checking onnxruntime"))
    with pytest.raises(SystemExit, match=r"--verify needs onnxruntime: pip install 'perfxlm\[verify\]'"):
        main(["export", str(tiny_llama_dir), "-o", str(tmp_path / "g.onnx"), "--verify"])
