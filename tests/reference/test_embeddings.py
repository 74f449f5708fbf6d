"""/v1/embeddings against reference.py: the mean of the final hidden states, normalized.

The daemon (the default model, native weights, int8 activations where the
weights are quantized) embeds a few texts, and the float64 numpy forward
pass embeds the same token ids. The vectors must point the same way (cosine
above 0.998; measured 0.99915-0.99991 on these texts with AVX-512: ebb's
activations are rounded to 8 bits, which moves each component a little) and rank pairs of texts by similarity as the reference
does. Batched inputs must equal inputs sent alone, and the base64 encoding
must carry the same floats.
"""
import base64
import os

import numpy as np
import pytest
import requests

import reference
from daemon import start_ready

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EBB_MODEL = os.environ.get("EBB_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
EBB_BIN = os.environ.get("EBB_BIN", os.path.join(ROOT, "build", "ebb"))
TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply on Monday.",
         "Crème brûlée, naïve façade — 東京は日本の首都です。"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_ready(EBB_BIN, catalog=tmp_path_factory.mktemp("emb") / "e.db", model_path=EBB_MODEL,
                    start_timeout=120)
    yield s
    s.stop_clean()


def embed(srv, inp, **extra):
    r = requests.post(srv.url("/v1/embeddings"), json={"input": inp, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_embeddings_match_the_reference(srv):
    model = reference.Model(EBB_MODEL)
    doc = embed(srv, TEXTS)
    assert [d["index"] for d in doc["data"]] == list(range(len(TEXTS)))
    got = np.array([d["embedding"] for d in doc["data"]], dtype=np.float64)
    assert got.shape == (len(TEXTS), model.cfg.n_embd)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    ids = [requests.post(srv.url("/tokenize"), json={"prompt": t}, timeout=30).json()["tokens"] for t in TEXTS]
    assert doc["usage"]["prompt_tokens"] == sum(map(len, ids))
    want = np.array([reference.embedding(model, i) for i in ids])
    cos = (got * want).sum(axis=1)
    print(f"\ncosine with the reference: {np.round(cos, 6)}")
    assert cos.min() > 0.998, cos
    # The similarities order the pairs as the reference's do.
    sim_got, sim_want = got @ got.T, want @ want.T
    pairs = [(i, j) for i in range(len(TEXTS)) for j in range(i + 1, len(TEXTS))]
    order = lambda sim: sorted(pairs, key=lambda p: -sim[p])  # noqa: E731
    assert order(sim_got) == order(sim_want), (sim_got, sim_want)
    # Alone equals batched; token ids equal text; base64 carries the same floats.
    alone = np.array(embed(srv, TEXTS[2])["data"][0]["embedding"])
    assert np.abs(alone - got[2]).max() < 1e-6
    by_ids = np.array(embed(srv, [ids[1]])["data"][0]["embedding"])
    assert np.abs(by_ids - got[1]).max() < 1e-6
    b64 = embed(srv, TEXTS[0], encoding_format="base64")["data"][0]["embedding"]
    assert np.array_equal(np.frombuffer(base64.b64decode(b64), dtype="<f4"), np.float32(got[0]))


def test_embedding_errors(srv):
    for body, param in [({}, "input"), ({"input": []}, "input"), ({"input": 5}, "input"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "x", "dimensions": 7}, "dimensions"), ({"input": [[1, -1]]}, "input[0][1]"),
                        ({"input": [[99999999]]}, "input[0][0]"), ({"input": "x", "temperature": 1}, "temperature")]:
        r = requests.post(srv.url("/v1/embeddings"), json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
