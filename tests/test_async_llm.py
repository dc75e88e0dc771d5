"""The streaming engine API: LLMEngine.step() under each output_kind, and AsyncLLM (generate as an
async generator, abort, cancel, requests joining a running batch, a dead engine), on the tiny
random Llama in float32 whose greedy outputs LLM.generate gives."""

import asyncio

import pytest

from perfxlm import AsyncEngineArgs, AsyncLLM, AsyncLLMEngine, SamplingParams
from perfxlm.exceptions import EngineDeadError, VLLMValidationError
from perfxlm.sampling_params import RequestOutputKind
from tests.conftest import SMALL_KV, assert_no_leaks

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(40, 90))]  # the last is prefilled in chunks below


def run_engine(engine, params_by_id):
    """Add each (id -> (prompt, params)), step to the end; outputs per request in order."""
    for rid, (prompt, params) in params_by_id.items():
        engine.add_request(rid, prompt, params)
    seen = {rid: [] for rid in params_by_id}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return seen


@pytest.fixture(scope="module")
def chunked_llm(tiny_llama_dir):
    """Chunks of 16 tokens: the 50-token prompt takes several steps that emit nothing."""
    from perfxlm import LLM
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_num_batched_tokens=16,
              max_num_seqs=4, max_model_len=256)
    yield llm
    assert_no_leaks(llm)


def greedy(kind, max_tokens=12, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, output_kind=kind, **kw)


def test_step_output_kinds_agree(chunked_llm):
    engine = chunked_llm.llm_engine
    final = run_engine(engine, {f"f{i}": (p, greedy(FINAL_ONLY)) for i, p in enumerate(PROMPTS)})
    cumulative = run_engine(engine, {f"c{i}": (p, greedy(CUMULATIVE)) for i, p in enumerate(PROMPTS)})
    delta = run_engine(engine, {f"d{i}": (p, greedy(DELTA)) for i, p in enumerate(PROMPTS)})
    for i in range(len(PROMPTS)):
        (whole,) = final[f"f{i}"]  # FINAL_ONLY: exactly one output, at the end
        assert whole.finished and len(whole.outputs[0].token_ids) == 12
        cum, dl = cumulative[f"c{i}"], delta[f"d{i}"]
        # one output per generated token: prefill-only chunk steps emit nothing
        assert len(cum) == len(dl) == 12
        assert [o.finished for o in cum] == [False] * 11 + [True]
        assert [len(o.outputs[0].token_ids) for o in cum] == list(range(1, 13))  # all so far
        assert all(len(o.outputs[0].token_ids) == 1 for o in dl)                 # only the new one
        assert cum[-1].outputs[0].token_ids == whole.outputs[0].token_ids
        assert cum[-1].outputs[0].text == whole.outputs[0].text
        assert [t for o in dl for t in o.outputs[0].token_ids] == whole.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in dl) == whole.outputs[0].text
        assert [o.outputs[0].finish_reason for o in dl] == [None] * 11 + ["length"]
    assert_no_leaks(chunked_llm)


def test_delta_holds_back_text_that_may_start_a_stop_string(chunked_llm):
    engine = chunked_llm.llm_engine
    (whole,) = run_engine(engine, {"w": (PROMPTS[0], greedy(FINAL_ONLY, 16))})["w"]
    text = whole.outputs[0].text
    stop = text[4:9]  # a 5-character stop string found in the middle of the greedy text
    assert len(stop) == 5 and stop.strip()
    (stopped,) = run_engine(engine, {"s": (PROMPTS[0], greedy(FINAL_ONLY, 16, stop=[stop]))})["s"]
    assert stopped.outputs[0].text == text[:text.index(stop)]
    dl = run_engine(engine, {"d": (PROMPTS[0], greedy(DELTA, 16, stop=[stop]))})["d"]
    # no piece of the stop string was ever sent, although its first characters arrived steps earlier
    assert "".join(o.outputs[0].text for o in dl) == stopped.outputs[0].text
    assert dl[-1].outputs[0].finish_reason == "stop" and dl[-1].outputs[0].stop_reason == stop


def test_delta_logprobs_and_prompt_logprobs_are_sent_once(chunked_llm):
    engine = chunked_llm.llm_engine
    params = dict(logprobs=2, prompt_logprobs=1)
    (whole,) = run_engine(engine, {"f": (PROMPTS[2], greedy(FINAL_ONLY, 5, **params))})["f"]
    dl = run_engine(engine, {"d": (PROMPTS[2], greedy(DELTA, 5, **params))})["d"]
    assert dl[0].prompt_logprobs is not None and len(dl[0].prompt_logprobs) == len(PROMPTS[2])
    assert all(o.prompt_logprobs is None for o in dl[1:])
    assert [lp for o in dl for lp in o.outputs[0].logprobs] == whole.outputs[0].logprobs
    assert dl[-1].outputs[0].cumulative_logprob == pytest.approx(whole.outputs[0].cumulative_logprob)


