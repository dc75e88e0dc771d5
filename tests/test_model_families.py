"""A model family is one file: a toy family defined in tests/toy_family.py and registered
with one line exports, runs on the cpu plugin, and matches its own eager forward; and
models that cannot be loaded are refused before any weight is read, naming what is wrong."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from graph_export.export import export_model, op_histogram
from graph_export.ops import OPTIONAL_GRAPH_INPUTS
from perfxlm import LLM, SamplingParams
from perfxlm.models.loader import ModelSource, resolve_model
from perfxlm.models import registry
from perfxlm.models.registry import ModelRegistry
from tests.conftest import assert_no_leaks
from tests.toy_family import ToyForCausalLM


@pytest.fixture(scope="module")
def toy_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama's weights plus a random skip projection per layer, as an HF directory."""
    out = tmp_path_factory.mktemp("toy")
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["architectures"] = ["ToyForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    state = {k: v for f in tiny_llama_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    gen = torch.Generator().manual_seed(1)
    for i in range(config["num_hidden_layers"]):
        d = config["hidden_size"]
        state[f"model.layers.{i}.mlp.skip_proj.weight"] = torch.randn(d, d, generator=gen) * 0.2
    save_file(state, out / "model.safetensors")
    return out


def test_a_new_family_is_one_file_and_one_registry_line(toy_dir, monkeypatch):
    with pytest.raises(ValueError, match=r"\['ToyForCausalLM'\] are not supported"):
        resolve_model(str(toy_dir))
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # this test's registrations end with it
    ModelRegistry.register_model("ToyForCausalLM", ToyForCausalLM)  # the registry line
    model = resolve_model(str(toy_dir)).load_weights(torch.float32)
    hist = op_histogram(export_model(model))
    assert hist["Linear"] == 8 * len(model.layers) + 1 and len(hist) == 7  # the skip path: one Linear more a layer

    prompts = ["a toy family", "runs on the cpu plugin as its eager forward does, token for token"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    graph = LLM(str(toy_dir), dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert {n.plugin.name for n in graph.llm_engine.runner.executor.runner.nodes} == {"cpu"}
    got = graph.generate(prompts, params, use_tqdm=False)
    assert_no_leaks(graph)
    monkeypatch.setenv("PERFXLM_EXECUTOR", "eager")
    want = LLM(str(toy_dir), dtype="float32", kv_cache_memory_bytes=8 << 20).generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)
    assert len({tuple(o.outputs[0].token_ids) for o in got}) == 2  # the prompts lead somewhere different


def test_the_exporter_knows_no_layer_or_weight_name(tiny_llama_dir):
    from pathlib import Path
    model = resolve_model(str(tiny_llama_dir)).load_weights(torch.float32)
    # 'layers.0.attention.wq.weight' -> 'attention.wq.weight'; 'tok_embeddings.weight' as it is
    names = {n.split(".", 2)[2] if n.startswith("layers.") else n for n, _ in model.named_parameters()}
    assert {"attention.wq.weight", "feed_forward.w1.weight", "tok_embeddings.weight"} <= names
    for path in (Path(__file__).parents[1] / "graph_export").glob("*.py"):
        text = path.read_text()
        assert "layers." not in text and not [n for n in names if n in text], path


def _hf_dir(tmp_path, tiny_llama_dir, **config_changes):
    out = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, out)
    config = json.loads((out / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def no_weight_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the bad model was refused")
    monkeypatch.setattr(ModelSource, "load_weights", refuse)


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["FalconForCausalLM"], "intermediate_size": None},
     r"config.json: Model architectures \['FalconForCausalLM'\] are not supported by perfxlm. Supported architectures"),
    ({"num_attention_heads": None},
     r"config.json: the config has no 'num_attention_heads', which LlamaForCausalLM needs"),
    ({"rope_scaling": {"rope_type": "fancy", "factor": 2.0}}, r"rope_scaling type 'fancy' is not supported"),
])
def test_unloadable_configs_are_refused_by_name(tmp_path, tiny_llama_dir, no_weight_reads, changes, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(_hf_dir(tmp_path, tiny_llama_dir, **changes)), dtype="float32")


def test_a_malformed_config_file_names_the_file(tmp_path, tiny_llama_dir, no_weight_reads):
    path = _hf_dir(tmp_path, tiny_llama_dir)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a readable JSON file"):
        LLM(str(path))


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_gguf_says_so(gguf_path, tmp_path, keep):
    data = gguf_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"cut.gguf (is truncated: tensor \S+ ends at byte|is not a readable GGUF)"):
        LLM(str(cut))


