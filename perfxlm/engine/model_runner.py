"""The seam between scheduler and model: a typed batch in, logits out.

`ModelRunner.prepare` turns a SchedulerOutput into flat index tensors (ids,
positions, slot mapping, block tables, sequence lengths) and the logits rows
needed: each request's last token when it samples, and prompt rows when prompt
logprobs were asked for. An executor then computes those logits: by default the
exported graph on hardware plugins (`GraphExecutor`), or the torch module itself
(`EagerExecutor`, PERFXLM_EXECUTOR=eager), the reference it was exported from.
"""

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from perfxlm.engine.graph_runner import GraphRunner
from perfxlm.engine.scheduler import SchedulerOutput
from perfxlm.models.paged_attention import AttentionMetadata


@dataclass
class ModelInput:
    input_ids: torch.Tensor       # (T,) int64
    positions: torch.Tensor       # (T,) int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # (N,) int64: rows of T whose logits are computed
    sample_rows: dict[str, int] = field(default_factory=dict)  # req id -> logits row of its next token
    # req id -> (first logits row, first prompt position scored, count); row r scores token r+1
    prompt_rows: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class Executor(Protocol):
    def __call__(self, inp: ModelInput) -> torch.Tensor:
        """-> logits (N, vocab) float32 for the rows inp.logits_indices."""


def kv_bytes_per_block(params, block_size: int, dtype: torch.dtype) -> int:
    return params.n_layers * 2 * block_size * params.n_kv_heads * params.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, executor: Executor, block_size: int) -> None:
        self.executor = executor
        self.block_size = block_size

    def prepare(self, sched: SchedulerOutput) -> ModelInput:
        ids, positions, slots, logits_idx = [], [], [], []
        sample_rows, prompt_rows = {}, {}
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
            n_prompt = min(start + n, req.num_prompt_tokens - 1) - start  # rows that score a prompt token
            if req.wants_prompt_logprobs and n_prompt > 0:
                prompt_rows[req.request_id] = (len(logits_idx), start + 1, n_prompt)
                logits_idx += range(row0, row0 + n_prompt)
            if start + n == req.num_tokens:  # the whole sequence is computed: sample its next token
                sample_rows[req.request_id] = len(logits_idx)
                logits_idx.append(row0 + n - 1)
        max_blocks = max(len(r.block_ids) for r in sched.requests)
        tables = np.zeros((len(sched.requests), max_blocks), np.int64)  # (B, max_blocks), 0-padded
        for i, r in enumerate(sched.requests):
            tables[i, :len(r.block_ids)] = r.block_ids
        seq_lens = [r.num_computed_tokens + n for r, n in zip(sched.requests, sched.num_tokens)]
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.from_numpy(tables),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
            query_lens=list(sched.num_tokens),
            seq_lens_list=seq_lens,
        )
        return ModelInput(torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                          attn, torch.tensor(logits_idx, dtype=torch.int64), sample_rows, prompt_rows)

    def execute(self, inp: ModelInput) -> torch.Tensor:
        """-> logits (N, vocab) float32 for the rows in inp.logits_indices."""
        return self.executor(inp)


class GraphExecutor:
    """Feeds the batch to the exported graph (engine/graph_runner.py)."""

    def __init__(self, runner: GraphRunner) -> None:
        self.runner = runner
        # the logits' plugin may sample them natively (the cpu plugins: sample_rows)
        self.native_sampler = getattr(runner.nodes[-1].plugin, "sample_rows", None)

    def __call__(self, inp: ModelInput) -> torch.Tensor:
        a = inp.attn
        feeds = {
            "input_ids": inp.input_ids.numpy(), "positions": inp.positions.numpy(),
            "slot_mapping": a.slot_mapping.numpy(), "block_tables": a.block_tables.numpy(),
            "seq_lens": a.seq_lens.numpy(),
            "query_start_loc": np.concatenate(([0], np.cumsum(a.query_lens))).astype(np.int64),
            "logits_indices": inp.logits_indices.numpy(),
        }
        return torch.from_numpy(self.runner.run(feeds))


class EagerExecutor:
    """Runs the torch module directly over a KV cache it owns."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.model = model
        p = model.params
        # (layers, k/v, blocks, block_size, kv heads, head dim). Zeroed, so padded slots
        # that masked attention rows still read are finite; numpy's calloc gives zero pages
        # that the OS commits only when touched, so a large budget costs nothing up front.
        shape = (p.n_layers, 2, num_blocks, block_size, p.n_kv_heads, p.head_dim)
        raw = np.zeros((*shape[:-1], p.head_dim * dtype.itemsize), dtype=np.uint8)
        self.kv_cache = torch.from_numpy(raw).view(dtype)

    @torch.inference_mode()
    def __call__(self, inp: ModelInput) -> torch.Tensor:
        hidden = self.model(inp.input_ids, inp.positions, self.kv_cache, inp.attn)  # (T, dim)
        return self.model.compute_logits(hidden[inp.logits_indices])
