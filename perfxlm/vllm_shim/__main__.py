"""`python -m perfxlm.vllm_shim --path`: print the directory to put on PYTHONPATH so that apps
started with it import perfxlm as `vllm`, e.g.

    PYTHONPATH=$(python -m perfxlm.vllm_shim --path) python app.py
"""

import argparse
import sys

from perfxlm.vllm_shim import site_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perfxlm.vllm_shim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", action="store_true", required=True,
                        help="print the sitecustomize directory that switches `import vllm` to perfxlm")
    parser.parse_args(argv)
    print(site_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
