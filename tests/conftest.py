"""Shared fixtures: the embedded SmolLM2 GGUF, an HF directory built from it by
transformers, and tiny random-weight Llama/Qwen2 models built with transformers."""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOLDEN = Path(__file__).resolve().parent / "golden"  # vLLM 0.32 and transformers greedy outputs (README there)
SMALL_KV = 64 << 20  # 64 MiB of KV cache is plenty for the tests


def golden(name: str) -> dict:
    path = Path(os.environ.get("PERFXLM_GOLDEN_DIR", GOLDEN)) / name
    if not path.is_file():
        pytest.skip(f"golden file {path} is not present")
    return json.loads(path.read_text())


@pytest.fixture(scope="session", autouse=True)
def graph_cache(tmp_path_factory):
    """Graphs exported by the tests go to a temporary cache, not the user's."""
    os.environ["PERFXLM_GRAPH_CACHE"] = str(tmp_path_factory.mktemp("graphs"))


@contextlib.contextmanager
def gguf_layout_kernel_set():
    """The cpu plugin on a kernel set that keeps GGUF's row-major blocks (AVX2 where the CPU's
    own set repacks them 16 rows at a time): there quantised Linear takes int8 dot products
    for T <= 4 (and every T in batch-invariant mode) and dequantised fp32/bf16 panels above.
    The library's kernel set is per process: engines built inside keep GGUF's layout, and
    the CPU's own set comes back afterwards."""
    from hw_plugins.cpu import library
    lib = library.load()
    before = lib.pxl_isa()
    if repacks_gguf_blocks() and lib.pxl_set_isa(b"avx2") != 0:
        pytest.skip("no kernel set here keeps GGUF's block layout")
    try:
        yield
    finally:
        lib.pxl_set_isa(before)


@pytest.fixture
def gguf_layout_kernels():
    with gguf_layout_kernel_set():
        yield


def bf16_quant_activations() -> bool:
    """Whether the cpu plugin's kernel set runs GGUF blocks on bf16 x (PERFXLM_QUANT_ACTIVATIONS=bf16)."""
    from hw_plugins.cpu.plugin import CpuPlugin
    return CpuPlugin().set_quant_activations("bf16")


def repacks_gguf_blocks() -> bool:
    """Whether the cpu plugin's kernel set repacks GGUF blocks (then int8 dot products at every T)."""
    from hw_plugins.cpu import library
    return bool(library.load().pxl_packed_bytes(library.Q4_1, 16, 32))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    from perfxlm.models.default_model import embedded_gguf_path
    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smol_llm(gguf_path):
    """SmolLM2-135M-Instruct (the embedded GGUF) in float32, shared across test modules."""
    from perfxlm import LLM
    llm = LLM(str(gguf_path), dtype="float32", kv_cache_memory_bytes=SMALL_KV, max_model_len=1024)
    yield llm
    assert_no_leaks(llm)


@pytest.fixture(scope="session")
def smol_deploy_dir(gguf_path, tmp_path_factory) -> Path:
    """The embedded SmolLM2 as a float32 deployable directory (`perfxlm export GGUF -o DIR`)."""
    from perfxlm.cli import main
    out = tmp_path_factory.mktemp("deploy") / "smollm2-f32"
    assert main(["export", str(gguf_path), "-o", str(out), "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(gguf_path):
    from perfxlm.models.gguf_file import GGUFFile
    return GGUFFile(gguf_path).tokenizer()


@pytest.fixture(scope="session")
def smol_hf_dir(gguf_path, smol_tokenizer, tmp_path_factory) -> Path:
    """SmolLM2 as an HF directory: weights dequantised by transformers' own GGUF loader
    (independent of perfxlm's), saved as a plain LlamaForCausalLM with safetensors."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    out = tmp_path_factory.mktemp("smollm2_hf")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                  dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    config.torch_dtype = "bfloat16"  # as the published SmolLM2 config says
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    smol_tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def build_tiny_model(tmp_path: Path, arch: str, tokenizer, **overrides) -> Path:
    """A random-weight HF model directory (seeded) using the SmolLM2 tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}[arch]
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    config.architectures = [arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so that greedy outputs vary by prompt
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_llama_dir(smol_tokenizer, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "LlamaForCausalLM", smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """A float32 LLM on the tiny Llama, shared by the API tests (they must leave it clean)."""
    from perfxlm import LLM
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    yield llm
    assert_no_leaks(llm)


def copy_gguf_tokenizer(writer, source: Path) -> None:
    """Every tokenizer.* field of the GGUF at source (the SmolLM2 vocabulary the tiny test models
    use) into a gguf.GGUFWriter, as llama.cpp's converter writes them."""
    import gguf
    for key, f in gguf.GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            types = [gguf.GGUFValueType(t) for t in f.types]
            writer.add_key_value(key, f.contents(), types[0], sub_type=types[-1] if len(types) > 1 else None)


def assert_no_leaks(llm) -> None:
    """Every KV block is free again and no request is left in the engine."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.requests
