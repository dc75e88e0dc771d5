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

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
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
        # waiting requests, unless this step already had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            computed = self.block_manager.get_computed_blocks(req)
            n = req.num_tokens - len(computed) * self.block_manager.block_size
            if n > budget and not self.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not self.block_manager.allocate_slots(req, n, computed):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(computed) * self.block_manager.block_size
            req.num_computed_tokens = len(computed) * self.block_manager.block_size
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_tokens.append(n)
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record computed tokens and the sampled ones; return the requests that got a token."""
        got_token = []
        for req, n in zip(out.requests, out.num_tokens):
            if req.is_finished:  # aborted during the step
                continue
            req.num_computed_tokens += n
            self.block_manager.cache_blocks(req)
            if req.request_id not in sampled:  # a prefill chunk that is not the last one
                continue
            req.append_output_token(sampled[req.request_id])
            got_token.append(req)
            if self._check_stop(req):
                self.finish(req, req.status)
        return got_token

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End req (stop, length or abort) and free its KV blocks."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free_blocks(req)

    def _check_stop(self, req: Request) -> bool:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            last = req.output_token_ids[-1]
            if not params.ignore_eos and last == req.eos_token_id:
                req.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = last
                return True
        if req.num_tokens >= self.max_model_len or req.num_output_tokens >= req.max_tokens:
            req.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.block_manager.free_blocks(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)
        out.preempted.append(req)
        self.num_preemptions += 1
        logger.debug("preempted request %s (%d tokens)", req.request_id, req.num_tokens)
