#!/usr/bin/env bash
# How much work a token takes on RISC-V, where no silicon can be timed: the instructions qemu
# retires per decoded token and per prefill token on SmolLM2-135M's Linears, for our RVV kernels,
# our portable C kernels (as built for rv64gcv: clang may auto-vectorise them) and Debian trixie's
# riscv64 OpenBLAS (cblas_sgemv / cblas_sgemm on fp32 weights), at each VLEN. The RISC-V section
# of docs/performance.md quotes its table.
#   benchmarks/rvv_instruction_counts.sh        (or: make -C csrc count-rvv)
#   VLENS="128 256 512" JOBS=1 benchmarks/rvv_instruction_counts.sh
# Needs clang-16, libc6-dev-riscv64-cross, qemu-user (the dynamic qemu-riscv64: the static one
# cannot load plugins) and apt access to Debian's qemu source (for qemu-plugin.h) and trixie's
# riscv64 packages (make -C csrc rv64-sysroot). A few minutes on 2 cores.
#
# The counting: csrc/riscv/qemu_plugin/insn_count.c counts every retired instruction (and the
# RVV ones) between marker HINTs that csrc/riscv/count/count_driver.c puts around each Linear,
# exact to the instruction; one layer's Linears count for 30 (instruction counts do not depend
# on weight values). Decode: T = 1, the 30 layers' Linears and the lm_head. Prefill: a 64-token
# chunk's Linears, plus the lm_head on its last token only (as vLLM computes logits), over 64.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CSRC=$ROOT/csrc
QEMU=${QEMU:-qemu-riscv64}
VLENS=${VLENS:-128 256}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 1)}
SYSROOT=$CSRC/build/rv64-sysroot
COUNT=$CSRC/build/rv64/count
OPENBLAS=/usr/lib/riscv64-linux-gnu/openblas-pthread/libopenblas.so.0 # (a path in the sysroot)

for tool in clang-16 "$QEMU" python3 make; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install clang-16 qemu-user ...)" >&2; exit 2; }
done
"$QEMU" -h | grep -q -- '-plugin' || { echo "$QEMU cannot load plugins: use Debian's qemu-user" >&2; exit 2; }

echo "== building the plugin, the riscv64 driver and the sysroot (cached after the first run)"
make -s -C "$CSRC" count-tools rv64-sysroot
[ -x "$SYSROOT/usr/bin/python3.13" ] || { echo "no riscv64 sysroot at $SYSROOT" >&2; exit 2; }

RUNS=$COUNT/runs
rm -rf "$RUNS" && mkdir -p "$RUNS"
# one qemu process a job: NAME VLEN SET [OPENBLAS_CORETYPE]
jobs=()
for v in $VLENS; do
    jobs+=("rvv-$v $v rvv" "generic-$v $v generic" "openblas-$v $v openblas")
    # OpenBLAS picks its core from VLEN; its VLEN-agnostic ZVL128B kernels, forced, for comparison
    [ "$v" -gt 128 ] && jobs+=("openblas128b-$v $v openblas RISCV64_ZVL128B")
done
echo "== ${#jobs[@]} runs under $QEMU, $JOBS at a time"

run_one() { # NAME VLEN SET [CORETYPE]
    local name=$1 vlen=$2 set=$3 start=$SECONDS
    env OPENBLAS_NUM_THREADS=1 ${4:+OPENBLAS_CORETYPE=$4} \
        "$QEMU" -L "$SYSROOT" -cpu "rv64,v=true,vext_spec=v1.0,vlen=$vlen,elen=64" \
        -plugin "$COUNT/libinsn_count.so,outfile=$RUNS/$name.counts" \
        "$COUNT/count_driver" "$set" -l "$OPENBLAS" > "$RUNS/$name.regions" 2> "$RUNS/$name.log" ||
        { echo "   $name FAILED:" >&2; cat "$RUNS/$name.log" >&2; exit 255; } # (255: xargs stops)
    echo "   $name done in $((SECONDS - start)) s"
}
export -f run_one
export QEMU SYSROOT COUNT RUNS OPENBLAS
printf '%s\n' "${jobs[@]}" | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _

python3 - "$RUNS" $VLENS <<'PY'
import pathlib
import sys

runs, vlens = pathlib.Path(sys.argv[1]), [int(v) for v in sys.argv[2:]]
PREFILL_T = 64


