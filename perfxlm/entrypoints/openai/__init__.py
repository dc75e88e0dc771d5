"""The OpenAI-compatible server (`perfxlm serve`): vLLM's routes, fields and errors on FastAPI."""
