"""BlockManager without a model: allocation, refcounts, prefix-cache hits and eviction."""

from perfxlm.engine.block_manager import BlockManager
from perfxlm.engine.request import Request
from perfxlm.sampling_params import SamplingParams


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), eos_token_id=None, max_tokens=16)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(9)))
    assert bm.allocate_slots(req, 9)
    assert len(req.block_ids) == 3 and bm.num_free_blocks == 7
    req.num_computed_tokens = 9
    assert bm.allocate_slots(req, 3)          # tokens 9..11 still fit block 3
    assert len(req.block_ids) == 3
    req.num_computed_tokens = 12
    assert bm.allocate_slots(req, 4)          # tokens 12..15: a fourth block
    assert len(req.block_ids) == 4
    bm.free_blocks(req)
    assert bm.num_free_blocks == 10 and req.block_ids == []


def test_allocation_fails_without_side_effects_when_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not bm.allocate_slots(req, 12)
    assert bm.num_free_blocks == 2 and req.block_ids == []


def test_prefix_cache_hit_shares_blocks_with_refcounts():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(10)))
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_blocks(a)                          # blocks 0 and 1 are full: hashed
    b = make_request("b", list(range(8)) + [99, 98, 97])
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_ids[:2]
    assert bm.allocate_slots(b, 3, hits)
    assert [bm.ref_counts[x] for x in hits] == [2, 2]
    bm.free_blocks(a)
    assert [bm.ref_counts[x] for x in hits] == [1, 1]
    bm.free_blocks(b)
    assert bm.num_free_blocks == 10


def test_never_caches_the_whole_prompt():
    """At least one token must be computed to produce logits, so an 8-token prompt
    whose two blocks are both cached only reuses the first."""
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(8)))
    bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_blocks(a)
    bm.free_blocks(a)
    again = make_request("b", list(range(8)))
    assert len(bm.get_computed_blocks(again)) == 1


def test_freed_cached_blocks_are_revived_then_evicted_when_reused():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_request("a", list(range(9)))
    bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_blocks(a)
    bm.free_blocks(a)
    assert bm.num_free_blocks == 3 and len(bm.cached) == 2
    b = make_request("b", list(range(9)))
    hits = bm.get_computed_blocks(b)
    assert len(hits) == 2 and bm.allocate_slots(b, 1, hits)
    assert bm.num_free_blocks == 0
    bm.free_blocks(b)
    c = make_request("c", [7] * 12)             # needs all 3 blocks: evicts the cached ones
    assert bm.allocate_slots(c, 12)
    assert bm.cached == {}


def test_skip_reading_prefix_cache_for_prompt_logprobs():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(9)))
    bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_blocks(a)
    b = make_request("b", list(range(9)), prompt_logprobs=1)
    assert bm.get_computed_blocks(b) == []


def test_reset_prefix_cache_only_when_idle():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(5)))
    bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_blocks(a)
    assert not bm.reset_prefix_cache()
    bm.free_blocks(a)
    assert bm.reset_prefix_cache() and bm.cached == {}


def test_decoded_blocks_enter_the_prefix_cache_as_they_fill_and_again_after_preemption():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(6)))
    assert bm.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    bm.cache_blocks(a)
    assert a.num_cached_blocks == 1 and len(bm.cached) == 1
    for token in (50, 51):                     # two decode steps fill the second block
        a.append_output_token(token)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        bm.cache_blocks(a)
    assert a.num_cached_blocks == 2 and len(bm.cached) == 2
    # a request with the same 8 tokens finds both blocks (and computes its last token itself)
    b = make_request("b", list(range(6)) + [50, 51, 7])
    assert bm.get_computed_blocks(b) == a.block_ids[:2]
    # preempted, a recomputes from scratch: its new blocks are offered to the cache again
    bm.free_blocks(a)
    assert a.num_cached_blocks == 0
    computed = bm.get_computed_blocks(a)
    assert len(computed) == 1                  # (8 tokens: the last one is always computed)
    assert bm.allocate_slots(a, 8 - 4, computed) and a.num_cached_blocks == 1
    a.num_computed_tokens = 8
    bm.cache_blocks(a)
    assert a.num_cached_blocks == 2