def test_n_children_stream_as_they_are_updated(chunked_llm):
    engine = chunked_llm.llm_engine
    params = SamplingParams(n=3, seed=7, max_tokens=6, output_kind=DELTA)
    dl = run_engine(engine, {"n": (PROMPTS[0], params)})["n"]
    params = SamplingParams(n=3, seed=7, max_tokens=6, output_kind=FINAL_ONLY)
    (whole,) = run_engine(engine, {"n": (PROMPTS[0], params)})["n"]
    for c in whole.outputs:
        got = [t for o in dl for out in o.outputs if out.index == c.index for t in out.token_ids]
        assert got == c.token_ids
    assert dl[-1].finished and sum(o.finished for o in dl) == 1


def test_add_request_takes_text_and_prompt_dicts(chunked_llm, smol_tokenizer):
    engine = chunked_llm.llm_engine
    ids = smol_tokenizer.encode("The capital of France is")
    outs = run_engine(engine, {"text": ("The capital of France is", greedy(FINAL_ONLY, 4)),
                               "textp": ({"prompt": "The capital of France is"}, greedy(FINAL_ONLY, 4)),
                               "tokens": ({"prompt_token_ids": ids}, greedy(FINAL_ONLY, 4))})
    assert outs["text"][0].prompt == "The capital of France is" and outs["text"][0].prompt_token_ids == ids
    assert outs["text"][0].outputs[0].token_ids == outs["textp"][0].outputs[0].token_ids \
        == outs["tokens"][0].outputs[0].token_ids
    with pytest.raises(TypeError, match="request_id must be a string"):
        engine.add_request(7, "hi", greedy(FINAL_ONLY))
    assert_no_leaks(chunked_llm)


# ---- AsyncLLM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_llm(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=256,
        max_num_batched_tokens=16, disable_log_stats=True))
    yield engine
    engine.shutdown()


def assert_engine_clean(async_llm):
    engine = async_llm.engine
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert async_llm.get_num_unfinished_requests() == 0


async def settle(async_llm):
    """Wait for the engine loop to run what was queued (an abort is a command like any other):
    the request gone and its blocks freed (the engine thread does both in one call)."""
    engine = async_llm.engine
    for _ in range(1000):
        if not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks:
            return
        await asyncio.sleep(0.01)


async def collect(engine, prompt, params, rid):
    return [out async for out in engine.generate(prompt, params, rid)]


def test_async_generate_matches_llm(async_llm, chunked_llm):
    expected = chunked_llm.generate(PROMPTS, greedy(FINAL_ONLY), use_tqdm=False)

    async def main():
        return await asyncio.gather(*(collect(async_llm, p, greedy(DELTA), f"r{i}") for i, p in enumerate(PROMPTS)))

    streams = asyncio.run(main())
    for want, stream in zip(expected, streams):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert all(o.request_id == stream[0].request_id for o in stream)
        assert [t for o in stream for t in o.outputs[0].token_ids] == want.outputs[0].token_ids
        assert "".join(o.outputs[0].text for o in stream) == want.outputs[0].text
    assert AsyncLLMEngine is AsyncLLM
    assert_engine_clean(async_llm)


def test_async_abort_ends_the_stream_and_frees_blocks(async_llm):
    async def main():
        outs = []
        async for out in async_llm.generate(PROMPTS[0], greedy(DELTA, 250), "to-abort"):
            outs.append(out)
            if len(outs) == 3:
                await async_llm.abort("to-abort")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert 3 <= sum(len(o.outputs[0].token_ids) for o in outs) < 250
    assert_engine_clean(async_llm)


def test_async_cancel_and_aclose_abort(async_llm):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in async_llm.generate(PROMPTS[1], greedy(DELTA, 200), "to-cancel"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gen = async_llm.generate(PROMPTS[1], greedy(DELTA, 200), "to-close")
        await gen.__anext__()
        await gen.aclose()
        await settle(async_llm)

    asyncio.run(main())
    assert_engine_clean(async_llm)


def test_async_requests_join_a_running_batch(async_llm):
    """A request added while another streams gets its tokens before the first one ends."""
    async def main():
        events = []

        async def run(rid, prompt, n):
            async for out in async_llm.generate(prompt, greedy(DELTA, n), rid):
                events.append((rid, out.finished))

        first = asyncio.create_task(run("long", PROMPTS[0], 250))
        while len(events) < 5:
            await asyncio.sleep(0.005)
        await run("short", PROMPTS[1], 4)
        await first
        return events

    events = asyncio.run(main())
    short_done = events.index(("short", True))
    assert ("long", True) in events[short_done:]  # the long one was still running then
    assert_engine_clean(async_llm)


def test_async_bad_request_fails_first_and_alone(async_llm):
    async def main():
        good = asyncio.create_task(collect(async_llm, PROMPTS[0], greedy(FINAL_ONLY, 8), "good"))
        with pytest.raises(VLLMValidationError, match="out of vocabulary"):
            await collect(async_llm, [5, 10**7], greedy(FINAL_ONLY), "bad")
        with pytest.raises(VLLMValidationError, match="longer than the maximum model length"):
            await collect(async_llm, list(range(300)), greedy(FINAL_ONLY), "too-long")
        with pytest.raises(ValueError, match="temperature"):
            await collect(async_llm, PROMPTS[0], SamplingParams(temperature=-1), "bad-params")
        return await good

    (out,) = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 8
    assert_engine_clean(async_llm)


def test_async_duplicate_ids_and_abort_by_id(async_llm):
    async def main():
        a = asyncio.create_task(collect(async_llm, PROMPTS[0], greedy(DELTA, 300), "same"))
        b = asyncio.create_task(collect(async_llm, PROMPTS[1], greedy(DELTA, 300), "same"))
        while async_llm.get_num_unfinished_requests() < 2 or not async_llm.engine.requests:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        await async_llm.abort("same")  # both requests sent with that id
        return await a, await b

    for outs in asyncio.run(main()):
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert_engine_clean(async_llm)


def test_dead_engine_fails_requests_and_health(tiny_llama_dir):
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=256,
        disable_log_stats=True))

    def broken_step():
        raise RuntimeError("kernel fault")

    engine.engine.step = broken_step

    async def main():
        with pytest.raises(EngineDeadError, match="kernel fault"):
            await collect(engine, PROMPTS[0], greedy(FINAL_ONLY), "x")
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPTS[0], greedy(FINAL_ONLY), "y")

    asyncio.run(main())
    assert engine.errored and not engine.is_running
    engine.shutdown()


