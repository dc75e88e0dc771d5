"""LLM.get_metrics, model_config, supported_tasks, sleep / wake_up, and the start-up heap the
engine freezes as vLLM's does."""

import gc
import mmap
import weakref

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from perfxlm import LLM, SamplingParams
from perfxlm.metrics.reader import Counter, Gauge, Histogram, Vector, get_metrics_snapshot
from tests.conftest import SMALL_KV, assert_no_leaks

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPTS = [[1, 15, 27, 300], [1, 42, 7]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_metrics_off_by_default_as_in_vllm(tiny_llm):
    with pytest.raises(AssertionError, match="Stat logging disabled"):
        tiny_llm.get_metrics()


def test_get_metrics(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, disable_log_stats=False)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    metrics = {(m.name, tuple(sorted(m.labels.items()))): m for m in llm.get_metrics()}
    by_name = {}
    for m in metrics.values():
        by_name.setdefault(m.name, []).append(m)
    assert all(name.startswith("vllm:") for name in by_name)
    (prompt_tokens,) = by_name["vllm:prompt_tokens"]
    assert isinstance(prompt_tokens, Counter) and prompt_tokens.value == sum(map(len, PROMPTS))
    assert prompt_tokens.labels["model_name"] == str(tiny_llama_dir)
    (generated,) = by_name["vllm:generation_tokens"]
    assert generated.value == 2 * GREEDY.max_tokens
    (running,) = by_name["vllm:num_requests_running"]
    assert isinstance(running, Gauge) and running.value == 0
    (ttft,) = by_name["vllm:time_to_first_token_seconds"]
    assert isinstance(ttft, Histogram) and ttft.count == 2 and ttft.buckets["+Inf"] == 2 and ttft.sum > 0
    assert list(ttft.buckets.values()) == sorted(ttft.buckets.values())  # cumulative
    assert_no_leaks(llm)


def test_reader_vector_and_labels():
    registry = CollectorRegistry()
    c = PromCounter("vllm:spec_decode_num_accepted_tokens_per_pos", "doc", ["engine", "position"], registry=registry)
    c.labels("0", "0").inc(10)
    c.labels("0", "2").inc(2)
    PromCounter("other_metric", "doc", registry=registry).inc()
    (vec,) = get_metrics_snapshot(registry)
    assert vec == Vector(name="vllm:spec_decode_num_accepted_tokens_per_pos", labels={"engine": "0"},
                         values=[10, 0, 2])


def test_model_config_and_tasks(tiny_llm, tiny_llama_dir):
    cfg = tiny_llm.llm_engine.model_config
    assert cfg.max_model_len == 512 and cfg.dtype == torch.float32
    assert cfg.hf_config["model_type"] == "llama" and cfg.model == str(tiny_llama_dir)
    # read as vLLM's PretrainedConfig is: attributes, to_dict()
    assert cfg.hf_config.architectures == ["LlamaForCausalLM"] and cfg.hf_config.to_dict()["num_hidden_layers"] == 2
    with pytest.raises(AttributeError, match="no attribute 'not_a_key'"):
        cfg.hf_config.not_a_key
    assert tiny_llm.model_config.max_model_len == 512
    assert tiny_llm.supported_tasks == tiny_llm.llm_engine.get_supported_tasks() == ("generate",)
    assert tiny_llm.runner_type == "generate"


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_up(tiny_llama_dir, level):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    rss = _rss_bytes()
    llm.sleep(level=level)
    assert llm.llm_engine.is_sleeping()
    # the cpu plugin's KV cache pages (SMALL_KV bytes) go back to the OS; allow for noise
    assert rss - _rss_bytes() > SMALL_KV // 2
    with pytest.raises(RuntimeError, match="sleeping"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert_no_leaks(llm)
    assert llm.wake_up() is True and not llm.llm_engine.is_sleeping()
    after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert after == before
    assert_no_leaks(llm)


def test_wake_up_by_tags_and_level_0(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm.sleep(level=2)
    assert llm.wake_up(["kv_cache"]) is False        # weights still asleep
    with pytest.raises(RuntimeError, match="sleeping"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.wake_up(["weights"]) is True
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    llm.sleep(level=0)                               # pause only
    with pytest.raises(RuntimeError, match="sleeping"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.wake_up(["scheduling"]) is True
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    with pytest.raises(ValueError, match="Invalid sleep level 3"):
        llm.sleep(level=3)
    with pytest.raises(ValueError, match="Invalid pause mode"):
        llm.sleep(mode="later")
    assert not llm.llm_engine.is_sleeping()
    assert_no_leaks(llm)


def test_sleep_aborts_running_requests(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    engine = llm.llm_engine
    engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=50))
    engine.step()
    with pytest.raises(RuntimeError, match="finish or abort them first"):
        engine.sleep(level=1, mode="keep")
    engine.sleep(level=1)                            # mode="abort"
    assert not engine.has_unfinished_requests()
    assert engine.wake_up() is True
    assert_no_leaks(llm)


def test_engine_heap_frozen_after_start_up_as_in_vllm(tiny_llm):
    """The engine's long-lived objects are out of the collector's generations, so no full
    collection walks them between steps."""
    engine = tiny_llm.llm_engine
    assert gc.get_freeze_count() > 0
    tracked = gc.get_objects()
    assert not any(o is engine.scheduler or o is engine.runner for o in tracked)


def test_frozen_engine_still_freed_when_dropped(tiny_llama_dir):
    """Frozen objects are only skipped by the cycle collector: an engine no cycle holds goes with
    its last reference, weights and KV cache included."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    engine = weakref.ref(llm.llm_engine)
    del llm
    assert engine() is None
