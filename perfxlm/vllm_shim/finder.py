"""The `vllm` alias: a meta-path finder under which `import vllm` and `import vllm.<submodule>`
give perfxlm's own module objects, so a script written for vLLM runs unedited and a class is the
same object whichever path imported it. Only the opt-in switches install it (`perfxlm run`, or
the sitecustomize directory that `python -m perfxlm.vllm_shim --path` prints)."""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from typing import Any

logger = logging.getLogger(__name__)

# What `vllm.__version__` says: the vLLM release whose API perfxlm implements, not perfxlm's own
# version. Scripts gate their calls on it (`Version(vllm.__version__) >= Version("0.10")` picks
# `structured_outputs=` over `guided_decoding=`); 0.32.0 sends them down the paths perfxlm serves,
# while perfxlm's 0.1.0 would send them to vLLM 0.1's API. A plain X.Y.Z, no local label, so
# scripts that split it on dots and int() the parts keep working.
VLLM_VERSION = "0.32.0"
VLLM_VERSION_TUPLE = (0, 32, 0)

# vLLM 0.32 module -> the perfxlm module that serves it. A child of an aliased perfxlm package keeps
# its leaf name (the import system sets it as an attribute of that package: it must be the same).
MODULES: dict[str, str] = {
    "vllm.sampling_params": "perfxlm.sampling_params",
    "vllm.outputs": "perfxlm.outputs",
    "vllm.pooling_params": "perfxlm.pooling_params",
    "vllm.lora": "perfxlm.lora",
    "vllm.lora.request": "perfxlm.lora.request",
    "vllm.inputs": "perfxlm.inputs",
    "vllm.inputs.data": "perfxlm.inputs",
    "vllm.logprobs": "perfxlm.logprobs",
    "vllm.exceptions": "perfxlm.exceptions",
    "vllm.config": "perfxlm.config",
    "vllm.beam_search": "perfxlm.beam_search",                              # before 0.32
    "vllm.entrypoints.generate.beam_search.utils": "perfxlm.beam_search",   # 0.32
    "vllm.entrypoints.llm": "perfxlm.entrypoints.llm",
    "vllm.entrypoints.openai": "perfxlm.entrypoints.openai",
    "vllm.entrypoints.openai.api_server": "perfxlm.entrypoints.openai.api_server",
    "vllm.entrypoints.openai.cli_args": "perfxlm.entrypoints.openai.cli_args",
    "vllm.entrypoints.openai.protocol": "perfxlm.entrypoints.openai.protocol",
    "vllm.engine": "perfxlm.engine",
    "vllm.engine.arg_utils": "perfxlm.engine.arg_utils",
    "vllm.engine.llm_engine": "perfxlm.engine.llm_engine",
    "vllm.engine.async_llm_engine": "perfxlm.engine.async_llm_engine",
    "vllm.v1.engine.async_llm": "perfxlm.engine.async_llm",
    "vllm.v1.engine.llm_engine": "perfxlm.engine.llm_engine",
    "vllm.usage.usage_lib": "perfxlm.engine.arg_utils",                    # UsageContext
    "vllm.utils.argparse_utils": "perfxlm.entrypoints.openai.cli_args",   # FlexibleArgumentParser
    "vllm.model_executor.models": "perfxlm.models.registry",              # ModelRegistry
}
# vLLM packages perfxlm has no one module for: empty packages that hold the mapped children above
PACKAGES = frozenset({"vllm.v1", "vllm.v1.engine", "vllm.usage", "vllm.utils", "vllm.model_executor",
                      "vllm.entrypoints", "vllm.entrypoints.generate", "vllm.entrypoints.generate.beam_search"})
# vLLM modules perfxlm does not have, and what is missing with them
ABSENT: dict[str, str] = {
}


def _missing(fullname: str, what: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named {fullname!r}: perfxlm serves `vllm` here and has no {what}",
                               name=fullname)


class VllmAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds every `vllm` / `vllm.*` import. The spec's placeholder module is swapped for the
    perfxlm module in `exec_module`, so that module's own `__spec__` and `__name__` stay intact."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "vllm" and not fullname.startswith("vllm."):
            return None
        if fullname in MODULES:
            if importlib.util.find_spec(MODULES[fullname]) is None:
                raise _missing(fullname, f"{MODULES[fullname]}, its counterpart")
        elif fullname not in PACKAGES and fullname not in ("vllm", "vllm.version"):
            top = next((p for p in ABSENT if fullname == p or fullname.startswith(p + ".")), None)
            raise _missing(fullname, ABSENT[top] if top else "counterpart of it")
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in PACKAGES or fullname == "vllm")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default placeholder; exec_module replaces it for aliases

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        if name == "vllm":
            _fill_top_level(module)
        elif name == "vllm.version":
            module.__version__, module.__version_tuple__ = VLLM_VERSION, VLLM_VERSION_TUPLE
        elif name in MODULES:
            target = importlib.import_module(MODULES[name])
            sys.modules[name] = target  # the import system returns what sys.modules holds after exec
            if not hasattr(target, "__path__"):
                # a vLLM package served by a plain module: its children cannot be found through a
                # __path__, but the import system takes one it finds in sys.modules after the parent
                for child, child_target in MODULES.items():
                    if child.startswith(name + "."):
                        sys.modules[child] = importlib.import_module(child_target)


def _fill_top_level(module: types.ModuleType) -> None:
    """`vllm` itself: perfxlm's names (the same objects, looked up on use) under vLLM's version."""
    import perfxlm

    def __getattr__(attr: str) -> Any:
        try:
            return getattr(perfxlm, attr)
        except AttributeError:
            raise AttributeError(f"module 'vllm' has no attribute {attr!r} (perfxlm, which serves `vllm` "
                                 "here, has no such name)") from None

    module.__doc__ = "vLLM's API served by perfxlm (perfxlm.vllm_shim)."
    module.__version__, module.__version_tuple__ = VLLM_VERSION, VLLM_VERSION_TUPLE
    module.__all__ = list(perfxlm.__all__)
    module.__getattr__ = __getattr__
    module.__dir__ = lambda: sorted(set(module.__dict__) | set(perfxlm.__all__))


def is_installed() -> bool:
    return any(isinstance(f, VllmAliasFinder) for f in sys.meta_path)


def install() -> None:
    """Make `vllm` and its submodules resolve to perfxlm in this process (idempotent). First on
    sys.meta_path, so it wins over a real vLLM install; refused once a real `vllm` is imported,
    since classes from both would then mix."""
    if is_installed():
        return
    existing = sys.modules.get("vllm")
    if existing is not None and not _is_ours(existing):
        raise RuntimeError(f"vllm is already imported from {getattr(existing, '__file__', existing)!r}; "
                           "the perfxlm alias must be installed before the first `import vllm`")
    sys.meta_path.insert(0, VllmAliasFinder())
    logger.debug("perfxlm serves `import vllm` in this process")


def uninstall() -> None:
    """Remove the finder and the `vllm` modules it made; `import vllm` then finds what it would
    have found without the alias."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, VllmAliasFinder)]
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        if _is_ours(sys.modules[name]):
            del sys.modules[name]


def _is_ours(module: Any) -> bool:
    spec = getattr(module, "__spec__", None)
    return (isinstance(getattr(spec, "loader", None), VllmAliasFinder)
            or getattr(module, "__name__", "").split(".")[0] == "perfxlm")
