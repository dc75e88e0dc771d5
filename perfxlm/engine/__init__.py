"""The engine: scheduler, KV block manager, model runner, sampler and output processing."""