def test_async_streaming_example_runs(tiny_llama_dir):
    """examples/async_llm_streaming.py is a vLLM AsyncLLMEngine app with only the import changed."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    example = Path(__file__).resolve().parent.parent / "examples" / "async_llm_streaming.py"
    assert "import perfxlm" not in example.read_text() and "from perfxlm import AsyncLLMEngine" in example.read_text()
    out = subprocess.run([sys.executable, str(example), "--model", str(tiny_llama_dir), "--abort-after", "3",
                          "--max-tokens", "400"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    aborted = re.search(r"^\[aborted\] (\d+) tokens, finish_reason=abort: ", out.stdout, re.M)
    # the abort joins the engine's queue: a step already running may still add a token or two
    assert aborted and 3 <= int(aborted.group(1)) < 400, out.stdout
    assert re.search(r"^\[full\] \d+ tokens, finish_reason=(stop|length): ", out.stdout, re.M), out.stdout


def test_engine_args_from_the_command_line(tiny_llama_dir):
    """vLLM's engine flags: override_generation_config reaches the defaults, priority scheduling is refused."""
    import argparse

    from perfxlm.engine.arg_utils import EngineArgs, UsageContext
    parser = AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--max-model-len", "0.5K", "--override-generation-config", '{"temperature": 0.25}',
                            "--no-enable-prefix-caching", "--dtype", "float32"])
    args = AsyncEngineArgs.from_cli_args(ns)
    args.model = str(tiny_llama_dir)
    assert (args.max_model_len, args.enable_prefix_caching) == (512, False)
    config, _ = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (128, 2048)  # the server's defaults
    assert config.override_generation_config == {"temperature": 0.25}
    from perfxlm import LLM
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV,
              override_generation_config={"temperature": 0.25, "max_new_tokens": 7})
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.max_tokens) == (0.25, 7)
    with pytest.raises(NotImplementedError, match="scheduling_policy='priority'"):
        EngineArgs(model=str(tiny_llama_dir), scheduling_policy="priority").create_engine_config()
    with pytest.raises(SystemExit):
        parser.parse_args(["--override-generation-config", "[1]"])
    with pytest.raises(ValueError, match="override_generation_config must be a dict, got 'temperature=0'"):
        EngineArgs(model=str(tiny_llama_dir), override_generation_config="temperature=0").create_engine_config()
    with pytest.raises(ValueError, match="stream_interval must be an integer of at least 1, got 0"):
        AsyncEngineArgs(model=str(tiny_llama_dir), stream_interval=0).create_engine_config()


def test_kv_cache_dtype_from_the_command_line(tiny_llama_dir, capsys):
    """--kv-cache-dtype (vLLM's flag) picks the caches' dtype; a bf16 model's is bf16 by default."""
    import argparse

    import torch

    parser = AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    for flags, cache in (([], torch.bfloat16), (["--kv-cache-dtype", "float32"], torch.float32)):
        args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--dtype", "bfloat16", *flags]))
        args.model = str(tiny_llama_dir)
        config, _ = args.create_engine_config()
        assert config.cache_dtype == cache
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_stream_interval_batches_tokens_per_output(async_llm, chunked_llm):
    (want,) = chunked_llm.generate([PROMPTS[0]], greedy(FINAL_ONLY, 10), use_tqdm=False)
    outs = asyncio.run(collect(async_llm, PROMPTS[0], greedy(DELTA, 10, stream_interval=4), "interval"))
    sizes = [len(o.outputs[0].token_ids) for o in outs]
    # the first output at once (one token, or a few the engine made while the consumer lagged),
    # then at least 4 a time, the rest at the end
    assert 2 <= len(outs) <= 4 and sizes[0] < 10 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 10, sizes
    assert outs[-1].finished
    assert [t for o in outs for t in o.outputs[0].token_ids] == want.outputs[0].token_ids
    assert_engine_clean(async_llm)
