"""Finds and binds csrc's kernel library (libperfxlm_kernels.so) with ctypes.

Looked up in this order: $PERFXLM_KERNELS_LIB, the copy `pip install` builds next to
this file, and csrc/build/host/ of a source checkout (`make -C csrc`).
"""

import ctypes
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

LIB_NAME = "libperfxlm_kernels.so"
_HERE = Path(__file__).resolve().parent
F32, BF16, Q8_0, Q4_0, Q4_1, BF16P, F32P, Q8_0R, Q4_0R, Q4_1R = range(10)
# the kernel set's own layout of each weight format, where pxl_packed_bytes says it has one:
# dense weights in panels, GGUF blocks repacked 16 rows at a time (pxl_pack_weights)
PACKED = {F32: F32P, BF16: BF16P, Q8_0: Q8_0R, Q4_0: Q4_0R, Q4_1: Q4_1R}

_sz, _p, _i, _f = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "pxl_isa": ([], ctypes.c_char_p),
    "pxl_set_isa": ([ctypes.c_char_p], _i),
    "pxl_num_threads": ([], _i),
    "pxl_set_num_threads": ([_i], None),
    "pxl_bind_threads": ([_p, _i], _i),
    "pxl_commit": ([_p, _sz], None),
    "pxl_set_batch_invariant": ([_i], None),
    "pxl_batch_invariant": ([], _i),
    "pxl_linear": ([_i, _i, _sz, _sz, _sz, _p, _p, _p, _p], None),
    "pxl_linear_to": ([_i, _i, _i, _sz, _sz, _sz, _p, _p, _p, _p], None),
    "pxl_packed_bytes": ([_i, _sz, _sz], _sz),
    "pxl_pack_weights": ([_i, _sz, _sz, _p, _p], None),
    "pxl_pack_gated": ([_i, _sz, _sz, _p, _p, _p], None),
    "pxl_linear_silu": ([_i, _i, _sz, _sz, _sz, _p, _p, _p], None),
    "pxl_gather": ([_i, _sz, _sz, _p, _p, _p], None),
    "pxl_rmsnorm": ([_i, _sz, _sz, _p, _p, _f, _p], None),
    "pxl_rope": ([_i, _sz, _sz, _sz, _p, _p, _p, _p, _p], None),
    "pxl_silu_mul": ([_i, _sz, _p, _p, _p], None),
    "pxl_add": ([_i, _sz, _p, _p, _p], None),
    "pxl_add_rmsnorm": ([_i, _sz, _sz, _p, _p, _p, _f, _p, _p], None),
    "pxl_plan_profile": ([_i, _p, _p], None),
    "pxl_paged_attention": ([_i, _sz, _sz, _sz, _sz, _sz, _p, _p, _p, _p, _p, _sz, _p, _p, _sz, _p, _p, _f, _sz, _p],
                            None),
    "pxl_sample_rows": ([_sz, _sz, _p, _sz, _p, _p], None),
}


def num_threads() -> int:
    """$PERFXLM_NUM_THREADS, else one per CPU the threads are bound to (thread_cpus), else one
    per CPU this process may run on."""
    value = os.environ.get("PERFXLM_NUM_THREADS")
    if not value:
        return len(thread_cpus() or os.sched_getaffinity(0))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"PERFXLM_NUM_THREADS must be a positive integer, got {value!r}")
    return int(value)


BIND_VARS = ("PERFXLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_OMP_THREADS_BIND")