def load(name):
    """{(phase, fmt, op): (insns, RVV insns, T, per_step)} of a run, and its OpenBLAS core (None: ours)"""
    regions = (runs / f"{name}.regions").read_text().splitlines()
    counts = [l.split() for l in (runs / f"{name}.counts").read_text().splitlines() if l.startswith("region ")]
    described = [l.split() for l in regions if l.startswith("region ")]
    if len(counts) != len(described):
        sys.exit(f"{name}: {len(described)} regions described but {len(counts)} counted")
    out = {}
    for d, c in zip(described, counts):
        f = dict(zip(d[2::2], d[3::2]))
        out[(f["phase"], f["fmt"], f["op"])] = (int(c[3]), int(c[5]), int(f["T"]), int(f["per_step"]))
    # "openblas core <name> config OpenBLAS <version> ...": "<name>, OpenBLAS <version>"
    core = next((f"{l.split()[2]}, OpenBLAS {l.split()[5]}" for l in regions if l.startswith("openblas core")), None)
    return out, core


def per_token(r, fmt, phase):
    """(instructions, RVV instructions) per token of the phase, Linears only; None if not run"""
    if ("decode", fmt, "lm_head") not in r:
        return None
    tot = vec = 0
    for (ph, f, op), (n, v, _, m) in r.items():
        if f == fmt and ph == phase and op != "attention":
            tot, vec = tot + n * m, vec + v * m
    if phase == "prefill":  # the chunk's logits: the lm_head on its last token
        n, v, _, _ = r[("decode", fmt, "lm_head")]
        tot, vec = (tot + n) / PREFILL_T, (vec + v) / PREFILL_T
    return tot, vec


def mega(x):
    return f"{x[0] / 1e6:9.1f}M" if x else f"{'-':>10}"


def ratio(a, b):
    return f"{a[0] / b[0]:7.2f}x" if a and b else f"{'-':>8}"


print("\n== instructions per token, SmolLM2-135M Linears (30 layers + lm_head; prefill: a 64-token chunk)")
print(f"{'VLEN':>4} {'weights':7} {'phase':7} {'rvv':>10} {'generic':>10} {'openblas':>10}"
      f" {'generic/rvv':>11} {'openblas/rvv':>12}   RVV share: rvv generic openblas")
cores, attention = {}, []
for v in vlens:
    r = {s: load(f"{s}-{v}") for s in ("rvv", "generic", "openblas")}
    cores[v] = r["openblas"][1]
    for fmt in ("f32", "bf16", "q8_0", "q4_1"):
        for phase in ("decode", "prefill"):
            c = {s: per_token(r[s][0], fmt, phase) for s in r}
            share = "  ".join(f"{x[1] / x[0]:5.0%}" if x else f"{'-':>5}" for x in c.values())
            print(f"{v:>4} {fmt:7} {phase:7} {mega(c['rvv'])} {mega(c['generic'])} {mega(c['openblas'])}"
                  f" {ratio(c['generic'], c['rvv']):>11} {ratio(c['openblas'], c['rvv']):>12}   {share}")
    for phase, what in (("decode", "decode, 512-token context"), ("prefill", "prefill, 64-token prompt")):
        n = {s: r[s][0][(phase, "f32", "attention")] for s in ("rvv", "generic")}
        per = {s: x[0] * x[3] / (1 if phase == "decode" else PREFILL_T) for s, x in n.items()}
        attention.append(f"  VLEN {v} {what}: rvv {per['rvv'] / 1e6:.2f}M, generic {per['generic'] / 1e6:.2f}M"
                         f" per token, {n['rvv'][1] / n['rvv'][0]:.0%} RVV")
print("(M: millions of retired instructions; x: that column over rvv, below 1 is less work than rvv)")
print("\nOpenBLAS: Debian trixie's libopenblas0-pthread (DYNAMIC_ARCH), 1 thread; the core it picked by itself:")
print("\n".join(f"  VLEN {v}: {c}" for v, c in cores.items()))
for v in vlens:
    if (runs / f"openblas128b-{v}.regions").exists():
        r, core = load(f"openblas128b-{v}")
        d, p = per_token(r, "f32", "decode"), per_token(r, "f32", "prefill")
        print(f"  VLEN {v} with OPENBLAS_CORETYPE=RISCV64_ZVL128B ({core}): decode {mega(d).strip()},"
              f" prefill {mega(p).strip()} per token")
print("Attention (portable C, the same code under both of our kernel sets; fp32 KV cache):")
print("\n".join(attention))
PY
