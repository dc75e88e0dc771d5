"""Scheduler without a model, as vLLM's test_scheduler.py: fake sampled tokens fed to update()."""

import pytest

from perfxlm.engine.block_manager import BlockManager
from perfxlm.engine.request import Request, RequestStatus
from perfxlm.engine.scheduler import Scheduler
from perfxlm.sampling_params import SamplingParams


def make_scheduler(num_blocks=100, block_size=4, max_num_seqs=16, max_tokens_per_step=64, max_model_len=64,
                   prefix_caching=True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(bm, max_num_seqs, max_tokens_per_step, max_model_len)


def make_request(rid: str, n_prompt: int, max_tokens: int = 4, eos: int | None = None, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(rid, [int(rid) * 100 + i for i in range(n_prompt)], sp, eos, max_tokens)


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampling = [r for r, n in zip(out.requests, out.num_tokens) if r.num_computed_tokens + n == r.num_tokens]
    s.update(out, sampling, [token] * len(sampling))
    return out


def test_prefill_then_decode_then_length_stop():
    s = make_scheduler()
    reqs = [make_request(str(i), 5, max_tokens=3) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    out = run_step(s)
    assert out.num_tokens == [5, 5, 5]
    out = run_step(s)
    assert out.num_tokens == [1, 1, 1]
    run_step(s)
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in reqs)
    assert all(r.num_output_tokens == 3 for r in reqs)
    assert not s.has_unfinished_requests()
    assert s.block_manager.num_free_blocks == 100


def test_token_budget_chunks_prefill():
    s = make_scheduler(max_tokens_per_step=4)
    r = make_request("1", 10)
    s.add_request(r)
    assert run_step(s).num_tokens == [4]
    assert r.num_output_tokens == 0           # no token until the whole prompt is computed
    assert run_step(s).num_tokens == [4]
    assert run_step(s).num_tokens == [2]
    assert r.num_output_tokens == 1


def test_decodes_are_scheduled_before_new_prefills():
    s = make_scheduler(max_tokens_per_step=6)
    a = make_request("1", 5)
    s.add_request(a)
    run_step(s)
    s.add_request(make_request("2", 8))
    out = run_step(s)
    assert out.requests[0] is a and out.num_tokens == [1, 5]


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(make_request(str(i), 3))
    out = s.schedule()
    assert len(out.requests) == 2 and len(s.waiting) == 1


def test_eos_and_stop_token_ids_and_min_tokens():
    s = make_scheduler()
    eos = make_request("1", 3, max_tokens=10, eos=7)
    stop = make_request("2", 3, max_tokens=10, stop_token_ids=[7])
    late = make_request("3", 3, max_tokens=10, eos=7, min_tokens=2)
    ignore = make_request("4", 3, max_tokens=2, eos=7, ignore_eos=True)
    for r in (eos, stop, late, ignore):
        s.add_request(r)
    run_step(s, token=7)
    assert eos.status == RequestStatus.FINISHED_STOPPED and eos.stop_reason is None
    assert stop.status == RequestStatus.FINISHED_STOPPED and stop.stop_reason == 7
    assert not late.is_finished and not ignore.is_finished
    run_step(s, token=7)
    assert late.status == RequestStatus.FINISHED_STOPPED and late.num_output_tokens == 2
    assert ignore.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_max_model_len_caps_output():
    s = make_scheduler(max_model_len=8)
    r = make_request("1", 6, max_tokens=100)
    s.add_request(r)
    while s.has_unfinished_requests():
        run_step(s)
    assert r.num_tokens == 8 and r.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_preemption_frees_blocks_and_recomputes():
    # 4 blocks of 4 tokens: two 7-token prompts fit (2 blocks each) until they grow past 8 tokens
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    a, b = make_request("1", 7, max_tokens=6), make_request("2", 7, max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    run_step(s)                     # both prefilled: 8 tokens each, 7 in the cache
    assert run_step(s).preempted == []  # token 8 of each still fits its second block
    out = run_step(s)               # a needs a third block for token 9: b (latest) is preempted
    assert out.preempted == [b] and b.num_computed_tokens == 0 and s.waiting[0] is b
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == []
    while s.has_unfinished_requests():
        run_step(s)
    assert a.num_output_tokens == b.num_output_tokens == 6
    assert s.block_manager.num_free_blocks == 4


def test_finish_aborts_waiting_and_running():
    s = make_scheduler()
    a, b = make_request("1", 3), make_request("2", 3)
    s.add_request(a)
    run_step(s)
    s.add_request(b)
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests()
    assert s.block_manager.num_free_blocks == 100
    assert a.status.finish_reason() == "abort"


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_prefix_hits_cache(prefix_caching):
    s = make_scheduler(prefix_caching=prefix_caching)
    a = make_request("1", 9)
    s.add_request(a)
    run_step(s)
    b = Request("2", list(a.prompt_token_ids), SamplingParams(max_tokens=4), None, 4)
    s.add_request(b)
    out = run_step(s)
    assert b.num_cached_tokens == (8 if prefix_caching else 0)
    assert out.num_tokens[-1] == 9 - b.num_cached_tokens
