"""perfxlm: a vLLM-compatible inference engine for CPUs, RISC-V, DCU and GPUs."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("perfxlm/version.py").read_text(), version)

setup(
    name="perfxlm",
    version=version["__version__"],
    description="vLLM-compatible LLM inference engine: plain PyTorch models, paged KV cache, hardware plugins",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["perfxlm", "perfxlm.*", "graph_export", "graph_export.*",
                                    "hw_plugins", "hw_plugins.*"]),
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
        "onnxruntime",  # `perfxlm export --verify` checks graphs with it
        "ml_dtypes",    # bfloat16 arrays on the host side of plugins
    ],
    entry_points={
        "console_scripts": ["perfxlm = perfxlm.cli:main"],
        "perfxlm.hw_plugins": ["torch = hw_plugins.torch_ref:TorchPlugin"],
    },
    extras_require={"test": ["pytest", "accelerate"]},  # accelerate: transformers' GGUF loader in tests
)