@pytest.mark.parametrize("prompt, message", [
    ([], "The decoder prompt cannot be empty"),
    ([5, 10**7], "Token id 10000000 is out of vocabulary"),
    ([5, 49152], "Token id 49152 is out of vocabulary"),
])
def test_engine_add_request_validates_as_llm_does(tiny_llm, prompt, message):
    from perfxlm.exceptions import VLLMValidationError
    engine = tiny_llm.llm_engine
    with pytest.raises(VLLMValidationError, match=message):
        engine.add_request("direct", prompt, SamplingParams(max_tokens=2))
    assert_no_leaks(tiny_llm)
    engine.add_request("direct", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(ValueError, match="Request id 'direct' is already running"):
        engine.add_request("direct", [5, 6, 7], SamplingParams(max_tokens=2))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2]  # CUMULATIVE: one output per token
    assert_no_leaks(tiny_llm)


def test_recorded_graph_and_eager_forward_give_the_same_logits(tiny_llama_dir, tmp_path):
    """The graph on the torch plugin runs the very functions the model calls: the same bits."""
    from graph_export.export import save_model
    from graph_export.functional import StepInputs
    from hw_plugins.torch_ref import TorchPlugin
    from perfxlm.engine.graph_runner import GraphRunner
    from perfxlm.engine.eager_executor import EagerExecutor, model_spec
    model = resolve_model(str(tiny_llama_dir)).load_weights(torch.float32)
    # The checkpoint's tensors sit 8 bytes off 64 in its file; MKL's one-row fp32 GEMM (the decode
    # step) rounds by the weight's address on AMD CPUs, so the same bits need aligned weights.
    assert [n for n, p in model.named_parameters() if p.data_ptr() % 64] == []
    save_model(export_model(model), tmp_path / "g.onnx")
    runner = GraphRunner(tmp_path / "g.onnx", TorchPlugin(), TorchPlugin(), 64, 8, 16)
    eager = EagerExecutor(model, model_spec(model, torch.float32), 8, 16)
    ids = [5, 17, 300, 41, 9, 77, 2024]
    steps = [  # a 7-token prefill, then one decode step (its logits over the cache the prefill wrote)
        dict(input_ids=ids, positions=range(7), slot_mapping=range(7), seq_lens=[7], query_start_loc=[0, 7],
             logits_indices=range(7)),
        dict(input_ids=[11], positions=[7], slot_mapping=[7], seq_lens=[8], query_start_loc=[0, 1], logits_indices=[0]),
    ]
    for step in steps:
        feeds = {k: np.array(list(v), np.int64) for k, v in step.items()}
        feeds["block_tables"] = np.array([[0]], np.int64)
        got, want = runner.run(feeds), eager(feeds)
        assert got.shape == (len(feeds["logits_indices"]), model.vocab_size)
        np.testing.assert_array_equal(got, want)
    assert StepInputs.__dataclass_fields__.keys() == set(feeds) | set(OPTIONAL_GRAPH_INPUTS)


def test_weights_that_do_not_fit_the_config_name_the_file(tmp_path, tiny_llama_dir):
    path = _hf_dir(tmp_path, tiny_llama_dir, intermediate_size=96)  # the checkpoint's MLP is 128 wide
    with pytest.raises(ValueError, match=r"model: layers.0.feed_forward.w1.weight has shape \(128, 64\) but "
                                         r"LlamaForCausalLM expects \(96, 64\) from the config"):
        resolve_model(str(path)).load_weights(torch.float32)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        resolve_model(str(path)).load_weights(torch.float32)


def test_a_kv_budget_too_small_fails_before_weights_are_read(tiny_llama_dir, no_weight_reads):
    with pytest.raises(ValueError, match=r"KV cache is needed, which is larger than the available KV cache memory"):
        LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=4096)


def test_tracing_in_one_thread_records_nothing_of_another():
    import threading

    from graph_export import functional as F

    class Recorder:
        def __init__(self) -> None:
            self.ops: list[str] = []

        def record(self, op_type, inputs, outputs, **attrs) -> None:
            self.ops.append(op_type)

    mine, x = Recorder(), torch.ones(2, 4)
    token = F.tracer.set(mine)
    try:
        other = threading.Thread(target=lambda: F.add(x, x))  # e.g. an eager engine in another thread
        other.start()
        other.join()
        F.silu_mul(x, x)
    finally:
        F.tracer.reset(token)
    assert mine.ops == ["SiluMul"]
