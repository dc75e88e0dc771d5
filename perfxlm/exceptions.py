"""Exceptions with vLLM's names, so `except` clauses written for vLLM keep working."""

from typing import Any


class VLLMError(Exception):
    """Base class of every error perfxlm raises on purpose."""


class VLLMClientError(VLLMError):
    """The caller's input was wrong."""


class VLLMValidationError(VLLMClientError, ValueError):
    """A request or parameter failed validation.

    vLLM 0.32 derives this from `VLLMClientError` only; perfxlm also derives it from
    `ValueError` so scripts written for older vLLM (which raised `ValueError`) still
    catch it.
    """

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None):
        super().__init__(message)
        self.parameter = parameter
        self.value = value


class EngineDeadError(VLLMError):
    """The engine loop stopped after an error; every pending and later request fails with this."""


class EngineGenerateError(VLLMError):
    """A request failed inside the engine (not because of its input); it has been aborted."""
