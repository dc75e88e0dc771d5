"""Runs inside a riscv64 Python under qemu-user (tests/test_rvv_qemu.py starts it): LLM.generate
on a deployable directory with the `rvv` plugin, greedy, with no torch, transformers or
tokenizers on the machine. argv: the directory and a JSON list of prompts; prints one JSON
line: the tokens of each prompt, timings, and which of those packages got imported."""

import json
import sys
import time

from perfxlm import LLM, SamplingParams

start = time.monotonic()
llm = LLM(model=sys.argv[1], hw_plugin="rvv", kv_cache_memory_bytes=16 << 20, max_model_len=256,
          max_num_batched_tokens=64)
loaded = time.monotonic()
out = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=int(sys.argv[3]),
                                                           ignore_eos=True), use_tqdm=False)
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in out], "load_s": round(loaded - start, 1),
                  "generate_s": round(time.monotonic() - loaded, 1),
                  "imported": sorted(m for m in sys.modules
                                     if m.split(".")[0] in ("torch", "transformers", "tokenizers"))}))
