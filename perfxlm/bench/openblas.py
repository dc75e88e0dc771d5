"""OpenBLAS from the `scipy-openblas32` wheel, bound with ctypes (symbols prefixed `scipy_`)."""

import ctypes
import logging
from functools import cache

logger = logging.getLogger(__name__)

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@cache
def load() -> ctypes.CDLL | None:
    """The library with sgemm/sgemv signatures set, or None when the wheel is missing."""
    try:
        import scipy_openblas32
    except ImportError:
        logger.info("scipy-openblas32 is not installed: no OpenBLAS")
        return None
    lib = ctypes.CDLL(f"{scipy_openblas32.get_lib_dir()}/lib{scipy_openblas32.get_library()}.so")
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.scipy_cblas_sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
    lib.scipy_cblas_sgemv.argtypes = [i, i, i, i, f, p, i, p, i, f, p, i]
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return lib


def set_threads(n: int) -> None:
    lib = load()
    if lib is not None:
        lib.scipy_openblas_set_num_threads(n)


def corename() -> str:
    lib = load()
    return lib.scipy_openblas_get_corename().decode() if lib is not None else "none"
