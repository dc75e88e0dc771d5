"""The seam between scheduler and model: a typed batch in, logits out.

`ModelRunner.prepare` turns a SchedulerOutput straight into the graph's numpy inputs
(ids, positions, slot mapping, block tables, sequence lengths, logits rows) and says,
aligned by index, which requests sample from which logits row, which rows score
prompt tokens, and which rows a pooling request pools (engine/pooler.py). An executor then
computes those logits: by default the exported graph on hardware plugins (`GraphExecutor`),
or the torch module itself (engine/eager_executor.py, PERFXLM_EXECUTOR=eager), the reference it
was exported from. This module imports no torch.
"""

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from perfxlm.engine.graph_runner import GraphRunner, GraphSpec
from perfxlm.engine.lora_manager import LoRAManager
from perfxlm.engine.pooler import Pooler
from perfxlm.engine.request import Request
from perfxlm.engine.scheduler import SchedulerOutput


@dataclass
class ModelInput:
    feeds: dict[str, np.ndarray]                       # ops.GRAPH_INPUTS, int64
    sampling: list[Request] = field(default_factory=list)   # requests that sample a token this step
    sample_rows: list[int] = field(default_factory=list)    # sampling[i]'s logits row
    # (request, its first logits row, the first prompt position scored, count); row r scores token r+1
    prompt_rows: list[tuple[Request, int, int, int]] = field(default_factory=list)
    # pooling requests: (request, its first logits row, the prompt positions of its rows, in order)
    pooling: list[tuple[Request, int, range]] = field(default_factory=list)


class Executor(Protocol):
    spec: GraphSpec

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """-> logits (N, vocab) float32 for the rows feeds['logits_indices'], valid until the next call."""


class ModelRunner:
    def __init__(self, executor: Executor, block_size: int, pooler: Pooler | None = None,
                 lora: LoRAManager | None = None) -> None:
        self.executor = executor
        self.block_size = block_size
        self.pooler = pooler  # a pooling model's (None: a generative one)
        self.lora = lora      # the LoRA slots' owner when the graph has them
        self.token_types = "token_type_ids" in executor.spec.optional_inputs  # the graph reads them (BERT)

    def prepare(self, sched: SchedulerOutput) -> ModelInput:
        ids, positions, slots, logits_idx = [], [], [], []
        inp = ModelInput({})
        bs = self.block_size
        for req, n in zip(sched.requests, sched.num_tokens):
            start, row0 = req.num_computed_tokens, len(ids)
            if n == 1:  # a decode (most rows of a busy engine's steps)
                ids.append(req.all_token_ids[start])
                positions.append(start)
                slots.append(req.block_ids[start // bs] * bs + start % bs)
            else:
                ids += req.all_token_ids[start:start + n]
                positions += range(start, start + n)
                slots += [req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)]
            if req.pooling_params is not None:  # prefill only: the rows its pooling needs, never a sample
                pooled = self.pooler.positions(req, start, n)
                inp.pooling.append((req, len(logits_idx), pooled))
                logits_idx += [row0 + p - start for p in pooled]
                continue
            n_prompt = min(start + n, req.num_prompt_tokens - 1) - start  # rows that score a prompt token
            if req.wants_prompt_logprobs and n_prompt > 0:
                inp.prompt_rows.append((req, len(logits_idx), start + 1, n_prompt))
                logits_idx += range(row0, row0 + n_prompt)
            if start + n == req.num_tokens:  # the whole sequence is computed: sample its next token
                inp.sampling.append(req)
                inp.sample_rows.append(len(logits_idx))
                logits_idx.append(row0 + n - 1)
        B = len(sched.requests)
        tables = np.zeros((B, max(len(r.block_ids) for r in sched.requests)), np.int64)  # (B, max_blocks), 0-padded
        for i, r in enumerate(sched.requests):
            tables[i, :len(r.block_ids)] = r.block_ids
        query_lens = np.array(sched.num_tokens, np.int64)                                 # (B,)
        query_start_loc = np.zeros(B + 1, np.int64)                                       # (B+1,)
        np.cumsum(query_lens, out=query_start_loc[1:])
        inp.feeds = {
            "input_ids": np.array(ids, np.int64), "positions": np.array(positions, np.int64),
            "slot_mapping": np.array(slots, np.int64), "block_tables": tables,
            "seq_lens": np.array([r.num_computed_tokens for r in sched.requests], np.int64) + query_lens,
            "query_start_loc": query_start_loc, "logits_indices": np.array(logits_idx, np.int64),
        }
        if self.token_types:  # 0 (a plain prompt's) where a request has none
            inp.feeds["token_type_ids"] = np.concatenate([
                np.array(r.token_type_ids[r.num_computed_tokens:r.num_computed_tokens + n], np.int64)
                if r.token_type_ids is not None else np.zeros(n, np.int64)
                for r, n in zip(sched.requests, sched.num_tokens)])
        if self.lora is not None:  # each token's adapter slot (-1: the base model), adapters written first
            in_step = {r.lora_request.lora_name for r in sched.requests if r.lora_request is not None}
            inp.feeds["lora_ids"] = np.concatenate([
                np.full(n, -1 if r.lora_request is None else self.lora.slot(r.lora_request, in_step), np.int64)
                for r, n in zip(sched.requests, sched.num_tokens)])
        return inp

    def execute(self, inp: ModelInput) -> np.ndarray:
        """-> logits (N, vocab) float32 for the rows in inp.feeds['logits_indices']."""
        return self.executor(inp.feeds)


class GraphExecutor:
    """Feeds the batch to the exported graph (engine/graph_runner.py)."""

    def write_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.runner.write_weights(weights)

    def __init__(self, runner: GraphRunner) -> None:
        self.runner = runner
        self.spec = runner.spec
        self.native_sampler = runner.native_sampler()

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.runner.run(feeds)
