"""OpenBLAS from the `scipy-openblas32` wheel, bound with ctypes (symbols prefixed `scipy_`).

Only `perfxlm bench gemv` needs it, so it is an extra: `pip install 'perfxlm[bench]'`.
"""

import ctypes
from functools import cache

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
MISSING = "perfxlm bench gemv needs scipy-openblas32: pip install 'perfxlm[bench]'"


@cache
def load() -> ctypes.CDLL:
    """The library with sgemm/sgemv signatures set. Without the `scipy-openblas32` wheel
    (the `bench` extra) this exits with a message saying how to install it."""
    try:
        import scipy_openblas32
    except ImportError as e:
        raise SystemExit(MISSING) from e
    lib = ctypes.CDLL(f"{scipy_openblas32.get_lib_dir()}/lib{scipy_openblas32.get_library()}.so")
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.scipy_cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.scipy_cblas_sgemv.argtypes = [i, i, i, i, f, p, i, p, i, f, p, i]
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return lib


def set_threads(n: int) -> None:
    load().scipy_openblas_set_num_threads(n)


def corename() -> str:
    return load().scipy_openblas_get_corename().decode()
