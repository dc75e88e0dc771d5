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

# The library's binary interface as this Python side uses it: csrc/include/pxl_abi.h is the one
# C definition of every code, flag and layout below, and check_abi() compares the two at load.
ABI_VERSION = 6  # PXL_ABI_VERSION

# weight / element formats, in the order of pxl_abi.h's enum (PXL_F32 = 0 ..)
FORMATS = ("F32", "BF16", "Q8_0", "Q4_0", "Q4_1", "BF16P", "F32P", "Q8_0R", "Q4_0R", "Q4_1R", "Q4_K", "Q5_K", "Q6_K",
           "Q4_KR", "Q6_KR", "F16", "Q5_KR")
(F32, BF16, Q8_0, Q4_0, Q4_1, BF16P, F32P, Q8_0R, Q4_0R, Q4_1R, Q4_K, Q5_K, Q6_K, Q4_KR, Q6_KR, F16,
 Q5_KR) = range(len(FORMATS))
# the kernel set's own layout of each weight format, where pxl_packed_bytes says it has one:
# dense weights in panels, GGUF blocks repacked 16 rows at a time (pxl_pack_weights)
PACKED = {F32: F32P, BF16: BF16P, Q8_0: Q8_0R, Q4_0: Q4_0R, Q4_1: Q4_1R, Q4_K: Q4_KR, Q5_K: Q5_KR, Q6_K: Q6_KR}
ACTIVATIONS = {"float32": F32, "bfloat16": BF16}  # numpy dtype name -> the format code of an activation
CACHES = {**ACTIVATIONS, "float16": F16}  # ... of a KV cache (f16: kv_cache_dtype="float16")
# PERFXLM_QUANT_ACTIVATIONS (and "auto" resolved for a narrow model) -> pxl_set_quant_x's PXL_QX_*
QUANT_X = {"auto": 0, "int8": 1, "bf16": 2, "int16": 3, "int16-decode": 4}
# flags or'd into a float32 record's dt: a Linear on packed bf16 weights reads x as bf16 rows (XR),
# the op before stores its y so (YR); such rows are ldxr(width) elements apart
XR, YR = 256, 512


