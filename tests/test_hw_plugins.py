"""Plugin discovery through entry points, selection, per-op fallback, `perfxlm plugins`."""

import logging
import shutil
import sys
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
        "broken_demo = numpy_demo_plugin:BrokenPlugin\nold_demo = numpy_demo_plugin:OldApiPlugin\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def _native_available() -> bool:
    return dict((n, ok) for n, ok, _ in available_plugins()).get("cpu", False)


def test_builtin_plugins_are_discovered():
    assert {"torch", "cpu", "rvv"} <= set(discover_plugins())
    # the native kernels win the default choice wherever they are built; torch is the fallback
    assert select_plugin().name == ("cpu" if _native_available() else "torch")


def test_out_of_tree_plugin_is_discovered(oot_plugin, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("hw_plugins"), "propagate", True)  # perfxlm logs to its own handler
    plugins = discover_plugins()
    assert {"torch", "numpy_demo", "broken_demo"} <= set(plugins)
    assert "old_demo" not in plugins  # written for plugin API 0
    assert "implements plugin API 0; this perfxlm needs 1: skipped" in caplog.text
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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_compiled_step_equals_node_by_node(tiny_llama_dir, monkeypatch, dtype):
    """The cpu plugin's one-call-per-step plan runs the same kernels in the same order as the
    node-by-node walk: logprobs are bitwise equal, with chunked prefill and batching. The plan
    also fuses: gate, up and SiluMul in one pass (where the kernel set packs the weights), q, k
    and v in one pass over their stacked weights, a residual Add with the RMSNorm after it, and
    in bfloat16 the lm_head stores float32 logits itself (the walk converts them after), and
    q/k/v, o, gate/up and down read x as the bf16 rows the op before stored (XR / YR)."""
    from hw_plugins.cpu import library
    from hw_plugins.cpu.library import ADD_RMSNORM, LINEAR_PARTS, LINEAR_SILU, XR, YR
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 9)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)

    def run() -> list:
        llm = LLM(str(tiny_llama_dir), dtype=dtype, kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=8)
        runner = llm.llm_engine.runner.executor.runner
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert_no_leaks(llm)
        ops = [r.op for r in runner.compiled.records] if runner.compiled is not None else []
        assert runner.compiled is None or ops.count(ADD_RMSNORM) == len(runner.spec.caches) - 1  # 2 a layer, less 1
        assert runner.compiled is None or ops.count(LINEAR_PARTS) == len(runner.spec.caches) // 2  # a layer's q, k, v
        fused = LINEAR_SILU in ops
        if runner.compiled is not None:  # bf16 rows: norms to q/k/v and gate/up, attention to o, gate/up to down
            reads, stores = (sum(bool(r.dt & flag) for r in runner.compiled.records) for flag in (XR, YR))
            assert reads == stores == (4 * len(runner.spec.caches) // 2 if fused and dtype == "bfloat16" else 0)
        return runner.compiled is not None, fused, [[(t, {k: v.logprob for k, v in lp.items()})
                                                 for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                                for o in outs]

    planned, fused, a = run()
    monkeypatch.setenv("PERFXLM_NODE_BY_NODE", "1")
    walked, _, b = run()
    assert planned and not walked
    assert fused == (library.load().pxl_packed_bytes(library.BF16 if dtype == "bfloat16" else library.F32, 128, 64) != 0)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and MADV_POPULATE_WRITE are Linux's")
def test_cpu_kv_caches_are_committed_up_front():
    import ctypes
    import mmap

    import numpy as np
    from hw_plugins.cpu.plugin import CpuPlugin, host_zeros
    plugin = CpuPlugin()
    if plugin.lib is None:
        pytest.skip(f"the native cpu kernels are not built here: {plugin._error}")
    libc = ctypes.CDLL(None, use_errno=True)

    def resident(a: np.ndarray) -> float:  # the fraction of a's pages in memory
        n = -(-a.nbytes // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(a.nbytes), vec) == 0
        return sum(v & 1 for v in vec) / n

    lazy = host_zeros((4, 1024, 1024), np.float32, huge_pages=False)
    assert resident(lazy) < 0.5  # committed on first touch
    cache = plugin.zeros((256, 16, 2, 64), np.float32)  # 2 MiB of KV cache
    assert resident(cache) == 1.0 and not cache.any()


_THREAD_SETS = """
import glob, json, os, threading
from hw_plugins.cpu import library
before = sorted(os.sched_getaffinity(0))
library.load()
def cpus(path):
    line = next(l for l in open(path) if l.startswith("Cpus_allowed_list"))
    out = []
    for part in line.split()[1].split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out
me = threading.get_native_id()
tasks = {int(p.split("/")[4]): cpus(p) for p in glob.glob("/proc/self/task/*/status")}
print(json.dumps({"before": before, "main": tasks.pop(me), "others": list(tasks.values())}))
"""


@pytest.mark.parametrize("bind", ["auto", "last", "nobind"])
def test_cpu_kernel_threads_are_pinned(bind):
    """The kernel library pins its worker threads one per CPU ('auto': one per core; a list:
    those CPUs; 'nobind': none) and leaves the application's own thread its CPU set."""
    import json
    import os
    import subprocess
    import sys
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("pinning is only visible with two or more CPUs in this process's set")
    env = dict(os.environ, PERFXLM_NUM_THREADS="2", PERFXLM_CPU_OMP_THREADS_BIND=
               {"auto": "auto", "last": f"{allowed[-1]}", "nobind": "nobind"}[bind])
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    got = json.loads(subprocess.run([sys.executable, "-c", _THREAD_SETS], env=env, capture_output=True, text=True,
                                    check=True, cwd=Path(__file__).resolve().parents[1]).stdout)
    assert got["main"] == got["before"] == allowed
    pinned = [s for s in got["others"] if len(s) == 1]
    if bind == "nobind":
        assert not pinned
    else:  # worker 1 on the list's second CPU ('auto': the second core), or round the list
        from hw_plugins.cpu.library import _one_per_core
        want = _one_per_core(allowed)[1] if bind == "auto" else allowed[-1]
        assert pinned == [[want]]


def test_cpu_step_gives_the_calling_thread_its_cpus_back(tiny_llm):
    """The calling thread is pinned only while a compiled step runs."""
    import os
    before = os.sched_getaffinity(0)
    tiny_llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert os.sched_getaffinity(0) == before
