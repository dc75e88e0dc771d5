"""`perfxlm serve` in a subprocess on a free 127.0.0.1 port, as vLLM's tests' RemoteOpenAIServer."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """Starts `python -m perfxlm.entrypoints.openai.api_server MODEL ARGS` and waits for /health.

    Use as a context manager; `url_for("v1/models")`, `client()` (the openai client) and
    `async_client()` talk to it. The server's log goes to `log_path`."""

    def __init__(self, args: list[str], model: str = DEFAULT_MODEL, env: dict[str, str] | None = None,
                 timeout: float = 240, api_key: str | None = None, log_path: str | os.PathLike | None = None,
                 command: list[str] | None = None) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.api_key = api_key
        cmd = command or [sys.executable, "-m", "perfxlm.entrypoints.openai.api_server"]
        self.cmd = [*cmd, model, "--host", self.host, "--port", str(self.port), *args]
        if api_key is not None:
            self.cmd += ["--api-key", api_key]
        self.env = {**os.environ, "PERFXLM_CONFIGURE_LOGGING": "1", **(env or {})}
        self.timeout = timeout
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RemoteServer":
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready: "
                                   f"{' '.join(self.cmd)} (log: {self.log_path})")
            try:
                if requests.get(self.url_for("health"), timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not ready after {self.timeout} s: {' '.join(self.cmd)}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url_root, *parts])

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.api_key or "EMPTY", max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), api_key=self.api_key or "EMPTY", max_retries=0,
                                  **kwargs)
