from perfxlm.entrypoints.llm import LLM

__all__ = ["LLM"]
