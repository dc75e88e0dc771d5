"""Paged KV-cache attention in plain torch: the numerical reference for every plugin.

The cache of one layer is two tensors `(num_blocks, block_size, n_kv_heads, head_dim)`.
A sequence owns the blocks listed in its row of `block_tables`; token t of the
sequence lives at slot `block_tables[b, t // block_size] * block_size + t % block_size`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes the KV cache.

    The batch is B sequences; sequence b contributes `query_lens[b]` new tokens,
    laid out one sequence after another (T tokens in all).
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # (B, max_blocks) int64: the blocks of each sequence, 0-padded
    seq_lens: torch.Tensor      # (B,) int64: tokens in the cache after this step (context + new)
    query_lens: list[int]       # B ints: new tokens per sequence; sum is T
    seq_lens_list: list[int]    # B ints: seq_lens as Python ints (no device sync)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (T, n_kv, hd) -> the cache slots `slot_mapping` (T,)."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """q (T, nh, hd) attends causally over each sequence's cached K/V -> (T, nh, hd);
    with a sliding window, each token sees at most that many most recent tokens.

    Decode rows (one new token) run as one padded batch; each prefill chunk runs
    alone, so a long prompt next to many decodes pads nothing.
    """
    out = torch.empty_like(q)
    decode = [b for b, n in enumerate(meta.query_lens) if n == 1]
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    if decode:
        rows = torch.tensor([starts[b] for b in decode])
        idx = torch.tensor(decode)
        max_len = max(meta.seq_lens_list[b] for b in decode)
        k, v = _gather(k_cache, v_cache, meta.block_tables[idx], max_len)  # (D, S, nkv, hd)
        key_pos = torch.arange(max_len)
        seq_lens = meta.seq_lens[idx].unsqueeze(1)                       # (D, 1)
        mask = key_pos < seq_lens                                         # (D, S)
        if sliding_window is not None:
            mask &= key_pos >= seq_lens - sliding_window
        o = F.scaled_dot_product_attention(
            q[rows].unsqueeze(2),                                         # (D, nh, 1, hd)
            k.transpose(1, 2), v.transpose(1, 2),                         # (D, nkv, S, hd)
            attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(2)
    for b, n in enumerate(meta.query_lens):
        if n == 1:
            continue
        seq_len = meta.seq_lens_list[b]
        k, v = _gather(k_cache, v_cache, meta.block_tables[b:b + 1], seq_len)  # (1, S, nkv, hd)
        qb = q[starts[b]:starts[b] + n].transpose(0, 1).unsqueeze(0)          # (1, nh, n, hd)
        q_pos = torch.arange(seq_len - n, seq_len).unsqueeze(1)               # (n, 1)
        key_pos = torch.arange(seq_len)
        mask = key_pos <= q_pos                                               # (n, S)
        if sliding_window is not None:
            mask &= key_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(qb, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[starts[b]:starts[b] + n] = o[0].transpose(0, 1)
    return out


def _gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of each row of block_tables -> 2 x (B, length, nkv, hd)."""
    block_size = k_cache.shape[1]
    blocks = block_tables[:, :(length + block_size - 1) // block_size]
    k = k_cache[blocks].flatten(1, 2)[:, :length]
    v = v_cache[blocks].flatten(1, 2)[:, :length]
    return k, v
