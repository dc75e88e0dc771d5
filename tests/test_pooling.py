"""Pooling models on the one engine (vLLM's runner "pooling"): decoders converted into
embedders (last-token pooling, Qwen3-Embedding style) and *ForSequenceClassification
checkpoints equal transformers on tiny random models built here, through chunked prefill,
the prefix cache and Matryoshka dimensions; PoolingParams and the output classes follow
vLLM 0.32; bad input fails with vLLM's errors and leaves the engine clean."""

from pathlib import Path

import numpy as np
import pytest
import torch

from perfxlm import (LLM, ClassificationRequestOutput, EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput,
                     PoolingParams, PoolingRequestOutput, ScoringOutput, ScoringRequestOutput)
from perfxlm.exceptions import VLLMValidationError
from perfxlm.sampling_params import RequestOutputKind
from tests.conftest import SMALL_KV, assert_no_leaks

PROMPTS = ["Hello, my name is", "The capital of France is a city that many people visit every year",
           " ".join(["a long prompt that spans several KV blocks and more than one chunk"] * 6)]


@pytest.fixture(scope="module")
def hf_base(tiny_llama_dir):
    from transformers import AutoModel
    return AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()  # LlamaModel: ends in the norm


def last_hidden(model, tok, text: str) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text)])).last_hidden_state[0].numpy()  # (T, hidden)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def embedder(tiny_llama_dir):
    """The tiny Llama as an embedding model, small steps: long prompts prefill in chunks."""
    llm = LLM(str(tiny_llama_dir), runner="pooling", dtype="float32", kv_cache_memory_bytes=SMALL_KV,
              max_num_batched_tokens=32, hf_overrides={"matryoshka_dimensions": [16, 32]})
    yield llm
    assert_no_leaks(llm)


def test_decoder_embedder_is_the_normalised_last_token(embedder, hf_base, smol_tokenizer):
    assert embedder.llm_engine.config.convert_type == "embed" and embedder.supported_tasks == ("embed", "token_embed")
    assert embedder.llm_engine.config.enable_chunked_prefill  # LAST pooling: chunks are fine (vLLM too)
    outs = embedder.embed(PROMPTS, use_tqdm=False)
    assert len(smol_tokenizer.encode(PROMPTS[-1])) > 32  # ran in chunks
    for text, out in zip(PROMPTS, outs):
        assert isinstance(out, EmbeddingRequestOutput) and out.outputs.hidden_size == 64
        np.testing.assert_allclose(out.outputs.embedding, unit(last_hidden(hf_base, smol_tokenizer, text)[-1]),
                                   atol=1e-5)
    again = embedder.embed(PROMPTS[-1], use_tqdm=False)[0]  # its full blocks now come from the prefix cache
    assert again.num_cached_tokens > 0
    np.testing.assert_allclose(again.outputs.embedding, outs[-1].outputs.embedding, atol=1e-6)


def test_matryoshka_dimensions_truncate_then_normalise(embedder, hf_base, smol_tokenizer):
    out = embedder.embed(PROMPTS[1], pooling_params=PoolingParams(dimensions=16), use_tqdm=False)[0]
    np.testing.assert_allclose(out.outputs.embedding, unit(last_hidden(hf_base, smol_tokenizer, PROMPTS[1])[-1, :16]),
                               atol=1e-5)
    with pytest.raises(VLLMValidationError, match=r"only supports Matryoshka dimensions \[16, 32\], got 20\."):
        embedder.embed("x", pooling_params=PoolingParams(dimensions=20))
    with pytest.raises(VLLMValidationError, match=r"only supports dimensions in range \[1, 64\], got 65\."):
        embedder.embed("x", pooling_params=PoolingParams(dimensions=65))
    assert_no_leaks(embedder)


def test_token_embed_and_encode_outputs(tiny_llama_dir, hf_base, smol_tokenizer):
    llm = LLM(str(tiny_llama_dir), runner="pooling", convert="embed", dtype="float32", kv_cache_memory_bytes=SMALL_KV,
              pooler_config={"task": "token_embed"})
    out = llm.encode(PROMPTS[0], pooling_task="token_embed", use_tqdm=False)[0]
    assert isinstance(out, PoolingRequestOutput) and isinstance(out.outputs, PoolingOutput) and out.finished
    np.testing.assert_allclose(out.outputs.data.numpy(), unit(last_hidden(hf_base, smol_tokenizer, PROMPTS[0])),
                               atol=1e-5)
    with pytest.raises(ValueError, match="pooling_task required for `LLM.encode`"):
        llm.encode("x")
    assert_no_leaks(llm)


def test_pooling_params_as_vllm():
    p = PoolingParams()
    assert (p.use_activation, p.dimensions, p.task, p.output_kind) == (None, None, None, RequestOutputKind.FINAL_ONLY)
    with pytest.raises(TypeError):
        PoolingParams(normalize=True)  # removed in vLLM 0.32: use_activation
    with pytest.raises(VLLMValidationError, match="`score` task was removed; use `classify` instead."):
        PoolingParams(task="score")
    with pytest.raises(VLLMValidationError, match="For pooling output_kind has to be FINAL_ONLY"):
        PoolingParams(output_kind=RequestOutputKind.DELTA)
    assert p.clone() is not p and p.clone().use_activation is None


