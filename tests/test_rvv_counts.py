"""The instruction counter behind benchmarks/rvv_instruction_counts.sh: our qemu TCG plugin
(csrc/riscv/qemu_plugin/insn_count.c) counts, exactly, the RISC-V instructions retired between
marker HINTs, RVV ones apart; and the driver's regions measure the Linears they name."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
COUNT = CSRC / "build" / "rv64" / "count"
CROSS_LIBC = Path("/usr/riscv64-linux-gnu")
QEMU = shutil.which("qemu-riscv64")

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-user (the dynamic qemu-riscv64, which loads plugins) is not "
                                            "installed: apt-get install qemu-user"),
    pytest.mark.skipif(shutil.which("clang-16") is None, reason="clang-16 (the RVV cross compiler) is not installed"),
    pytest.mark.skipif(not (CROSS_LIBC / "lib" / "ld-linux-riscv64-lp64d.so.1").exists(),
                       reason="no riscv64 cross libc: apt-get install libc6-dev-riscv64-cross"),
]

# the plugin's markers, as count_driver.c spells them
BEGIN, END = "slti zero, zero, 0x5b1", "slti zero, zero, 0x5b2"

# Three regions whose counts follow from the code: a 1000-trip loop (li, then addi + bnez per
# trip: 2001), nothing (0), and one vsetvli, a load, a store and an add of vectors after a scalar
# li (5, of which 4 RVV). Each marker sits inside a translation block, not at its edges.
HAND_COUNTED = rf"""
static float a[64];
int main(void) {{
    __asm__ volatile("{BEGIN}\n li t0, 1000\n 1: addi t0, t0, -1\n bnez t0, 1b\n {END}" ::: "t0", "memory");
    __asm__ volatile("{BEGIN}\n {END}" ::: "memory");
    __asm__ volatile("{BEGIN}\n li t1, 64\n vsetvli t2, t1, e32, m1, ta, ma\n vle32.v v1, (%0)\n"
                     " vse32.v v1, (%0)\n vfadd.vv v2, v1, v1\n {END}" :: "r"(a) : "t1", "t2", "memory");
    return 0;
}}
"""


def cpu(vlen: int) -> str:
    return f"rv64,v=true,vext_spec=v1.0,vlen={vlen},elen=64"


def run_counted(plugin: Path, out: Path, vlen: int, *argv: str) -> tuple[str, list[tuple[int, int]]]:
    """argv's stdout under qemu with the plugin, and each region's (instructions, RVV instructions)"""
    proc = subprocess.run([QEMU, "-L", str(CROSS_LIBC), "-cpu", cpu(vlen), "-plugin", f"{plugin},outfile={out}",
                           *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    regions = re.findall(r"^region \d+ insns (\d+) vector (\d+)$", out.read_text(), re.M)
    return proc.stdout, [(int(n), int(v)) for n, v in regions]


@pytest.fixture(scope="module")
def tools() -> tuple[Path, Path]:
    """the plugin and the riscv64 driver, built by csrc/riscv/count.mk"""
    header = subprocess.run(["make", "-s", "-C", str(CSRC), "build/qemu-plugin/qemu-plugin.h"], capture_output=True,
                            text=True, timeout=300)
    if header.returncode:
        pytest.skip(f"could not fetch qemu's plugin header from Debian's qemu source: {header.stderr[-300:]}")
    build = subprocess.run(["make", "-s", "-C", str(CSRC), "count-tools"], capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    return COUNT / "libinsn_count.so", COUNT / "count_driver"


def test_plugin_counts_hand_counted_regions_exactly(tools, tmp_path):
    plugin, _ = tools
    src, exe = tmp_path / "regions.c", tmp_path / "regions"
    src.write_text(HAND_COUNTED)
    subprocess.run(["clang-16", "--target=riscv64-linux-gnu", "-march=rv64gcv", "-mabi=lp64d", "-O2", "-static",
                    str(src), "-o", str(exe)], check=True, capture_output=True)
    _, regions = run_counted(plugin, tmp_path / "counts.txt", 128, str(exe))
    assert regions == [(2001, 0), (0, 0), (5, 4)]


def test_driver_regions_measure_the_linears(tools, tmp_path):
    """The lm_head (49152 rows) costs what the 576- and 192-row GEMVs of the same K predict (a
    fixed cost per call, plus a cost per row), and the RVV GEMV, strip-mined by vsetvl, needs
    fewer instructions at VLEN 256 than at 128."""
    plugin, driver = tools
    counts = {}
    for vlen in (128, 256):
        out, regions = run_counted(plugin, tmp_path / f"counts{vlen}.txt", vlen, str(driver), "rvv", "-f", "f32",
                                   "-p", "decode")
        assert "kernel set rvv" in out, out
        ops = re.findall(r"^region \d+ .* op (\S+) ", out, re.M)
        assert ops == ["q_o", "k_v", "gate_up", "down", "lm_head", "attention"]
        counts[vlen] = dict(zip(ops, regions))
        assert all(n > 0 and 0 < v < n for n, v in regions), regions
        # same K: a fixed cost per call plus a cost per row, from the 576- and 192-row GEMVs
        per_row = (counts[vlen]["q_o"][0] - counts[vlen]["k_v"][0]) / (576 - 192)
        fixed = counts[vlen]["q_o"][0] - 576 * per_row
        assert counts[vlen]["lm_head"][0] == pytest.approx(fixed + 49152 * per_row, rel=0.01)
    assert counts[256]["q_o"][0] < 0.75 * counts[128]["q_o"][0], counts
