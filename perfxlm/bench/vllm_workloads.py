"""vLLM's side of `perfxlm bench compare`: W1, W2, W3 in one vLLM process, the figures printed
as one line "perfxlm-compare-result {json}". Run by the python that has vllm, never imported
by perfxlm (it imports nothing of perfxlm); vLLM spawns workers, hence the __main__ guard.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 ~/peers/vllm-venv/bin/python vllm_workloads.py \\
        --model DIR --dtype bfloat16 --workloads W1,W2,W3 --w1 64,128,128 --w2 32,256 --w3 512

W1: one LLM.generate of N random-token prompts x IN -> OUT (greedy, ignore_eos): output
tok/s over the whole call. W2: one IN-token prompt stepped through LLMEngine.step to OUT
tokens: decode tok/s after the first token. W3: one IN-token prompt, one token out: IN / time.
W2 and W3 run once untimed first, as `perfxlm bench latency` does; W1 after one short request.
"""

import argparse
import json
import random
import time

RESULT = "perfxlm-compare-result "


def random_prompts(tokenizer, n: int, length: int, seed: int) -> list[dict]:
    """Random token ids, avoiding the special tokens (fresh ones each call: no prefix-cache hits)."""
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [t for t in range(tokenizer.vocab_size) if t not in special]
    return [{"prompt_token_ids": [rng.choice(ids) for _ in range(length)]} for _ in range(n)]


def w1(llm, tokenizer, sampling, n: int, i: int, o: int) -> float:
    llm.generate(random_prompts(tokenizer, 1, i, 100), sampling(4), use_tqdm=False)
    prompts = random_prompts(tokenizer, n, i, 1)
    start = time.perf_counter()
    outs = llm.generate(prompts, sampling(o), use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(c.token_ids) for out in outs for c in out.outputs) / elapsed


def w2(llm, tokenizer, sampling, i: int, o: int) -> float:
    engine = llm.llm_engine
    for it in range(2):  # a warm-up, then the timed one
        engine.add_request(f"w2-{it}", random_prompts(tokenizer, 1, i, 200 + it)[0], sampling(o))
        first = last = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:
                if first is None and len(out.outputs[0].token_ids) >= 1:
                    first = now
                last = now
    if first is None or last == first:
        raise SystemExit(f"W2: LLMEngine.step gave no token before the last one ({o} asked)")
    return (o - 1) / (last - first)


def w3(llm, tokenizer, sampling, i: int) -> float:
    for it in range(2):  # a warm-up, then the timed one
        prompt = random_prompts(tokenizer, 1, i, 300 + it)
        start = time.perf_counter()
        llm.generate(prompt, sampling(1), use_tqdm=False)
        elapsed = time.perf_counter() - start
    return i / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an HF model directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workloads", default="W1,W2,W3")
    p.add_argument("--w1", default="64,128,128", help="prompts, input tokens, output tokens")
    p.add_argument("--w2", default="32,256", help="input tokens, output tokens")
    p.add_argument("--w3", type=int, default=512, help="prompt tokens")
    args = p.parse_args()
    workloads = args.workloads.split(",")
    n, i1, o1 = (int(x) for x in args.w1.split(","))
    i2, o2 = (int(x) for x in args.w2.split(","))

    from vllm import LLM, SamplingParams
    longest = max({"W1": i1 + o1, "W2": i2 + o2, "W3": args.w3 + 1}[w] for w in workloads)
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, max_model_len=longest)
    tokenizer = llm.get_tokenizer()

    def sampling(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    figures = {}
    for w in workloads:
        if w == "W1":
            figures[w] = w1(llm, tokenizer, sampling, n, i1, o1)
        elif w == "W2":
            figures[w] = w2(llm, tokenizer, sampling, i2, o2)
        else:
            figures[w] = w3(llm, tokenizer, sampling, args.w3)
    print(RESULT + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
