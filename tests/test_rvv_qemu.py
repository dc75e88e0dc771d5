"""The `rvv` plugin without torch: a riscv64 Python (Debian trixie packages, `make -C csrc
rv64-sysroot`) under qemu-user runs every op through the plugin interface on the RVV
kernels and compares with numpy (tests/rvv_plugin_check.py), at two VLENs; then LLM.generate
on the embedded SmolLM2's float32 deployable directory (tests/rvv_generate_check.py) gives the
x86 cpu plugin's greedy tokens, at VLEN 128 and 256, on one thread per host core."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSROOT = ROOT / "csrc" / "build" / "rv64-sysroot"
QEMU = shutil.which("qemu-riscv64-static")

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-user-static is not installed (apt-get install qemu-user-static)"),
    pytest.mark.skipif(shutil.which("clang-16") is None, reason="clang-16 (the RVV cross compiler) is not installed"),
    pytest.mark.skipif(not (SYSROOT / "usr/bin/python3.13").exists(),
                       reason="no riscv64 Python sysroot: run `make -C csrc rv64-sysroot`"),
]


def build_rv64_lib() -> Path:
    """The rvv build of the native library (make keeps it up to date)."""
    subprocess.run(["make", "-C", str(ROOT / "csrc"), "build/rv64/libperfxlm_kernels.so"], check=True,
                   capture_output=True)
    return ROOT / "csrc" / "build" / "rv64" / "libperfxlm_kernels.so"


@pytest.fixture(scope="module")
def rv64_lib() -> Path:
    return build_rv64_lib()


def start_rv64_python(rv64_lib: Path, vlen: int, *args: str) -> subprocess.Popen:
    """A riscv64 Python of the sysroot under qemu-user with RVV at `vlen`, the rvv library and
    this source tree (not pip-installed there) on its path. qemu-user emulates on one core, so
    the tests start both VLENs' runs at once and then wait for each."""
    cpu = f"rv64,v=true,vext_spec=v1.0,vlen={vlen},elen=64,rvv_ta_all_1s=true,rvv_ma_all_1s=true"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "PERFXLM_KERNELS_LIB": str(rv64_lib)}
    return subprocess.Popen([QEMU, "-L", str(SYSROOT), "-cpu", cpu, str(SYSROOT / "usr/bin/python3.13"), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def ops_runs(rv64_lib) -> dict[int, subprocess.Popen]:
    runs = {v: start_rv64_python(rv64_lib, v, str(ROOT / "tests" / "rvv_plugin_check.py")) for v in (128, 512)}
    yield runs
    for proc in runs.values():
        proc.kill()


@pytest.mark.parametrize("vlen", [128, 512])
def test_rvv_plugin_ops_match_numpy_under_qemu(ops_runs, vlen):
    rc, out, err = finish(ops_runs[vlen])
    out += err
    assert rc == 0, out
    assert "kernel set: rvv" in out and out.strip().endswith("19 passed, 0 failed"), out


PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 8  # qemu runs the 135M model at a few tokens a second: short generations


@pytest.fixture(scope="module")
def x86_greedy(smol_deploy_dir) -> list[list[int]]:
    """The x86 cpu plugin's greedy tokens on the same directory, with the same engine settings."""
    from perfxlm import LLM, SamplingParams
    llm = LLM(model=str(smol_deploy_dir), hw_plugin="cpu", kv_cache_memory_bytes=16 << 20, max_model_len=256,
              max_num_batched_tokens=64)
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out]


@pytest.fixture(scope="module")
def generate_runs(rv64_lib, smol_deploy_dir) -> dict[int, subprocess.Popen]:
    runs = {v: start_rv64_python(rv64_lib, v, str(ROOT / "tests" / "rvv_generate_check.py"), str(smol_deploy_dir),
                                 json.dumps(PROMPTS), str(MAX_TOKENS)) for v in (128, 256)}
    yield runs
    for proc in runs.values():
        proc.kill()


@pytest.mark.parametrize("vlen", [128, 256])
def test_generate_on_a_deployable_dir_under_qemu_matches_x86(generate_runs, x86_greedy, vlen):
    """fp32 weights on both sides: the RVV and AVX-512 kernels sum in different orders, so
    logits differ in the last bits, but the greedy tokens of these prompts are the same."""
    rc, out, err = finish(generate_runs[vlen])
    assert rc == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert ": rvv, " in err and "nodes on rvv," in err, err[-4000:]  # RVV kernels, every node
    # one thread per core: the library is built with the sysroot's libomp (qemu-user shows
    # the guest the host's CPUs)
    threads = len(os.sched_getaffinity(0))
    assert f": rvv, {threads} threads" in err, err[-4000:]
    assert result["imported"] == []  # the sysroot has no torch, transformers or tokenizers at all
    assert result["tokens"] == x86_greedy, result
