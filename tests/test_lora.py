"""LoRA: PEFT adapters on a tiny random Llama, each request with its own adapter (or none) in
one batch. The reference is transformers + PEFT with the adapter merged into the weights; ours
never merges: the LoRA op adds each row's low-rank product on the plugin."""

import json
from pathlib import Path

import pytest
import torch

from perfxlm import LLM, SamplingParams
from perfxlm.lora.request import LoRARequest
from tests.conftest import SMALL_KV, assert_no_leaks

peft = pytest.importorskip("peft", reason="peft (the reference LoRA implementation) is not installed")

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4 5 6",
           "A longer prompt that spans more than one KV block of sixteen tokens, so prefill crosses blocks."]
MAX_TOKENS = 12
TARGETS = {"attn": ["q_proj", "v_proj", "o_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_adapter(base_dir: Path, out: Path, targets: list[str], rank: int, alpha: int, seed: int,
                 rslora: bool = False) -> Path:
    """A PEFT adapter with random A and B (PEFT zeroes B by default: the adapter would do nothing)."""
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                          use_rslora=rslora)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def reference(base_dir: Path, adapter: Path | None, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy tokens from transformers with the adapter merged into the weights."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    outs = []
    for ids in prompt_ids:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
        outs.append(gen[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"a": make_adapter(tiny_llama_dir, root / "a", TARGETS["attn"], rank=4, alpha=8, seed=1),
            "b": make_adapter(tiny_llama_dir, root / "b", TARGETS["all"], rank=8, alpha=16, seed=2, rslora=True)}


@pytest.fixture(scope="module")
def lora_llm(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, enable_lora=True,
              max_loras=2, max_lora_rank=8)
    yield llm
    assert_no_leaks(llm)


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_a_mixed_batch_gives_each_row_its_own_adapter(lora_llm, tiny_llama_dir, adapters):
    tok = lora_llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    req = {"a": LoRARequest("a", 1, str(adapters["a"])), "b": LoRARequest("b", 2, str(adapters["b"])), None: None}
    plan = ["a", None, "b", "a", "b", None, None, "b"]  # two adapters and the base model, interleaved
    prompts = [ids[i % len(ids)] for i in range(len(plan))]
    outs = lora_llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(),
                             lora_request=[req[k] for k in plan], use_tqdm=False)
    want = {k: reference(tiny_llama_dir, adapters[k] if k else None, ids) for k in ("a", "b", None)}
    for i, (k, out) in enumerate(zip(plan, outs)):
        assert list(out.outputs[0].token_ids) == want[k][i % len(ids)], (i, k)
        assert out.lora_request == req[k]
    # the adapters change the output (else the test could not tell them apart)
    assert want["a"] != want[None] and want["b"] != want[None] and want["a"] != want["b"]


def test_one_adapter_for_every_prompt_and_chat(lora_llm, tiny_llama_dir, adapters):
    tok = lora_llm.get_tokenizer()
    lora = LoRARequest("a", 1, str(adapters["a"]))
    outs = lora_llm.generate(PROMPTS, greedy(), lora_request=lora, use_tqdm=False)
    want = reference(tiny_llama_dir, adapters["a"], [tok.encode(p) for p in PROMPTS])
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    chat = lora_llm.chat([{"role": "user", "content": "Hi there"}], greedy(), lora_request=lora, use_tqdm=False)
    assert chat[0].lora_request == lora and len(chat[0].outputs[0].token_ids) == MAX_TOKENS


def test_more_adapters_than_slots_take_turns(lora_llm, tiny_llama_dir, adapters, tmp_path):
    """max_loras=2: a third adapter waits until a slot is free, and every row still gets its own."""
    c = make_adapter(tiny_llama_dir, tmp_path / "c", TARGETS["attn"], rank=2, alpha=2, seed=3)
    tok = lora_llm.get_tokenizer()
    reqs = [LoRARequest("a", 1, str(adapters["a"])), LoRARequest("b", 2, str(adapters["b"])),
            LoRARequest("c", 3, str(c))]
    outs = lora_llm.generate([PROMPTS[0]] * 3, greedy(), lora_request=reqs, use_tqdm=False)
    ids = [tok.encode(PROMPTS[0])]
    for r, path, out in zip(reqs, [adapters["a"], adapters["b"], c], outs):
        assert list(out.outputs[0].token_ids) == reference(tiny_llama_dir, path, ids)[0], r.lora_name


def test_bad_adapters_fail_early_and_leave_the_engine_clean(lora_llm, adapters, tmp_path, tiny_llama_dir):
    big = make_adapter(tiny_llama_dir, tmp_path / "big", TARGETS["attn"], rank=16, alpha=16, seed=4)
    with pytest.raises(ValueError, match="LoRA rank 16 is greater than max_lora_rank 8"):
        lora_llm.generate(PROMPTS, greedy(), lora_request=LoRARequest("big", 9, str(big)), use_tqdm=False)
    with pytest.raises(ValueError, match="adapter_config.json"):
        lora_llm.generate(PROMPTS[0], greedy(), lora_request=LoRARequest("nope", 10, str(tmp_path)), use_tqdm=False)
    cfg = json.loads((adapters["a"] / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        lora_llm.generate(PROMPTS[0], greedy(), lora_request=LoRARequest("dora", 11, str(dora)), use_tqdm=False)
    assert not lora_llm.llm_engine.has_unfinished_requests()
    out = lora_llm.generate(PROMPTS[0], greedy(), use_tqdm=False)  # still serves
    assert len(out[0].outputs[0].token_ids) == MAX_TOKENS


def test_lora_request_validation_matches_vllm():
    with pytest.raises(ValueError, match="id must be > 0, got 0"):
        LoRARequest("x", 0, "/tmp/x")
    with pytest.raises(ValueError, match="lora_path cannot be empty"):
        LoRARequest("x", 1, "")
    assert LoRARequest("x", 1, "/a") == LoRARequest("x", 2, "/b")  # vLLM compares adapters by name


def test_lora_off_refuses_a_lora_request(tiny_llm, adapters):
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        tiny_llm.generate(PROMPTS[0], greedy(), lora_request=LoRARequest("a", 1, str(adapters["a"])), use_tqdm=False)


def test_lora_config_validation(tiny_llama_dir):
    with pytest.raises(ValueError, match="max_lora_rank"):
        LLM(str(tiny_llama_dir), enable_lora=True, max_lora_rank=7)
    with pytest.raises(ValueError, match="max_loras"):
        LLM(str(tiny_llama_dir), enable_lora=True, max_loras=0)


def test_async_llm_streams_with_an_adapter(tiny_llama_dir, adapters):
    """AsyncLLM (the server's engine) runs a request with its adapter, as LLM.generate does, and
    refuses a bad adapter before streaming anything."""
    import asyncio

    from perfxlm import AsyncEngineArgs, AsyncLLM
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV, enable_lora=True,
        max_lora_rank=8, disable_log_stats=True))
    tok = engine.engine.tokenizer
    lora = LoRARequest("a", 1, str(adapters["a"]))

    async def run(request_id: str, lora_request: LoRARequest) -> list[int]:
        last = None
        async for out in engine.generate({"prompt_token_ids": tok.encode(PROMPTS[1])}, greedy(), request_id,
                                         lora_request=lora_request):
            last = out
        return list(last.outputs[0].token_ids)

    try:
        got = asyncio.run(run("r1", lora))
        assert got == reference(tiny_llama_dir, adapters["a"], [tok.encode(PROMPTS[1])])[0]
        with pytest.raises(ValueError, match="adapter_config.json"):
            asyncio.run(run("r2", LoRARequest("bad", 5, str(tiny_llama_dir))))
    finally:
        engine.shutdown()