def test_output_classes_from_base():
    base = PoolingRequestOutput("7", PoolingOutput(torch.tensor([0.6, 0.8])), [1, 2], 0, True)
    emb = EmbeddingRequestOutput.from_base(base)
    assert emb.outputs == EmbeddingOutput([0.6000000238418579, 0.800000011920929]) and emb.outputs.hidden_size == 2
    assert ClassificationRequestOutput.from_base(base).outputs.num_classes == 2
    score = ScoringRequestOutput.from_base(PoolingRequestOutput("8", PoolingOutput(torch.tensor([0.25])), [1], 0, True))
    assert score.outputs == ScoringOutput(0.25) and score.request_id == "8"
    with pytest.raises(ValueError, match="pooled_data should be a scalar score"):
        ScoringOutput.from_base(PoolingOutput(torch.tensor([0.1, 0.2])))


def test_generative_model_refuses_pooling(tiny_llm):
    assert tiny_llm.runner_type == "generate" and tiny_llm.supported_tasks == ("generate",)
    for call in (lambda: tiny_llm.embed("x"), lambda: tiny_llm.encode("x", pooling_task="embed")):
        with pytest.raises(ValueError, match=r"LLM.encode\(\) is only supported for pooling models"):
            call()
    with pytest.raises(ValueError, match=r"LLM.score\(\) is only supported for pooling models"):
        tiny_llm.score("a", "b")
    with pytest.raises(VLLMValidationError, match="This model does not support pooling"):
        tiny_llm.llm_engine.add_request("x", "hello", PoolingParams(task="embed"))
    assert_no_leaks(tiny_llm)


def test_runner_and_convert_errors(tiny_llama_dir):
    with pytest.raises(ValueError, match="This model does not support `--runner pooling`"):
        LLM(str(tiny_llama_dir), runner="pooling", convert="none", kv_cache_memory_bytes=SMALL_KV)
    with pytest.raises(ValueError, match="Invalid runner 'pool'"):
        LLM(str(tiny_llama_dir), runner="pool", kv_cache_memory_bytes=SMALL_KV)


# ---- decoder *ForSequenceClassification: classify and cross-encoder score -----------------

def build_seq_cls(tmp_path: Path, tokenizer, labels: int) -> Path:
    """A seeded random Qwen2ForSequenceClassification (q/k/v biases, the `score` head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, num_labels=labels, pad_token_id=0,
                                  tie_word_embeddings=False)
    config.architectures = ["Qwen2ForSequenceClassification"]
    torch.manual_seed(labels)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("labels", [3, 1])
def test_decoder_sequence_classifier_equals_transformers(tmp_path, smol_tokenizer, labels):
    from transformers import AutoModelForSequenceClassification
    path = build_seq_cls(tmp_path, smol_tokenizer, labels)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    assert llm.runner_type == "pooling" and llm.supported_tasks == ("classify",)

    def reference(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0]
        return (torch.sigmoid(logits) if labels == 1 else torch.softmax(logits, -1)).numpy()

    for text, out in zip(PROMPTS, llm.classify(PROMPTS, use_tqdm=False)):
        np.testing.assert_allclose(out.outputs.probs, reference(smol_tokenizer.encode(text)), atol=1e-5)
    raw = llm.classify(PROMPTS[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
    with torch.no_grad():
        np.testing.assert_allclose(raw.outputs.probs, hf(torch.tensor([smol_tokenizer.encode(PROMPTS[0])])).logits[0],
                                   atol=1e-5)
    if labels == 1:  # a cross-encoder: each pair as the tokenizer encodes it
        scores = llm.score(PROMPTS[0], PROMPTS[1:], use_tqdm=False)
        for doc, s in zip(PROMPTS[1:], scores):
            ids = smol_tokenizer(text=PROMPTS[0], text_pair=doc)["input_ids"]
            assert s.prompt_token_ids == ids
            assert abs(s.outputs.score - reference(ids)[0]) < 1e-5
    else:
        with pytest.raises(ValueError, match="Scoring API is only enabled for num_labels == 1."):
            llm.score("a", "b")
    with pytest.raises(VLLMValidationError, match=r"Task 'classify' only supports \['use_activation'\] parameters, "
                                                  r"does not support \['dimensions'\] parameters"):
        llm.classify("x", pooling_params=PoolingParams(dimensions=2))
    with pytest.raises(ValueError, match=r"LLM.chat\(\) is only supported for generative models"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert_no_leaks(llm)


def test_llama_graph_has_no_encoder_additions(tiny_llama_dir):
    """The decoders' graphs are the same as before pooling models came: PagedAttention without a
    causal attribute, no token_type_ids input."""
    from graph_export.export import export_model
    from perfxlm.models.loader import resolve_model
    graph = export_model(resolve_model(str(tiny_llama_dir)).load_weights(torch.float32))
    assert "token_type_ids" not in {i.name for i in graph.graph.input}
    attention = [n for n in graph.graph.node if n.op_type == "PagedAttention"]
    assert attention and all("causal" not in {a.name for a in n.attribute} for n in attention)


def test_mixed_batch_of_short_and_long_prompts_gives_each_its_own(embedder):
    """Prompts of 4 to 70 tokens in one call (chunks of the long ones beside short ones)
    embed as they do alone."""
    together = embedder.embed(PROMPTS * 2, use_tqdm=False)
    for i, text in enumerate(PROMPTS):
        alone = embedder.embed(text, use_tqdm=False)[0].outputs.embedding
        np.testing.assert_allclose(together[i].outputs.embedding, alone, atol=1e-6)
        np.testing.assert_allclose(together[i + len(PROMPTS)].outputs.embedding, alone, atol=1e-6)
    assert [int(o.request_id) for o in together] == sorted(int(o.request_id) for o in together)
