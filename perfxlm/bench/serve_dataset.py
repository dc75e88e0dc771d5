"""The random dataset of `perfxlm bench serve`, as vLLM's RandomDataset builds it.

Per request: an input length uniform in [floor(L_in(1-r)), ceil(L_in(1+r))] (L_in less the
special tokens the tokenizer adds), an output length uniform in [max(1, floor(L_out(1-r))),
ceil(L_out(1+r))], and a prompt of consecutive non-special token ids from a random offset,
after an optional shared random prefix. The ids are decoded to text and re-encoded until the
text is exactly as many tokens long (a decoded run of ids can re-tokenize differently).
"""

import asyncio
import json
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    """One prompt of the benchmark (vLLM's SampleRequest, text only)."""
    prompt: str
    prompt_len: int  # tokens of `prompt` under the benchmark's tokenizer
    expected_output_len: int  # sent as max_tokens
    request_id: str | None = None


def parse_range_ratio(value: str | float) -> tuple[float, float]:
    """--random-range-ratio: one float for both lengths, or JSON `{"input": a, "output": b}`;
    each in [0, 1)."""
    try:
        ratio_in = ratio_out = float(value)
    except ValueError:
        try:
            spec = json.loads(value)
            ratio_in, ratio_out = float(spec.get("input", 0.0)), float(spec.get("output", 0.0))
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(f"--random-range-ratio must be a float or JSON like "
                             f'{{"input": 0.1, "output": 0.2}}, got {value!r}') from e
    for r in (ratio_in, ratio_out):
        if not 0.0 <= r < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {value!r}")
    return ratio_in, ratio_out


def length_bounds(input_len: int, output_len: int, ratios: tuple[float, float],
                  num_special: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """The inclusive (low, high) ranges the input and output lengths are drawn from."""
    real_in = max(0, input_len - num_special)
    ins = (math.floor(real_in * (1 - ratios[0])), math.ceil(real_in * (1 + ratios[0])))
    outs = (max(1, math.floor(output_len * (1 - ratios[1]))), max(1, math.ceil(output_len * (1 + ratios[1]))))
    return ins, outs


def sample_random_requests(tokenizer: Any, num_requests: int, input_len: int, output_len: int,
                           range_ratio: tuple[float, float] = (0.0, 0.0), prefix_len: int = 0, seed: int = 0,
                           request_id_prefix: str = "") -> list[SampleRequest]:
    """`num_requests` random prompts; reproducible for a given seed and tokenizer."""
    rng = np.random.default_rng(seed)
    num_special = int(tokenizer.num_special_tokens_to_add())
    (in_lo, in_hi), (out_lo, out_hi) = length_bounds(input_len, output_len, range_ratio, num_special)
    if prefix_len + in_lo < 1:
        raise ValueError(f"--random-input-len is too small: with {num_special} special tokens and "
                         f"--random-range-ratio {range_ratio[0]}, a prompt could have {prefix_len + in_lo} tokens; "
                         "increase --random-input-len or --random-prefix-len, or lower --random-range-ratio")
    logger.info("Sampling input_len from [%d, %d] and output_len from [%d, %d]", in_lo, in_hi, out_lo, out_hi)
    input_lens = rng.integers(in_lo, in_hi + 1, size=num_requests)
    output_lens = rng.integers(out_lo, out_hi + 1, size=num_requests)
    offsets = rng.integers(0, tokenizer.vocab_size, size=num_requests)
    special = set(tokenizer.all_special_ids)
    allowed = np.array([t for t in range(tokenizer.vocab_size) if t not in special])
    prefix = allowed[rng.integers(0, len(allowed), size=prefix_len)].tolist() if prefix_len > 0 else []
    requests, mismatch = [], 0
    for i in range(num_requests):
        inner = allowed[(offsets[i] + i + np.arange(input_lens[i])) % len(allowed)].tolist()
        prompt, ids, miss = decode_to_target_len(tokenizer, prefix + inner, prefix_len + int(input_lens[i]), rng)
        mismatch += miss
        requests.append(SampleRequest(prompt, len(ids), int(output_lens[i]), f"{request_id_prefix}{i}"))
    if mismatch:
        logger.warning("Across all generated prompts, there were %d %s tokens than expected after decoding and "
                       "re-encoding. This is expected due to the imperfect nature of the sampling procedure.",
                       abs(mismatch), "more" if mismatch > 0 else "fewer")
    return requests


def decode_to_target_len(tokenizer: Any, ids: list[int], target: int, rng: np.random.Generator,
                         max_retry: int = 10) -> tuple[str, list[int], int]:
    """Decode `ids` and re-encode the text, padding with random ids or truncating until the
    text is `target` tokens long; returns (text, its ids, final length - target)."""
    for attempt in range(max_retry + 1):
        prompt = tokenizer.decode(ids)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) == target or attempt == max_retry:
            return prompt, ids, len(ids) - target
        if len(ids) < target:
            ids = ids + rng.integers(0, tokenizer.vocab_size, size=target - len(ids)).tolist()
        else:
            ids = ids[:target]
    raise AssertionError("unreachable")


async def align_prompts_to_server(base_url: str, model_id: str, requests: list[SampleRequest],
                                  headers: dict[str, str] | None = None) -> list[SampleRequest]:
    """Cut prompts that the server's tokenizer (POST /tokenize) counts longer than ours back to
    their length through /detokenize. Servers without /tokenize are used as they are."""
    if not requests:
        return requests
    sem = asyncio.Semaphore(64)
    async with aiohttp.ClientSession(trust_env=True, headers=headers) as session:

        async def post(route: str, body: dict[str, Any]) -> dict[str, Any]:
            async with sem, session.post(f"{base_url}/{route}", json=body) as r:
                r.raise_for_status()
                return await r.json()

        async def tokenize(prompt: str) -> list[int]:
            body = {"model": model_id, "prompt": prompt, "add_special_tokens": False}
            return (await post("tokenize", body))["tokens"]

        try:
            first = await tokenize(requests[0].prompt)
        except Exception:
            print("WARNING: /tokenize unavailable, skipping alignment.")
            return requests
        if len(first) == requests[0].prompt_len:
            return requests
        print(f"WARNING: tokenizer mismatch (server={len(first)}, expected={requests[0].prompt_len}), "
              "re-aligning prompts.")

        async def fix(req: SampleRequest) -> SampleRequest:
            tokens = await tokenize(req.prompt)
            if len(tokens) <= req.prompt_len:
                return req
            text = (await post("detokenize", {"model": model_id, "tokens": tokens[:req.prompt_len]}))["prompt"]
            return replace(req, prompt=text)

        fixed = await asyncio.gather(*map(fix, requests), return_exceptions=True)
    return [orig if isinstance(new, BaseException) else new for orig, new in zip(requests, fixed)]


def load_bench_tokenizer(name: str) -> Any:
    """The tokenizer `name` names, found as perfxlm finds models (a local HF directory, a .gguf,
    the HF cache, the embedded default); anything else through transformers.AutoTokenizer."""
    from perfxlm.models.loader import load_tokenizer, resolve_model
    try:
        source = resolve_model(name)
    except ValueError as not_local:
        from transformers import AutoTokenizer
        logger.info("%s is not a local model (%s); trying transformers.AutoTokenizer", name, not_local)
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise SystemExit(f"perfxlm bench serve: cannot load the tokenizer {name!r}: perfxlm does not find it "
                             f"locally ({not_local}) and transformers.AutoTokenizer failed ({e}). Pass --tokenizer "
                             "with a local HF directory or .gguf file.") from e
    return load_tokenizer(source)
