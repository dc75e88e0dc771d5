"""`AsyncLLMEngine` where vLLM keeps it (`vllm.engine.async_llm_engine`): the same class as AsyncLLM."""

from perfxlm.engine.async_llm import AsyncLLM

AsyncLLMEngine = AsyncLLM

__all__ = ["AsyncLLMEngine"]
