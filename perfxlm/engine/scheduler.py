"""Continuous batching with chunked prefill and preemption by recompute.

Each step fills a token budget: running requests first (one token for a
decode, the next chunk for a prompt still being prefilled), then waiting
requests in arrival order. When KV blocks run out, the most recently admitted
running request is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed (prompt + output so far) later.
"""

import logging
from collections import deque
from dataclasses import dataclass, field

from perfxlm.engine.block_manager import BlockManager
from perfxlm.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    """What to run this step."""

    requests: list[Request] = field(default_factory=list)  # in batch order
    num_tokens: list[int] = field(default_factory=list)    # new tokens of each request this step
    preempted: list[Request] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True, max_loras: int = 0) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_loras = max_loras  # LoRA slots: at most this many adapters among the running requests
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # running requests: decodes and unfinished prefill chunks
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_tokens.append(n)
                budget -= n
                i += 1
        # waiting requests, unless this step already had to preempt; one whose adapter would be one
        # too many for the LoRA slots waits, and later ones may go first (as in vLLM)
        adapters = {r.lora_request.lora_name for r in self.running if r.lora_request is not None}
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            lora = req.lora_request
            if lora is not None and lora.lora_name not in adapters and len(adapters) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            computed = self.block_manager.get_computed_blocks(req)
            n = req.num_tokens - len(computed) * self.block_manager.block_size
            if n > budget and not self.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.block_manager.allocate_slots(req, n, computed):
                break
            self.waiting.popleft()
            if lora is not None:
                adapters.add(lora.lora_name)
            if req.num_cached_tokens < 0:  # first admission, not a preempted request resuming
                req.num_cached_tokens = len(computed) * self.block_manager.block_size
                self.block_manager.record_lookup(req, computed)
            req.num_computed_tokens = len(computed) * self.block_manager.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))  # back in their order, at the front
        return out

    def update(self, out: SchedulerOutput, sampling: list[Request], tokens: list[int]) -> list[int]:
        """Record the step's computed tokens and sampling[i]'s new token tokens[i] (a structured
        output's grammar accepts it); end the sequences that EOS, a stop token or the length limit
        ends. Returns the indices i of the
        requests that got their token (not those aborted during the step)."""
        for req, n in zip(out.requests, out.num_tokens):
            if not req.is_finished:
                req.num_computed_tokens += n
                self.block_manager.cache_blocks(req)
        got_token = []
        for i, (req, token) in enumerate(zip(sampling, tokens)):
            if req.is_finished:  # aborted during the step
                continue
            req.append_output_token(token)
            got_token.append(i)
            stop = self._check_stop(req)
            if req.grammar is not None and not req.grammar.accept(token):
                # the mask allowed it, so only an all-masked row gets here (vLLM ends the request too)
                logger.error("grammar rejected token %d for request %s; ending it", token, req.request_id)
                stop = RequestStatus.FINISHED_ERROR, None
            if stop is not None:
                self.finish(req, *stop)
        return got_token

    def finish(self, req: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """End req (EOS, stop token or string, length, abort) and free its KV blocks. A stop
        string found in the text of a token that also hit a limit overrides that status."""
        already = req.is_finished
        req.status, req.stop_reason = status, stop_reason
        if already:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free_blocks(req)

    def _check_stop(self, req: Request) -> tuple[RequestStatus, int | None] | None:
        """vLLM's order: EOS and stop token ids (once min_tokens are out), then the length limits."""
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            last = req.output_token_ids[-1]
            if not params.ignore_eos and last == req.eos_token_id:
                return RequestStatus.FINISHED_STOPPED, None
            if last in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, last
        if req.num_tokens >= self.max_model_len or req.num_output_tokens >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH_CAPPED, None
        return None

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.block_manager.free_blocks(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        out.preempted.append(req)
        self.num_preemptions += 1
        req.num_preemptions += 1
        logger.debug("preempted request %s (%d tokens)", req.request_id, req.num_tokens)
