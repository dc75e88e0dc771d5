"""What a new user hit: each test failed before its fix. A failing call leaves nothing queued;
threads sharing an LLM get their own outputs; bad biases, prompts, chat messages and engine
arguments fail early and clearly; a missing optional extra says which to install."""

import math
import sys

import pytest

from perfxlm import SamplingParams
from perfxlm.exceptions import VLLMValidationError

OK = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_extra_args_integers_out_of_range_rejected_at_construction(value):
    with pytest.raises(VLLMValidationError, match="extra_args integers must be between"):
        SamplingParams(extra_args={"nested": [{"x": value}]})
    for ok in (2**64 - 1, -(2**63), True):  # vLLM's bounds, inclusive; bools are fine
        assert SamplingParams(extra_args={"nested": [{"x": ok}]}).extra_args == {"nested": [{"x": ok}]}


# ---- c. non-finite logit_bias -----------------------------------------------------------

@pytest.mark.parametrize("bias", [float("nan"), math.inf, -math.inf, "1.0"])
def test_non_finite_logit_bias_rejected(bias):
    with pytest.raises(VLLMValidationError, match="logit_bias values must be finite numbers") as exc:
        SamplingParams(logit_bias={0: bias})
    assert exc.value.parameter == "logit_bias"


def test_from_optional_clamps_infinite_bias_but_rejects_nan():
    assert SamplingParams.from_optional(logit_bias={"5": -math.inf, 6: math.inf}).logit_bias == {5: -100.0, 6: 100.0}
    with pytest.raises(VLLMValidationError, match="logit_bias values must be finite numbers"):
        SamplingParams.from_optional(logit_bias={5: float("nan")})


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