def ldxr(width: int) -> int:
    """PXL_LDXR: the elements between two bf16 rows of `width` values that a Linear reads (an odd
    number of cache lines)."""
    return ((width * 2 + 63) // 64 | 1) * 32


# A compiled step's records (pxl_plan_run): the op codes in pxl_abi.h's order (PXL_OP_*), the
# names op_profile reports them by; "Linear+SiluMul", "Add+RMSNorm" and "Linear parts" (two or
# three Linears of one input, q / k / v) are fused ops
PLAN_OPS = ("Gather", "RMSNorm", "Linear", "RoPE", "PagedAttention", "SiluMul", "Add",
            "Linear+SiluMul", "Add+RMSNorm", "LayerNorm", "GeluMul", "Activation", "Scale", "Softcap", "MoE",
            "LoRA", "Linear parts")
(GATHER, RMSNORM, LINEAR, ROPE, ATTENTION, SILU_MUL, ADD, LINEAR_SILU, ADD_RMSNORM, LAYER_NORM, GELU_MUL, ACTIVATION,
 SCALE, SOFTCAP, MOE, LORA, LINEAR_PARTS) = range(len(PLAN_OPS))
# Activation's kinds in the order of pxl_abi.h's PXL_ACT_* (graph_export.ops.ACTIVATION_KINDS)
ACT_KINDS = ("relu", "gelu", "gelu_tanh")


def activation_code(attrs: dict) -> int:
    """An Activation node's kind attribute -> its C code (PXL_ACT_*)."""
    kind = attrs["kind"]
    if kind not in ACT_KINDS:
        raise ValueError(f"Activation kind {kind!r} is not one of {ACT_KINDS}")
    return ACT_KINDS.index(kind)


# PlanNode.rows bits
ROWS_N = 1  # the op runs on the step's N (logits) rows, else on its T tokens
NO_WAIT = 2  # no barrier after this Linear in a decode step: the next shares only its input
OUT_F32 = 4  # a Linear stores its (bf16) values widened to float32
NONCAUSAL = 8  # an attention's tokens see all their sequence's keys (PagedAttention causal 0)
PLAN_MAX_PTRS = 10
PANEL = 32  # PXL_PANEL: features per packed panel, the unit a Linear's threads split


class PlanNode(ctypes.Structure):
    """pxl_plan_node: one record of a compiled step."""
    _fields_ = [("op", ctypes.c_int32), ("dt", ctypes.c_int32), ("wfmt", ctypes.c_int32), ("rows", ctypes.c_int32),
                ("a", ctypes.c_int64), ("b", ctypes.c_int64), ("c", ctypes.c_int64), ("d", ctypes.c_int64),
                ("e", ctypes.c_int64), ("f0", ctypes.c_float), ("f1", ctypes.c_float),
                ("p", ctypes.c_void_p * PLAN_MAX_PTRS)]


class AbiInfo(ctypes.Structure):
    """pxl_abi_info: what a build of the library was compiled for (pxl_abi fills it)."""
    _fields_ = [(name, ctypes.c_int64) for name in
                ("version", "node_size", "node_rows", "node_a", "node_f0", "node_p", "node_ptrs", "n_ops",
                 "n_formats")]


def expected_abi() -> dict[str, int]:
    """AbiInfo's fields as this Python side lays things out."""
    return {"version": ABI_VERSION, "node_size": ctypes.sizeof(PlanNode), "node_rows": PlanNode.rows.offset,
            "node_a": PlanNode.a.offset, "node_f0": PlanNode.f0.offset, "node_p": PlanNode.p.offset,
            "node_ptrs": PLAN_MAX_PTRS, "n_ops": len(PLAN_OPS), "n_formats": len(FORMATS)}


_ABI_LABELS = {"version": "ABI version", "node_size": "plan node bytes", "node_rows": "offset of rows",
               "node_a": "offset of a", "node_f0": "offset of f0", "node_p": "offset of p",
               "node_ptrs": "pointers per plan node", "n_ops": "plan ops", "n_formats": "formats"}
_REBUILD = "rebuild it with `pip install -e .` or `make -C csrc`"


def _abi_summary(v: dict[str, int]) -> str:
    return f"ABI {v['version']} (plan node {v['node_size']} bytes, {v['n_ops']} plan ops, {v['n_formats']} formats)"


def check_abi(lib: ctypes.CDLL, path: str | Path) -> None:
    """Raises OSError unless the library at `path` was built for the ABI this module expects."""
    try:
        fn = lib.pxl_abi
    except AttributeError:
        raise OSError(f"{LIB_NAME} at {path} has no pxl_abi(): it predates the ABI check "
                      f"(this perfxlm expects {_abi_summary(expected_abi())}); {_REBUILD}") from None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t], None
    info = AbiInfo()
    fn(ctypes.byref(info), ctypes.sizeof(info))
    got, want = {name: getattr(info, name) for name, _ in AbiInfo._fields_}, expected_abi()
    diff = [f"{_ABI_LABELS[k]} {got[k]} (expected {want[k]})" for k in want if got[k] != want[k]]
    if diff:
        raise OSError(f"{LIB_NAME} at {path} was built for {_abi_summary(got)} but this perfxlm expects "
                      f"{_abi_summary(want)}: {'; '.join(diff)}; {_REBUILD}")


