"""Paged KV cache bookkeeping: which blocks each request owns, and the prefix cache.

A block is free when no request holds it. A free block keeps its contents and its
hash until it is handed out again, so a later request with the same prefix can
take it back (prefix caching); free blocks are reused least-recently-freed first.
"""

from collections import OrderedDict

from perfxlm.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evict from the front
        self.cached: dict[int, int] = {}  # block hash -> block id
        # prefix-cache lookups of admitted requests (not retried or resumed ones): count, tokens, hit tokens
        self.lookups = self.queries = self.hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Cached blocks holding a prefix of req's tokens (at least one token is left to compute)."""
        if not self.enable_prefix_caching or req.sampling_params.skip_reading_prefix_cache:
            return []
        self._hash_full_blocks(req, req.num_tokens)
        hits = []
        for h in req.block_hashes[:(req.num_tokens - 1) // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, req: Request, computed_blocks: list[int]) -> None:
        """Count a first admission's prefix-cache lookup (vLLM leaves out lookups that found no room
        and those of preempted requests resuming)."""
        if self.enable_prefix_caching and not req.sampling_params.skip_reading_prefix_cache:
            self.lookups += 1
            self.queries += req.num_tokens
            self.hits += len(computed_blocks) * self.block_size

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Give req the blocks for `num_new_tokens` more tokens; False (and no change) if short."""
        num_computed = len(computed_blocks) * self.block_size if computed_blocks else req.num_computed_tokens
        total = self.blocks_needed(num_computed + num_new_tokens)
        new = total - len(req.block_ids) - len(computed_blocks)
        if new <= 0 and not computed_blocks:  # a running request between block boundaries
            return True
        revived = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)  # free now, taken back
        if new > len(self.free) - revived:
            return False
        for b in computed_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        req.block_ids.extend(computed_blocks)
        if computed_blocks:  # hits: in the prefix cache already
            req.num_cached_blocks = len(req.block_ids)
        for _ in range(max(new, 0)):
            b, _ = self.free.popitem(last=False)
            if self.block_hash[b] is not None:  # evict its old contents from the prefix cache
                if self.cached.get(self.block_hash[b]) == b:
                    del self.cached[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            req.block_ids.append(b)
        return True

    def cache_blocks(self, req: Request) -> None:
        """Register req's blocks that became full of computed tokens in the prefix cache (each
        block once: a decode step fills at most one)."""
        num_full = req.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= req.num_cached_blocks:
            return
        self._hash_full_blocks(req, num_full * self.block_size)
        for i in range(req.num_cached_blocks, num_full):
            b, h = req.block_ids[i], req.block_hashes[i]
            if self.block_hash[b] is None and h not in self.cached:
                self.block_hash[b] = h
                self.cached[h] = b
        req.num_cached_blocks = num_full

    def free_blocks(self, req: Request) -> None:
        """Release req's blocks; its tail blocks go first to the eviction end."""
        for b in reversed(req.block_ids):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0
            if self.ref_counts[b] == 0:
                self.free[b] = None
        req.block_ids = []
        req.num_cached_blocks = 0

    def reset_prefix_cache(self) -> bool:
        if len(self.free) != self.num_blocks:
            return False  # blocks in use still hold hashed contents
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    def _hash_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Extend req.block_hashes over the full blocks among its first num_tokens tokens."""
        bs = self.block_size
        for i in range(len(req.block_hashes), num_tokens // bs):
            # an adapter's K/V differ from the base model's: its name seeds the chain (vLLM's extra keys)
            parent = req.block_hashes[-1] if req.block_hashes else (
                req.lora_request.lora_name if req.lora_request is not None else None)
            req.block_hashes.append(hash((parent, tuple(req.all_token_ids[i * bs:(i + 1) * bs]))))
