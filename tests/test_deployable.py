"""A deployable directory (`perfxlm export MODEL -o DIR`) served with no PyTorch: the embedded
SmolLM2 exported in float32, then LLM.generate / chat / a seeded sample in a fresh process
where importing torch, transformers or tokenizers raises, against the normal path (the GGUF
through torch's export, transformers' tokenizer)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perfxlm import LLM, SamplingParams
from tests.conftest import SMALL_KV

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is 2 + 3? Answer briefly."}]
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = dict(temperature=0.9, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
LOGPROBS = dict(temperature=0, max_tokens=4, logprobs=3, repetition_penalty=1.3)

# Run in the torch-free process: a meta-path finder refuses the three packages, as a RISC-V
# board's Python (which has none of them) would.
TORCH_FREE = r"""
import json, sys
BLOCKED = ("torch", "transformers", "tokenizers")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Blocker())
from perfxlm import LLM, SamplingParams
from perfxlm.exceptions import VLLMValidationError
from perfxlm.sampling_params import StructuredOutputsParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["dir"], kv_cache_memory_bytes=args["kv"], max_model_len=1024)
greedy = llm.generate(args["prompts"], SamplingParams(**args["greedy"]), use_tqdm=False)
seeded = llm.generate(args["prompts"][:1], SamplingParams(**args["seeded"]), use_tqdm=False)
chat = llm.chat(args["chat"], SamplingParams(**args["greedy"]), use_tqdm=False)
lp = llm.generate(args["prompts"][:1], SamplingParams(**args["logprobs"]), use_tqdm=False)[0].outputs[0]
try:
    llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="[ab]+")), use_tqdm=False)
    refused = ""
except VLLMValidationError as e:
    refused = str(e)
print(json.dumps({
    "greedy": [o.outputs[0].token_ids for o in greedy], "text": [o.outputs[0].text for o in greedy],
    "seeded": seeded[0].outputs[0].token_ids, "chat": chat[0].outputs[0].text,
    "chat_prompt": chat[0].prompt_token_ids,
    "logprobs": [{str(k): [v.logprob, v.rank] for k, v in d.items()} for d in lp.logprobs],
    "structured": refused,
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


@pytest.fixture(scope="module")
def deploy_dir(smol_deploy_dir) -> Path:
    return smol_deploy_dir


@pytest.fixture(scope="module")
def torch_free(deploy_dir) -> dict:
    args = {"dir": str(deploy_dir), "kv": SMALL_KV, "prompts": PROMPTS, "chat": CHAT, "greedy": GREEDY,
            "seeded": SEEDED, "logprobs": LOGPROBS}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERFXLM_CONFIGURE_LOGGING": "0"}
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_directory_holds_what_the_engine_reads(deploy_dir, gguf_path):
    names = {p.name for p in deploy_dir.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.jinja", "config.json", "generation_config.json", "perfxlm.json"} <= names
    meta = json.loads((deploy_dir / "perfxlm.json").read_text())
    assert meta["dtype"] == "float32" and meta["quantization"] is None and meta["format_version"] == 1
    assert meta["family"] == "LlamaForCausalLM" and meta["pooling_task"] is None
    from perfxlm.models.gguf_file import GGUFFile
    assert json.loads((deploy_dir / "config.json").read_text())["vocab_size"] == \
        GGUFFile(gguf_path).hf_config()["vocab_size"]


def test_torch_free_process_imports_none_of_torch_transformers_tokenizers(torch_free):
    assert torch_free["imported"] == []


def test_torch_free_greedy_chat_seeded_and_logprobs_match_the_normal_path(torch_free, smol_llm):
    greedy = smol_llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)
    assert torch_free["greedy"] == [o.outputs[0].token_ids for o in greedy]
    assert torch_free["text"] == [o.outputs[0].text for o in greedy]
    seeded = smol_llm.generate(PROMPTS[:1], SamplingParams(**SEEDED), use_tqdm=False)
    assert torch_free["seeded"] == seeded[0].outputs[0].token_ids
    chat = smol_llm.chat(CHAT, SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert torch_free["chat_prompt"] == chat.prompt_token_ids  # the template rendered by jinja2 alike
    assert torch_free["chat"] == chat.outputs[0].text
    lp = smol_llm.generate(PROMPTS[:1], SamplingParams(**LOGPROBS), use_tqdm=False)[0].outputs[0]
    want = [{str(k): [v.logprob, v.rank] for k, v in d.items()} for d in lp.logprobs]
    assert [d.keys() for d in torch_free["logprobs"]] == [d.keys() for d in want]
    for got, ref in zip(torch_free["logprobs"], want):
        for k in ref:
            assert got[k][1] == ref[k][1] and got[k][0] == pytest.approx(ref[k][0], abs=1e-5)


def test_structured_outputs_are_refused_naming_the_missing_package(torch_free):
    assert "xgrammar" in torch_free["structured"] and "PyTorch" in torch_free["structured"]


def test_llm_loads_the_directory_in_process_and_refuses_eager_and_other_dtypes(deploy_dir, monkeypatch):
    llm = LLM(model=str(deploy_dir), kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
    assert str(llm.llm_engine.model_config.dtype) == "torch.float32"
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="exported in float32; it cannot run in dtype 'bfloat16'"):
        LLM(model=str(deploy_dir), dtype="bfloat16", kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
    monkeypatch.setenv("PERFXLM_EXECUTOR", "eager")
    with pytest.raises(ValueError, match="deployable directory.*PERFXLM_EXECUTOR=eager"):
        LLM(model=str(deploy_dir), kv_cache_memory_bytes=SMALL_KV, max_model_len=256)


def test_bfloat16_export_keeps_bf16_weights_under_fp32_activations(gguf_path, tmp_path):
    """`perfxlm export --dtype bfloat16` records the split the engine runs (bf16 weights, fp32
    activations on the CPU plugins), loads as bfloat16, gives the checkpoint path's greedy tokens,
    and refuses another dtype naming the one it was exported in."""
    import torch

    from perfxlm.cli import main
    out = tmp_path / "smollm2-bf16"
    assert main(["export", str(gguf_path), "-o", str(out), "--dtype", "bfloat16"]) == 0
    meta = json.loads((out / "perfxlm.json").read_text())
    assert (meta["dtype"], meta["weight_dtype"]) == ("float32", "bfloat16")
    llm = LLM(model=str(out), dtype="bfloat16", kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    assert (llm.llm_engine.config.dtype, llm.llm_engine.config.weight_dtype) == (torch.float32, torch.bfloat16)
    ref = LLM(model=str(gguf_path), dtype="bfloat16", kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
    ids = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)]
    assert ids == [o.outputs[0].token_ids for o in ref.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)]
    with pytest.raises(ValueError, match="exported in bfloat16; it cannot run in dtype 'float32'"):
        LLM(model=str(out), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
    assert llm.llm_engine.config.cache_dtype == torch.bfloat16  # the graph's caches: the model's dtype
    with pytest.raises(ValueError, match="exported with a bfloat16 KV cache; it cannot run with "
                                         "kv_cache_dtype='float32'"):
        LLM(model=str(out), kv_cache_dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=256)
