"""Issue #5's workloads on perfxlm and on the engines a CPU user would otherwise pick, in one run.

    python examples/side_by_side.py                 # W1, W2, W3 on perfxlm and transformers
    python examples/side_by_side.py --workloads W2 --dtype float32

W1: --num-prompts prompts x 128 random tokens -> 128 tokens each (ignore_eos): output tok/s.
W2: one 32-token prompt -> 256 tokens: decode tok/s and TTFT.
W3: one 512-token prompt: prefill tok/s.
Every engine gets the same random token ids and the embedded SmolLM2-135M-Instruct GGUF:
perfxlm runs the GGUF (bf16 activations on the Q4_1 blocks for dtype auto, or dense in
--dtype); transformers dequantises the same GGUF with its own loader. `vllm` and
`llama_cpp` run too when importable (never a dependency). Ratios are perfxlm / engine.
"""

import argparse
import importlib.util
import logging
import time

import numpy as np
import torch

from perfxlm import LLM, SamplingParams
from perfxlm.models.default_model import embedded_gguf_path


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in row] for row in rng.integers(1000, 40000, size=(n, length))]


class Perfxlm:
    name = "perfxlm"

    def __init__(self, gguf: str, dtype: str):
        self.llm = LLM(gguf, dtype=dtype, max_model_len=1024)

    def generate(self, batch: list[list[int]], n: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        self.llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)


class Transformers:
    name = "transformers"

    def __init__(self, gguf: str, dtype: str):
        from transformers import AutoModelForCausalLM
        path = embedded_gguf_path()
        torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        self.model.eval()

    @torch.inference_mode()
    def generate(self, batch: list[list[int]], n: int) -> None:
        ids = torch.tensor(batch)
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, gguf: str, dtype: str):
        import os

        from llama_cpp import Llama
        self.llm = Llama(model_path=gguf, n_ctx=1024, n_threads=len(os.sched_getaffinity(0)), verbose=False)

    def generate(self, batch: list[list[int]], n: int) -> None:
        for p in batch:  # llama-cpp-python serves one sequence at a time
            self.llm.reset()
            it = self.llm.generate(p, temp=0.0)  # a generator: pull n tokens
            for _ in range(n):
                next(it)


class Vllm:
    name = "vllm"

    def __init__(self, gguf: str, dtype: str):
        import vllm
        self.vllm = vllm
        self.llm = vllm.LLM(gguf, dtype=dtype, max_model_len=1024)

    def generate(self, batch: list[list[int]], n: int) -> None:
        params = self.vllm.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        self.llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(engine, workloads: list[str], num_prompts: int) -> dict[str, float]:
    engine.generate(prompts(1, 16, seed=99), 4)  # warm-up
    out = {}
    if "W2" in workloads:
        p = prompts(1, 32, seed=2)
        ttft = timed(lambda: engine.generate(p, 1))
        total = timed(lambda: engine.generate(prompts(1, 32, seed=3), 256))
        out["W2 decode tok/s"] = 255 / max(total - ttft, 1e-9)
        out["W2 TTFT ms"] = 1e3 * ttft
    if "W3" in workloads:
        out["W3 prefill tok/s"] = 512 / timed(lambda: engine.generate(prompts(1, 512, seed=4), 1))
    if "W1" in workloads:
        batch = prompts(num_prompts, 128, seed=1)
        out["W1 output tok/s"] = num_prompts * 128 / timed(lambda: engine.generate(batch, 128))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--dtype", default="auto", help="perfxlm dtype (auto: bf16 on the GGUF's Q4_1 blocks)")
    ap.add_argument("--num-prompts", type=int, default=64, help="W1's batch")
    args = ap.parse_args()
    logging.getLogger("perfxlm").setLevel(logging.WARNING)
    gguf, workloads = str(embedded_gguf_path()), args.workloads.split(",")
    engines = [Perfxlm, Transformers] + [cls for mod, cls in (("vllm", Vllm), ("llama_cpp", LlamaCpp))
                                         if importlib.util.find_spec(mod)]
    results = {}
    for cls in engines:
        ref_dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        try:
            results[cls.name] = run(cls(gguf, args.dtype if cls is Perfxlm else ref_dtype), workloads,
                                    args.num_prompts)
        except Exception as e:  # an optional engine that cannot run this model must not end the comparison
            if cls in (Perfxlm, Transformers):
                raise
            print(f"{cls.name}: skipped ({type(e).__name__}: {e})", flush=True)
            continue
        print(f"{cls.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[cls.name].items()), flush=True)
    ours = results["perfxlm"]
    print(f"\n{'metric':<20}" + "".join(f"{e:>14}" for e in results) + "".join(f"{'x ' + e:>16}" for e in results
                                                                               if e != "perfxlm"))
    for metric in ours:
        row = f"{metric:<20}" + "".join(f"{results[e].get(metric, float('nan')):14.1f}" for e in results)
        for e in results:
            if e != "perfxlm":
                theirs = results[e].get(metric, float("nan"))
                ratio = theirs / ours[metric] if metric.endswith("ms") else ours[metric] / theirs
                row += f"{ratio:15.2f}x"
        print(row)


if __name__ == "__main__":
    main()