_sz, _p, _i, _f = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "pxl_abi": ([_p, _sz], None),
    "pxl_isa": ([], ctypes.c_char_p),
    "pxl_set_isa": ([ctypes.c_char_p], _i),
    "pxl_num_threads": ([], _i),
    "pxl_set_num_threads": ([_i], None),
    "pxl_bind_threads": ([_p, _i], _i),
    "pxl_commit": ([_p, _sz], None),
    "pxl_set_batch_invariant": ([_i], None),
    "pxl_batch_invariant": ([], _i),
    "pxl_set_quant_x": ([_i], _i),
    "pxl_quant_x": ([], _i),
    "pxl_linear": ([_i, _i, _sz, _sz, _sz, _p, _p, _p, _p], None),
    "pxl_linear_to": ([_i, _i, _i, _sz, _sz, _sz, _p, _p, _p, _p], None),
    "pxl_packed_bytes": ([_i, _sz, _sz], _sz),
    "pxl_pack_weights": ([_i, _sz, _sz, _p, _p], None),
    "pxl_pack_gated": ([_i, _sz, _sz, _p, _p, _p], None),
    "pxl_linear_silu": ([_i, _i, _sz, _sz, _sz, _p, _p, _p], None),
    "pxl_linear_parts": ([_i, _i, _sz, _sz, _i, _p, _p, _p, _p, _p], None),
    "pxl_gather": ([_i, _sz, _sz, _p, _p, _p], None),
    "pxl_rmsnorm": ([_i, _sz, _sz, _p, _p, _f, _p], None),
    "pxl_rope": ([_i, _sz, _sz, _sz, _p, _p, _p, _p, _p], None),
    "pxl_silu_mul": ([_i, _sz, _p, _p, _p], None),
    "pxl_add": ([_i, _sz, _p, _p, _p], None),
    "pxl_add_rmsnorm": ([_i, _sz, _sz, _p, _p, _p, _f, _p, _p], None),
    "pxl_plan_run": ([_p, _sz, _sz, _sz, _sz, _sz], None),
    "pxl_plan_profile": ([_i, _p, _p], None),
    "pxl_paged_attention": ([_i, _i, _sz, _sz, _sz, _sz, _sz, _p, _p, _p, _p, _p, _sz, _p, _p, _sz, _p, _p, _f, _f,
                             _sz, _p], None),
    "pxl_paged_attention_mask": ([_i, _i, _sz, _sz, _sz, _sz, _sz, _p, _p, _p, _p, _p, _sz, _p, _p, _sz, _p, _p, _f,
                                  _f, _sz, _i, _p], None),
    "pxl_layer_norm": ([_i, _sz, _sz, _p, _p, _p, _f, _p], None),
    "pxl_gelu_mul": ([_i, _sz, _p, _p, _p], None),
    "pxl_activation": ([_i, _i, _sz, _p, _p], None),
    "pxl_scale": ([_i, _sz, _p, _f, _p], None),
    "pxl_softcap": ([_i, _sz, _p, _f, _p], None),
    "pxl_moe": ([_i, _i, _i, _i, _sz, _sz, _sz, _sz, _sz, _i, _p, _p, _p, _p, _p, _p, _p, _p], None),
    "pxl_lora": ([_i, _sz, _sz, _sz, _sz, _sz, _p, _p, _p, _p, _p, _p, _p], None),
    "pxl_sample_rows": ([_sz, _sz, _p, _sz, _p, _p], None),
    "pxl_roofline_peak": ([_i, _sz], ctypes.c_double),
    "pxl_roofline_read": ([_p, _sz], ctypes.c_uint64),
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
            try:
                lib = load_at(path)
            except OSError as e:
                _cache["lib"] = str(e)
                raise
            _cache["lib"] = lib
            return lib
        tried.append(str(path))
    _cache["lib"] = msg = (f"{LIB_NAME} not found (looked in {', '.join(tried)}); "
                           "`pip install -e .` or `make -C csrc` builds it")
    raise OSError(msg)


def load_at(path: str | Path) -> ctypes.CDLL:
    """The library at `path`, checked, bound and given its threads; another copy than load()'s
    loads beside it (the benchmarks' --baseline-lib). OSError if it is not one this perfxlm runs."""
    path = Path(path)
    lib = ctypes.CDLL(str(path))
    check_abi(lib, path)
    _bind(lib, path)
    lib.pxl_set_num_threads(num_threads())
    cpus = thread_cpus()
    pinned = ""
    if cpus is not None:
        unpinned = lib.pxl_bind_threads((ctypes.c_int * len(cpus))(*cpus), len(cpus))
        pinned = f" pinned to CPUs {cpus}" if unpinned == 0 else f" (pinning to CPUs {cpus} failed)"
    logger.info("native kernels %s: %s, %d threads%s", path, lib.pxl_isa().decode(), lib.pxl_num_threads(), pinned)
    return lib


def _bind(lib: ctypes.CDLL, path: Path) -> None:
    """Sets every _SIGNATURES function's argument and result types; OSError if one is missing."""
    for name, (args, res) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise OSError(f"{LIB_NAME} at {path} has no {name}(); {_REBUILD}") from None
        fn.argtypes, fn.restype = args, res


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
