"""The C ABI the Python side relies on: described once in csrc/include/pxl_abi.h, mirrored in
hw_plugins/cpu/library.py, and checked when the library loads (library.check_abi)."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hw_plugins.cpu import library
from hw_plugins.cpu.plugin import CpuPlugin

INCLUDE = Path(__file__).resolve().parent.parent / "csrc" / "include"


def _header_text() -> str:
    """Every csrc/include header, comments removed."""
    text = "\n".join(p.read_text() for p in sorted(INCLUDE.glob("*.h")))
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def _library_path() -> Path:
    """The library load() picks (the first candidate that exists); skips where none is built."""
    path = next((p for p in library.candidates() if p.is_file()), None)
    if path is None:
        pytest.skip(f"the native cpu kernels are not built here (no {library.LIB_NAME} in "
                    f"{', '.join(map(str, library.candidates()))})")
    return path


def _loaded() -> ctypes.CDLL:
    _library_path()
    return library.load()  # an ABI mismatch fails here, with check_abi's message


def test_exported_symbols_are_declared_in_headers():
    path = _library_path()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm here to list the library's symbols")
    out = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
    # global code and data (T text, D / B / R data, i an ifunc such as a target_clones entry);
    # names with a dot (.resolver, .avx2 ...) are the compiler's own
    exported = sorted({name for _, kind, name in (line.split() for line in out.splitlines() if len(line.split()) == 3)
                       if kind in "TDBRi" and "." not in name and not name.startswith("_")})
    assert "pxl_linear" in exported and "pxl_abi" in exported, out
    headers = _header_text()
    undeclared = [name for name in exported if not re.search(rf"\b{re.escape(name)}\b", headers)]
    assert not undeclared, f"exported by {path} but declared in no csrc/include/*.h: {undeclared}"


def test_abi_check_passes_on_the_built_library():
    lib = _loaded()
    library.check_abi(lib, _library_path())  # raises OSError on a mismatch
    info = library.AbiInfo()
    lib.pxl_abi(ctypes.byref(info), ctypes.sizeof(info))
    assert info.version == library.ABI_VERSION
    assert info.node_size == ctypes.sizeof(library.PlanNode)
    assert info.node_p == library.PlanNode.p.offset
    assert info.n_ops == len(library.PLAN_OPS) and info.n_formats == len(library.FORMATS)
    # a caller with a shorter pxl_abi_info gets its fields and nothing past them
    buf = (ctypes.c_int64 * 3)(-1, -1, -1)
    lib.pxl_abi(buf, 2 * ctypes.sizeof(ctypes.c_int64))
    assert list(buf) == [library.ABI_VERSION, ctypes.sizeof(library.PlanNode), -1]


def test_every_signature_exists_in_the_library():
    lib = _loaded()
    missing = [name for name in library._SIGNATURES if not hasattr(lib, name)]
    assert not missing, f"{_library_path()} lacks {missing}"


def test_abi_mismatch_is_refused_with_a_clear_message(monkeypatch):
    lib = _loaded()
    monkeypatch.setattr(library, "ABI_VERSION", library.ABI_VERSION + 1)
    monkeypatch.setattr(library, "PLAN_OPS", library.PLAN_OPS + ("Extra",))
    with pytest.raises(OSError) as e:
        library.check_abi(lib, "/some/where/libperfxlm_kernels.so")
    msg = str(e.value)
    assert "libperfxlm_kernels.so at /some/where/libperfxlm_kernels.so was built for ABI" in msg
    assert f"expects ABI {library.ABI_VERSION} " in msg
    assert f"ABI version {library.ABI_VERSION - 1} (expected {library.ABI_VERSION})" in msg
    assert f"plan ops {len(library.PLAN_OPS) - 1} (expected {len(library.PLAN_OPS)})" in msg
    assert "plan node bytes" not in msg  # only the values that differ are listed
    assert "pip install -e ." in msg and "make -C csrc" in msg


def test_a_library_without_pxl_abi_is_refused():
    class Old:  # a library built before the check: no pxl_abi symbol
        pass

    with pytest.raises(OSError, match=r"at /old/lib\.so has no pxl_abi\(\).*make -C csrc"):
        library.check_abi(Old(), "/old/lib.so")


def test_mismatch_makes_the_cpu_plugin_unavailable(monkeypatch):
    _loaded()
    monkeypatch.setattr(library, "_cache", {})  # load afresh, as a new process would
    monkeypatch.setattr(library, "ABI_VERSION", library.ABI_VERSION + 1)
    with pytest.raises(OSError, match="was built for ABI"):
        library.load()
    plugin = CpuPlugin()
    assert not plugin.is_available()
    assert "was built for ABI" in plugin.unavailable_reason()


def test_python_constants_match_the_header():
    """What pxl_abi() cannot report (each code's value, the flag bits) against pxl_abi.h itself."""
    text = _header_text()
    formats = dict(re.findall(r"\bPXL_(\w+) = (\d+)", text))
    modes = {name: int(formats.pop(name)) for name in list(formats) if name.startswith("QX_")}
    assert modes == {f"QX_{mode.upper().replace('-', '_')}": code for mode, code in library.QUANT_X.items()}
    assert {f"PXL_{name}": index for index, name in enumerate(library.FORMATS)} == \
        {f"PXL_{name}": int(value) for name, value in formats.items() if name != "NFMT"}
    assert int(formats["NFMT"]) == len(library.FORMATS)
    assert all(getattr(library, name) == i for i, name in enumerate(library.FORMATS))
    ops = re.search(r"enum\s*{\s*(PXL_OP_GATHER[^}]*)}", text).group(1)
    names = [n.strip() for n in ops.split(",") if n.strip()]
    assert names[-1] == "PXL_NOPS" and len(names) - 1 == len(library.PLAN_OPS)
    assert [getattr(library, n.removeprefix("PXL_OP_")) for n in names[:-1]] == list(range(len(library.PLAN_OPS)))
    defines = {name: int(value) for name, value in re.findall(r"#define (PXL_\w+) (\d+)\b", text)}
    assert defines["PXL_ABI_VERSION"] == library.ABI_VERSION
    assert defines["PXL_PLAN_MAX_PTRS"] == library.PLAN_MAX_PTRS
    assert defines["PXL_PANEL"] == library.PANEL
    assert (defines["PXL_XR"], defines["PXL_YR"]) == (library.XR, library.YR)
    assert (defines["PXL_ROWS_N"], defines["PXL_NO_WAIT"], defines["PXL_OUT_F32"]) == \
        (library.ROWS_N, library.NO_WAIT, library.OUT_F32)
