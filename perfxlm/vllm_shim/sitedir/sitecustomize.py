"""Installs perfxlm's `vllm` alias at interpreter start. Python imports this file because its
directory is on PYTHONPATH (`python -m perfxlm.vllm_shim --path` prints it); nothing else does."""

if __name__ == "sitecustomize":  # not when imported by its package name (perfxlm.vllm_shim.sitedir...)
    import importlib.machinery
    import importlib.util
    import os
    import sys

    from perfxlm.vllm_shim.finder import install

    install()

    # This file shadows any other sitecustomize (a distribution's, a venv's, the user's): run it too.
    _here = os.path.dirname(os.path.abspath(__file__))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
    if _spec is not None and _spec.loader is not None:
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
