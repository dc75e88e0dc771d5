"""The `rvv` plugin without torch: a riscv64 Python (Debian trixie packages, `make -C csrc
rv64-sysroot`) under qemu-user runs every op through the plugin interface on the RVV
kernels and compares with numpy (tests/rvv_plugin_check.py), at two VLENs."""

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


@pytest.fixture(scope="module")
def rv64_lib() -> Path:
    subprocess.run(["make", "-C", str(ROOT / "csrc"), "build/rv64/libperfxlm_kernels.so"], check=True,
                   capture_output=True)
    return ROOT / "csrc" / "build" / "rv64" / "libperfxlm_kernels.so"


@pytest.mark.parametrize("vlen", [128, 512])
def test_rvv_plugin_ops_match_numpy_under_qemu(rv64_lib, vlen):
    cpu = f"rv64,v=true,vext_spec=v1.0,vlen={vlen},elen=64,rvv_ta_all_1s=true,rvv_ma_all_1s=true"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "PERFXLM_KERNELS_LIB": str(rv64_lib)}
    proc = subprocess.run([QEMU, "-L", str(SYSROOT), "-cpu", cpu, str(SYSROOT / "usr/bin/python3.13"),
                           str(ROOT / "tests" / "rvv_plugin_check.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "kernel set: rvv" in out and out.strip().endswith("18 passed, 0 failed"), out
