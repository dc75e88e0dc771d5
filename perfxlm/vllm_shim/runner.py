"""`perfxlm run`: run a script written for vLLM, unedited, with `import vllm` served by perfxlm."""

import os
import runpy
import sys

from perfxlm.vllm_shim.finder import install

USAGE = """usage: perfxlm run script.py [args ...]
       perfxlm run -m module [args ...]

Run a script written for vLLM as `python script.py args` (or `python -m module args`) would, with
`import vllm` and every `vllm.<submodule>` import served by perfxlm, in the script and in the
Python subprocesses it starts (they inherit PYTHONPATH)."""


def run(argv: list[str]) -> int:
    """Run `argv` (`script.py args...` or `-m module args...`) as __main__ under the alias.
    The script's own `sys.exit` and exceptions pass through, as they do under `python`."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "-m" and len(argv) < 2:
        raise SystemExit("perfxlm run: -m needs a module name")
    install()
    export_to_subprocesses()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # run_module puts the module's file in argv[0], as python -m does
        sys.path[0] = os.getcwd()        # python -m puts the working directory first
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    script = argv[0]
    if not os.path.exists(script):
        raise SystemExit(f"perfxlm run: can't open file {os.path.abspath(script)!r}: No such file or directory")
    sys.argv = list(argv)
    # python script.py puts the script's directory first (run_path does it itself for a directory or zip)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    return 0


def export_to_subprocesses() -> None:
    """Put the sitecustomize directory first on PYTHONPATH, so Python processes this one starts
    (multiprocessing workers, `subprocess.run([sys.executable, ...])`) get the alias too."""
    from perfxlm.vllm_shim import site_dir
    here = str(site_dir())
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *parts])
