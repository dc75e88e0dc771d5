"""LoRA adapters: vLLM's `LoRARequest` and PEFT adapter reading (`perfxlm.lora.request`, `.peft`); the
slots a model runs them in are perfxlm.models.lora."""
