"""What a new user hit: each test failed before its fix. A failing call leaves nothing queued;
threads sharing an LLM get their own outputs; bad biases, prompts, chat messages and engine
arguments fail early and clearly; a missing optional extra says which to install."""

import sys

import pytest

from perfxlm import SamplingParams

OK = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


# ---- packaging: the optional extras ----------------------------------------------------------

def test_missing_openblas_names_the_extra(monkeypatch):
    from perfxlm.bench import openblas
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # import fails as if not installed
    openblas.load.cache_clear()
    try:
        with pytest.raises(SystemExit, match=r"perfxlm bench gemv needs scipy-openblas32: "
                                              r"pip install 'perfxlm\[bench\]'"):
            openblas.set_threads(1)
    finally:
        openblas.load.cache_clear()
