"""Plugin discovery through entry points, selection, per-op fallback, `perfxlm plugins`."""

import shutil
from pathlib import Path

import pytest

from hw_plugins.base import available_plugins, discover_plugins, select_plugin
from perfxlm import LLM, SamplingParams
from tests.conftest import assert_no_leaks


@pytest.fixture()
def oot_plugin(tmp_path, monkeypatch):
    """Install the demo plugin the way a wheel would: a module plus a dist-info with entry points."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(__file__).parent / "oot_plugin" / "numpy_demo_plugin.py", site)
    info = site / "perfxlm_numpy_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: perfxlm-numpy-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[perfxlm.hw_plugins]\nnumpy_demo = numpy_demo_plugin:NumpyDemoPlugin\n"
        "broken_demo = numpy_demo_plugin:BrokenPlugin\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def _native_available() -> bool:
    return dict((n, ok) for n, ok, _ in available_plugins()).get("cpu", False)


def test_builtin_plugins_are_discovered():
    assert {"torch", "cpu", "rvv"} <= set(discover_plugins())
    # the native kernels win the default choice wherever they are built; torch is the fallback
    assert select_plugin().name == ("cpu" if _native_available() else "torch")


def test_out_of_tree_plugin_is_discovered(oot_plugin):
    plugins = discover_plugins()
    assert {"torch", "numpy_demo", "broken_demo"} <= set(plugins)
    rows = {name: (ok, why) for name, ok, why in available_plugins()}
    assert rows["numpy_demo"] == (True, None)
    assert rows["broken_demo"] == (False, "no demo accelerator found (/dev/demo0 missing)")
    assert select_plugin().name == ("cpu" if _native_available() else "torch")  # the demo's priority is lower


def test_selection_errors(oot_plugin, monkeypatch):
    with pytest.raises(ValueError, match="Unknown hw_plugin 'nope'"):
        select_plugin("nope")
    with pytest.raises(RuntimeError, match="not available here: no demo accelerator"):
        select_plugin("broken_demo")
    monkeypatch.setenv("PERFXLM_PLUGIN", "numpy_demo")
    assert select_plugin().name == "numpy_demo"


def test_unsupported_ops_fall_back_to_the_reference(oot_plugin, tiny_llama_dir, tiny_llm):
    llm = LLM(str(tiny_llama_dir), dtype="float32", hw_plugin="numpy_demo", kv_cache_memory_bytes=8 << 20)
    nodes = llm.llm_engine.runner.executor.runner.nodes
    by_plugin = {(n.op_type, n.plugin.name) for n in nodes}
    assert ("Add", "numpy_demo") in by_plugin and ("SiluMul", "numpy_demo") in by_plugin
    assert ("Linear", "torch") in by_plugin and ("PagedAttention", "torch") in by_plugin
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = ["mixed plugins", "still the same tokens"]
    mixed = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    ref = [list(o.outputs[0].token_ids) for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    assert mixed == ref
    assert_no_leaks(llm)


def test_perfxlm_plugins_command(oot_plugin, capsys):
    from perfxlm.cli import main
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "numpy_demo" in out and "no demo accelerator found" in out


@pytest.mark.skipif(not _native_available(), reason="the native cpu kernels are not built here")
def test_cpu_compiled_step_equals_node_by_node(tiny_llama_dir, monkeypatch):
    """The cpu plugin's one-call-per-step plan runs the same kernels in the same order as the
    node-by-node walk: logprobs are bitwise equal, with chunked prefill and batching."""
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)

    def run() -> list:
        llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=8)
        runner = llm.llm_engine.runner.executor.runner
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert_no_leaks(llm)
        return runner.fast is not None, [[(t, {k: v.logprob for k, v in lp.items()})
                                          for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                         for o in outs]

    planned, a = run()
    monkeypatch.setenv("PERFXLM_NODE_BY_NODE", "1")
    walked, b = run()
    assert planned and not walked
    assert a == b


def test_cpu_host_memory_is_zeroed_writable_and_cache_line_aligned():
    import numpy as np
    from hw_plugins.cpu.plugin import host_zeros
    # small: inside a numpy buffer; 16 MiB: a private mapping, with and without huge pages
    for shape, huge in [((3, 5), True), ((1000, 3), True), ((4, 1024, 1024), True), ((4, 1024, 1024), False)]:
        a = host_zeros(shape, np.float32, huge_pages=huge)
        assert a.shape == shape and a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0  # numpy's own buffers start 16 bytes into a line
        assert not a.any()
        a.reshape(-1)[-1] = 7
        assert a.sum() == 7 and a.reshape(-1)[-1] == 7
