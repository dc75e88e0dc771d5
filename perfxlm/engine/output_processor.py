"""From sampled tokens to RequestOutputs: logprobs, detokenisation, stop strings."""

from dataclasses import dataclass, field
from typing import Any

import torch

from perfxlm.engine.detokenizer import IncrementalDetokenizer
from perfxlm.engine.request import Request, RequestStatus
from perfxlm.logprobs import Logprob
from perfxlm.outputs import CompletionOutput, RequestMetrics, RequestOutput


@dataclass
class RequestState:
    """A user request: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    arrival_time: float
    finished_children: set[int] = field(default_factory=set)


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

    def logprob_dict(self, row: torch.Tensor, token_id: int, k: int) -> dict[int, Logprob]:
        """row (V,) log-softmax -> {chosen token (with its rank), top k (ranks 1..k)}."""
        chosen = row[token_id].item()
        rank = int((row >= chosen).sum().item())  # ties count as ahead, as in vLLM
        k = row.shape[0] if k == -1 else k
        ids, lps, ranks = [token_id], [chosen], [rank]
        if k > 0:
            top = torch.topk(row, k)
            ids += top.indices.tolist()
            lps += top.values.tolist()
            ranks += range(1, k + 1)
        return {i: Logprob(lp, r, self.decode_token(i)) for i, lp, r in zip(ids, lps, ranks)}

    def add_sample_logprobs(self, req: Request, row: torch.Tensor) -> None:
        token_id = req.output_token_ids[-1]
        entry = self.logprob_dict(row, token_id, req.sampling_params.logprobs)
        req.logprobs.append(entry)
        req.cumulative_logprob += entry[token_id].logprob

    def add_prompt_logprobs(self, req: Request, logits: torch.Tensor, first_pos: int) -> None:
        """logits (count, V): row j scores prompt token first_pos + j."""
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        skip = len(req.prompt_logprobs) - first_pos  # already recorded before a preemption
        rows = torch.log_softmax(logits[max(skip, 0):], dim=-1)
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

    def make_output(self, state: RequestState) -> RequestOutput:
        completions = []
        for req in state.children:
            detok = state.detokenizers[req.index]
            completions.append(CompletionOutput(
                index=req.index,
                text=detok.output_text if detok is not None else "",
                token_ids=list(req.output_token_ids),
                cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
                logprobs=req.logprobs,
                finish_reason=req.status.finish_reason(),
                stop_reason=req.stop_reason,
            ))
        first = state.children[0]
        metrics = RequestMetrics(arrival_time=state.arrival_time, first_token_time=first.first_token_time)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=completions,
            finished=len(state.finished_children) == len(state.children),
            metrics=metrics,
            num_cached_tokens=max(first.num_cached_tokens, 0),
        )
