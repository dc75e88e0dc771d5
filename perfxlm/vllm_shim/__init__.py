"""Run scripts written for vLLM on perfxlm without editing them (opt-in).

- `perfxlm run script.py [args]` (or `perfxlm run -m module [args]`) runs the script as `python`
  would, with `import vllm` served by perfxlm, in it and in the Python subprocesses it starts.
- `PYTHONPATH=$(python -m perfxlm.vllm_shim --path) python app.py` does the same for an app
  started any other way (`python -m app`, a launcher, workers that inherit the environment): that
  directory holds a `sitecustomize.py` that installs the alias at interpreter start.

Without one of these, nothing changes: perfxlm installs no `vllm` module and never shadows a
real vLLM. `coerce_sampling_params` turns a real vLLM's SamplingParams into perfxlm's.
"""

from pathlib import Path

from perfxlm.vllm_shim.coerce import coerce_sampling_params
from perfxlm.vllm_shim.finder import VLLM_VERSION, install, is_installed, uninstall

__all__ = ["VLLM_VERSION", "coerce_sampling_params", "install", "is_installed", "site_dir", "uninstall"]


def site_dir() -> Path:
    """The directory whose `sitecustomize.py` installs the alias in every Python started with it
    on PYTHONPATH. It holds nothing else, so putting it on the path adds no other module."""
    return Path(__file__).resolve().parent / "sitedir"