def thread_cpus() -> list[int] | None:
    """The CPUs the kernel threads are pinned to, thread i to the i-th (None: not pinned), from
    $PERFXLM_CPU_OMP_THREADS_BIND or vLLM's $VLLM_CPU_OMP_THREADS_BIND: 'auto' (the default)
    takes one logical CPU per physical core of this process's CPU set, 'nobind' pins nothing,
    and a list such as '0-3,8' those CPUs in that order."""
    name = next((v for v in BIND_VARS if os.environ.get(v)), None)
    value = os.environ[name].strip() if name else "auto"
    allowed = sorted(os.sched_getaffinity(0))
    if value == "nobind":
        return None
    if value == "auto":
        return _one_per_core(allowed)
    if "|" in value:
        raise ValueError(f"{name}={value!r} gives one CPU list per tensor-parallel rank; perfxlm runs a single "
                         "rank: give one list, such as '0-3'")
    cpus: list[int] = []
    try:
        for part in value.split(","):
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"{name} must be 'auto', 'nobind' or a CPU list such as '0-3,8', got {value!r}") from None
    outside = [c for c in cpus if c not in allowed]
    if not cpus or outside or len(set(cpus)) != len(cpus):
        why = f"CPU {outside[0]} is not in this process's CPU set {allowed}" if outside else "a CPU is listed twice" \
            if cpus else "the list is empty"
        raise ValueError(f"{name}={value!r}: {why}")
    return cpus


def _one_per_core(cpus: list[int]) -> list[int]:
    """The first logical CPU of each physical core among cpus (SMT siblings share a core's
    FMA units: two GEMM threads on one core run no faster than one)."""
    seen, out = set(), []
    for c in cpus:
        try:
            core = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            core = str(c)
        if core not in seen:
            seen.add(core)
            out.append(c)
    return out


def candidates() -> list[Path]:
    paths = [Path(os.environ["PERFXLM_KERNELS_LIB"])] if os.environ.get("PERFXLM_KERNELS_LIB") else []
    return paths + [_HERE / LIB_NAME, _HERE.parent.parent / "csrc" / "build" / "host" / LIB_NAME]


_cache: dict[str, ctypes.CDLL | str] = {}


def load() -> ctypes.CDLL:
    """The bound library (loaded once per process); raises OSError saying where it looked."""
    if "lib" in _cache:
        lib = _cache["lib"]
        if isinstance(lib, str):
            raise OSError(lib)
        return lib
    tried = []
    for path in candidates():
        if path.is_file():
            lib = ctypes.CDLL(str(path))
            for name, (args, res) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, res
            lib.pxl_set_num_threads(num_threads())
            cpus = thread_cpus()
            pinned = ""
            if cpus is not None:
                unpinned = lib.pxl_bind_threads((ctypes.c_int * len(cpus))(*cpus), len(cpus))
                pinned = f" pinned to CPUs {cpus}" if unpinned == 0 else f" (pinning to CPUs {cpus} failed)"
            logger.info("native kernels %s: %s, %d threads%s", path, lib.pxl_isa().decode(), lib.pxl_num_threads(),
                        pinned)
            _cache["lib"] = lib
            return lib
        tried.append(str(path))
    _cache["lib"] = msg = (f"{LIB_NAME} not found (looked in {', '.join(tried)}); "
                           "`pip install -e .` or `make -C csrc` builds it")
    raise OSError(msg)


PLAN_OPS = ("Gather", "RMSNorm", "Linear", "RoPE", "PagedAttention", "SiluMul", "Add",
            "Linear+SiluMul", "Add+RMSNorm")  # pxl_plan.c's order; the last two: fused pairs of ops


PROFILE_PHASES = ("prefill", "decode")  # steps with prompt tokens; steps of one query token a sequence


def op_profile(on: bool) -> dict[str, dict[str, tuple[float, int]]]:
    """Per phase (PROFILE_PHASES), seconds and calls per op kind in compiled steps since the
    last call (then reset); `on` switches the timing (a barrier-to-barrier clock read on
    thread 0) for what follows."""
    lib = load()
    n = len(PLAN_OPS)
    seconds, calls = (ctypes.c_double * (2 * n))(), (ctypes.c_int64 * (2 * n))()
    lib.pxl_plan_profile(int(on), seconds, calls)
    return {phase: {op: (seconds[k * n + i], calls[k * n + i]) for i, op in enumerate(PLAN_OPS) if calls[k * n + i]}
            for k, phase in enumerate(PROFILE_PHASES)}
