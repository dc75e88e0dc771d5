"""Beam search, as vLLM 0.32's offline `LLM.beam_search`.

vLLM runs beam search outside the engine: each step sends every live beam to the engine as a
prompt (prompt + tokens so far) with `max_tokens=1` and `logprobs=2 * beam_width`, and extends
it by each returned token (the 2 * beam_width most likely, plus the sampled one when
`temperature > 0` draws another). A beam ending in EOS (unless `ignore_eos`) is complete; of
the rest each prompt keeps its `beam_width` best. Beams share their prompt's KV blocks through
the prefix cache, so a step computes little more than one token per beam. At the end the
completed and live beams are ranked by `cum_logprob / len(tokens) ** length_penalty` (len
counts the prompt and leaves out a final EOS) and the best `beam_width` are decoded.

vLLM 0.32 keeps these classes in `vllm.entrypoints.generate.beam_search.utils` (older releases:
`vllm.beam_search`) and `BeamSearchParams` in `vllm.sampling_params`, as perfxlm does.
"""

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from perfxlm.logprobs import Logprob
from perfxlm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's followed by the generated ones; `logprobs` holds, per
    generated token, the logprobs the engine returned at that step; `text` is filled (the
    decode of `tokens`, prompt included) only for the sequences returned to the user."""

    orig_prompt: dict[str, Any]     # {"type": "token", "prompt_token_ids": [...], "prompt"?: text}
    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def get_prompt(self) -> dict[str, Any]:
        """The engine input that continues this beam: its tokens, with the original prompt text."""
        prompt: dict[str, Any] = {"type": "token", "prompt_token_ids": self.tokens}
        for key in ("prompt", "cache_salt"):
            if key in self.orig_prompt:
                prompt[key] = self.orig_prompt[key]
        return prompt


@dataclass
class BeamSearchOutput:
    """The best sequences of one prompt, best first (at most beam_width)."""

    sequences: list[BeamSearchSequence]


@dataclass
class BeamSearchInstance:
    """The search state of one prompt: live beams and completed ones."""

    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)

    @classmethod
    def start(cls, prompt: dict[str, Any], lora_request: Any = None) -> "BeamSearchInstance":
        return cls([BeamSearchSequence(prompt, list(prompt["prompt_token_ids"]), [], lora_request)])


def get_beam_search_score(tokens: list[int], cumulative_logprob: float, eos_token_id: int | None,
                          length_penalty: float = 1.0) -> float:
    """cum_logprob / len ** length_penalty, len leaving out a final EOS (transformers' rule)."""
    seq_len = len(tokens)
    if tokens and tokens[-1] == eos_token_id:
        seq_len -= 1
    return cumulative_logprob / (max(seq_len, 1) ** length_penalty)


def create_sort_beams_key_function(eos_token_id: int | None,
                                   length_penalty: float) -> Callable[[BeamSearchSequence], float]:
    def sort_beams_key(x: BeamSearchSequence) -> float:
        return get_beam_search_score(x.tokens, x.cum_logprob, eos_token_id, length_penalty)
    return sort_beams_key


# Runs one engine call: each token list is a prompt, all with the given SamplingParams; returns
# one RequestOutput per prompt, in order.
StepFn = Callable[[list[list[int]], Any], list[Any]]


def beam_search(prompts: Sequence[tuple[list[int], str | None]], params: BeamSearchParams, tokenizer: Any,
                run_step: StepFn, *, lora_request: Any = None, use_tqdm: bool = False,
                concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
    """Beam search over tokenized prompts ((token ids, text or None) each); `run_step` runs the
    engine. Prompts are searched `concurrency_limit` at a time (all at once when None)."""
    if params.structured_outputs is not None:
        raise NotImplementedError("perfxlm does not support beam search with structured_outputs yet")
    eos_token_id = tokenizer.eos_token_id
    sort_key = create_sort_beams_key_function(eos_token_id, params.length_penalty)
    # 2 * beam_width candidates a beam, as transformers' beam search
    step_params = SamplingParams(logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature,
                                 detokenize=False, skip_clone=True)
    instances = []
    for ids, text in prompts:
        prompt: dict[str, Any] = {"type": "token", "prompt_token_ids": ids}
        if text is not None:
            prompt["prompt"] = text
        instances.append(BeamSearchInstance.start(prompt, lora_request))
    if use_tqdm and concurrency_limit is not None:
        logger.warning("Progress bar is not supported when using concurrency_limit. Disabling progress bar.")
        use_tqdm = False
    limit = concurrency_limit if concurrency_limit is not None else max(len(instances), 1)
    for first in range(0, len(instances), limit):
        batch = instances[first:first + limit]
        steps: Any = range(params.max_tokens)
        if use_tqdm:
            steps = tqdm(steps, desc="Beam search", unit="token", unit_scale=False)
            logger.warning("The progress bar shows the upper bound on token steps and may finish early due to "
                           "stopping conditions. It does not reflect instance-level progress.")
        for _ in steps:
            if not _step(batch, step_params, run_step, eos_token_id, params, sort_key):
                break

    outputs = []
    for instance in instances:
        ranked = sorted(instance.completed + instance.beams, key=sort_key, reverse=True)[:params.beam_width]
        for beam in ranked:
            beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens)
        outputs.append(BeamSearchOutput(sequences=ranked))
    return outputs


def _step(batch: list[BeamSearchInstance], step_params: Any, run_step: StepFn, eos_token_id: int | None,
          params: BeamSearchParams, sort_key: Callable[[BeamSearchSequence], float]) -> bool:
    """Extend every live beam of the batch by one token; False when no beam was live."""
    all_beams = list(itertools.chain.from_iterable(inst.beams for inst in batch))
    if not all_beams:
        return False
    results = run_step([beam.tokens for beam in all_beams], step_params)
    start = 0
    for inst in batch:
        candidates = []
        for beam, result in zip(inst.beams, results[start:start + len(inst.beams)]):
            step_logprobs = result.outputs[0].logprobs[0]
            for token_id, lp in step_logprobs.items():
                new = BeamSearchSequence(beam.orig_prompt, beam.tokens + [token_id],
                                         beam.logprobs + [step_logprobs], beam.lora_request,
                                         beam.cum_logprob + lp.logprob)
                if token_id == eos_token_id and not params.ignore_eos:
                    inst.completed.append(new)
                else:
                    candidates.append(new)
        start += len(inst.beams)
        inst.beams = sorted(candidates, key=sort_key, reverse=True)[:params.beam_width]
    return True
