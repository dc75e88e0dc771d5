"""From sampled tokens to RequestOutputs: logprobs, detokenisation, stop strings, and what each
step emits under SamplingParams.output_kind (CUMULATIVE, DELTA, FINAL_ONLY), as vLLM's."""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from perfxlm.engine.detokenizer import IncrementalDetokenizer
from perfxlm.engine.request import Request, RequestStatus
from perfxlm.engine.sampler import log_softmax
from perfxlm.logprobs import Logprob
from perfxlm.outputs import CompletionOutput, PoolingOutput, PoolingRequestOutput, RequestMetrics, RequestOutput
from perfxlm.sampling_params import RequestOutputKind


@dataclass
class RequestState:
    """A user request: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    arrival_time: float
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    max_tokens_param: int | None = None          # SamplingParams.max_tokens as the caller gave it
    finished_children: set[int] = field(default_factory=set)
    # DELTA: what earlier outputs already carried, per child
    sent_tokens: list[int] = field(default_factory=list)
    sent_chars: list[int] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        self.sent_tokens = [0] * len(self.children)
        self.sent_chars = [0] * len(self.children)

    @property
    def finished(self) -> bool:
        return len(self.finished_children) == len(self.children)

    def set_lora(self, lora_request: Any) -> None:
        """Every sequence of the request runs with this adapter (None: the base model)."""
        for req in self.children:
            req.lora_request = lora_request


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._piece_cache: dict[int, str] = {}

    def decode_token(self, token_id: int) -> str | None:
        """One token's text as vLLM's logprobs show it (`decode([id])`)."""
        if self.tokenizer is None:
            return None
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece_cache[token_id] = self.tokenizer.decode([token_id])
        return piece

    def logprob_dict(self, row: np.ndarray, token_id: int, k: int) -> dict[int, Logprob]:
        """row (V,) log-softmax -> {chosen token (with its rank), top k (ranks 1..k)}."""
        chosen = row[token_id].item()
        rank = int((row >= chosen).sum())  # ties count as ahead, as in vLLM
        k = row.shape[0] if k == -1 else min(k, row.shape[0])  # (a request may ask for more than the vocabulary)
        ids, lps, ranks = [token_id], [chosen], [rank]
        if k > 0:
            top = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(k)
            top = top[np.argsort(-row[top], kind="stable")]  # the k largest, largest first
            ids += top.tolist()
            lps += row[top].tolist()
            ranks += range(1, k + 1)
        return {i: Logprob(lp, r, self.decode_token(i)) for i, lp, r in zip(ids, lps, ranks)}

    def add_sample_logprobs(self, req: Request, row: np.ndarray) -> None:
        token_id = req.output_token_ids[-1]
        entry = self.logprob_dict(row, token_id, req.sampling_params.logprobs)
        req.logprobs.append(entry)
        req.cumulative_logprob += entry[token_id].logprob

    def add_prompt_logprobs(self, req: Request, logits: np.ndarray, first_pos: int) -> None:
        """logits (count, V): row j scores prompt token first_pos + j."""
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        skip = len(req.prompt_logprobs) - first_pos  # already recorded before a preemption
        rows = log_softmax(logits[max(skip, 0):])
        for j, row in enumerate(rows):
            token_id = req.prompt_token_ids[first_pos + max(skip, 0) + j]
            req.prompt_logprobs.append(self.logprob_dict(row, token_id, req.sampling_params.prompt_logprobs))

    def process_token(self, state: RequestState, req: Request) -> str | None:
        """Detokenise req's newest token; return a stop string if one now ends it."""
        detok = state.detokenizers[req.index]
        if detok is None:
            return None
        stopped_by_token = req.status == RequestStatus.FINISHED_STOPPED
        return detok.update(req.output_token_ids[-1:], stopped_by_token)

    def step_output(self, state: RequestState, updated: list[Request]) -> RequestOutput | None:
        """What a step emits for a request whose sequences `updated` got a token (or ended):
        CUMULATIVE and DELTA list those sequences, FINAL_ONLY waits for all n to finish."""
        if state.output_kind == RequestOutputKind.FINAL_ONLY:
            return self.make_output(state, state.children) if state.finished else None
        return self.make_output(state, updated)

    def make_output(self, state: RequestState, children: list[Request]) -> RequestOutput:
        delta = state.output_kind == RequestOutputKind.DELTA
        first = state.children[0]
        prompt_logprobs = first.prompt_logprobs
        if delta:  # the prompt's logprobs travel with the first output only
            prompt_logprobs = None if state.sent_prompt_logprobs else prompt_logprobs
            state.sent_prompt_logprobs = True
        metrics = RequestMetrics(arrival_time=state.arrival_time, first_scheduled_time=first.first_scheduled_time,
                                 first_token_time=first.first_token_time,
                                 finished_time=first.last_token_time if state.finished else None)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=[self._completion(state, req, delta) for req in children],
            finished=state.finished,
            metrics=metrics,
            num_cached_tokens=max(first.num_cached_tokens, 0),
            lora_request=first.lora_request,
        )

    def pooling_output(self, state: RequestState, data: Any) -> PoolingRequestOutput:
        """A finished pooling request's output: its pooled data (engine/pooler.py)."""
        req = state.children[0]
        return PoolingRequestOutput(request_id=state.request_id, outputs=PoolingOutput(data=data),
                                    prompt_token_ids=state.prompt_token_ids,
                                    num_cached_tokens=max(req.num_cached_tokens, 0), finished=True)

    def _completion(self, state: RequestState, req: Request, delta: bool) -> CompletionOutput:
        detok = state.detokenizers[req.index]
        text = detok.output_text if detok is not None else ""
        hold = req.sampling_params.output_text_buffer_length
        if hold and not req.is_finished:  # text that may yet turn out to start a stop string
            text = text[:max(len(text) - hold, 0)]
        token_ids, logprobs = req.output_token_ids, req.logprobs
        if delta:
            t0, c0 = state.sent_tokens[req.index], state.sent_chars[req.index]
            state.sent_tokens[req.index], state.sent_chars[req.index] = len(token_ids), max(len(text), c0)
            token_ids, text = token_ids[t0:], text[c0:]
            logprobs = logprobs[t0:] if logprobs is not None else None
        return CompletionOutput(
            index=req.index,
            text=text,
            token_ids=list(token_ids),
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=req.status.finish_reason(),
            stop_reason=req.stop_reason,
        )
