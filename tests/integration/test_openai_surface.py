"""The OpenAI options applications send every day, end to end (issue 15).

Each sampling option is checked against a computation made here from the
model's own logits, written by `ebb logits` (a separate process that runs
the forward pass and nothing else): greedy decoding with the option applied
by numpy to those rows must pick exactly the tokens the daemon returned.
  - top_logprobs (chat) and logprobs=N (completions): the alternatives are
    the N best ids of the row, with their log-softmax values;
  - logit_bias, presence_penalty and frequency_penalty: numpy's argmax of
    the row with the bias added and the penalties (OpenAI's formula, over
    the generated tokens) subtracted;
  - ignore_eos / min_tokens / stop_token_ids: against the same request
    without them;
  - echo: the prompt comes back before the completion, text or token ids.
"""
import json

import numpy as np
import pytest
import requests

from daemon import start_ready

IO = 180


@pytest.fixture(scope="module")
def srv(ebb_bin, model_path, tmp_path_factory):
    s = start_ready(ebb_bin, "--max-running", "4", catalog=tmp_path_factory.mktemp("oai") / "oai.db",
                    model_path=model_path, start_timeout=120)
    yield s
    s.stop_clean()


def post(srv, path, **body):
    r = requests.post(srv.url(path), json=body, timeout=IO)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(srv, text):
    return post(srv, "/tokenize", prompt=text)["tokens"]


def model_rows(ebb_bin, model_path, ids, tmp_path):
    """Logits after each prefix of ids (row i predicts ids[i + 1])."""
    import subprocess
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, ids)))
    out = tmp_path / "logits.bin"
    p = subprocess.run([str(ebb_bin), "logits", "-m", str(model_path), "--ids-file", str(f), "-o", str(out), "--all"],
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1).astype(np.float64)


def log_softmax(row):
    m = row.max()
    return row - (m + np.log(np.exp(row - m).sum()))


def reference(srv, ebb_bin, model_path, tmp_path, prompt, n, bias=None, presence=0.0, frequency=0.0,
              repetition=1.0):
    """Greedy decoding done here: ebb logits gives the row after the ids so far, numpy applies
    the options (OpenAI's formulas, the penalties over the generated ids; the repetition penalty
    as CTRL and llama.cpp define it, over the last 64 ids, prompt included) and picks the argmax.
    Returns the generated ids and the raw rows each was picked from."""
    ids = tokenize(srv, prompt)
    counts, picked, rows = {}, [], []
    for _ in range(n):
        raw = model_rows(ebb_bin, model_path, ids, tmp_path)[-1]
        row = raw.copy()
        for i, b in (bias or {}).items():
            row[i] += b
        for i in set(ids[-64:]) if repetition != 1.0 else ():
            row[i] = row[i] / repetition if row[i] > 0 else row[i] * repetition
        for i, c in counts.items():
            row[i] -= frequency * c + presence
        tok = int(np.argmax(row))
        picked.append(tok)
        rows.append(raw)
        counts[tok] = counts.get(tok, 0) + 1
        ids = ids + [tok]
    return picked, rows


def detokenize(srv, ids):
    return post(srv, "/detokenize", tokens=ids)["prompt"]


PROMPT = "The capital of France is"
REPEAT = "red blue red blue red blue red blue red blue red"


def test_top_logprobs_are_the_rows_best(srv, ebb_bin, model_path, tmp_path):
    n = 4
    doc = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=n, temperature=0, logprobs=5)
    lp = doc["choices"][0]["logprobs"]
    picked, rows = reference(srv, ebb_bin, model_path, tmp_path, PROMPT, n)
    assert detokenize(srv, picked) == doc["choices"][0]["text"]
    for k in range(n):
        row = log_softmax(rows[k])
        best = [int(i) for i in np.argsort(-row, kind="stable")[:5]]
        tops = lp["top_logprobs"][k]
        # Keys are token texts (spelt through /detokenize here), values the row's log-softmax.
        want = {detokenize(srv, [i]): row[i] for i in best}
        assert set(tops) == set(want), (k, tops, want)
        for t, v in tops.items():
            assert abs(v - want[t]) < 2e-3, (k, t, v, want[t])
        assert abs(lp["token_logprobs"][k] - row[picked[k]]) < 2e-3
    # Chat: top_logprobs entries in order, best first, with the token's bytes.
    doc = post(srv, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
               temperature=0, logprobs=True, top_logprobs=3)
    for c in doc["choices"][0]["logprobs"]["content"]:
        tops = c["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == c["token"] and abs(tops[0]["logprob"] - c["logprob"]) < 1e-6   # greedy
        assert all(bytes(t["bytes"]).decode("utf-8", "replace") == t["token"] or t["token"].startswith("bytes:")
                   for t in tops)


@pytest.mark.parametrize("opts", [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 0.8},
    {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"presence_penalty": -1.0},
    {"repetition_penalty": 1.5},
])
def test_penalties_match_the_rows(srv, ebb_bin, model_path, tmp_path, opts):
    n = 8
    plain = post(srv, "/v1/completions", prompt=REPEAT, max_tokens=n, temperature=0)["choices"][0]["text"]
    doc = post(srv, "/v1/completions", prompt=REPEAT, max_tokens=n, temperature=0, ignore_eos=True, **opts)
    text = doc["choices"][0]["text"]
    picked, _ = reference(srv, ebb_bin, model_path, tmp_path, REPEAT, n, presence=opts.get("presence_penalty", 0),
                          frequency=opts.get("frequency_penalty", 0), repetition=opts.get("repetition_penalty", 1.0))
    assert detokenize(srv, picked) == text
    if opts.get("presence_penalty", 0) > 0 or opts.get("frequency_penalty", 0) > 0 or "repetition_penalty" in opts:
        assert text != plain, "a penalty on a repeating prompt changed nothing"


@pytest.mark.parametrize("opts", [{"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.2}])
def test_sampled_tokens_stay_in_the_allowed_set(srv, ebb_bin, model_path, tmp_path, opts):
    """top_k, top_p and min_p: every first token sampled (20 seeds, temperature 1.5 to spread
    the draws) lies in the set the option allows on the model's row at that temperature (as
    docs/api.md orders them: temperature before top_p and min_p): the k best, the smallest
    prefix by probability reaching top_p, the tokens with at least min_p times the best's."""
    ids = tokenize(srv, PROMPT)
    p = np.exp(log_softmax(model_rows(ebb_bin, model_path, ids, tmp_path)[-1] / 1.5))
    order = np.argsort(-p, kind="stable")
    if "top_k" in opts:
        allowed = set(order[:opts["top_k"]].tolist())
    elif "top_p" in opts:
        allowed = set(order[:int(np.searchsorted(np.cumsum(p[order]), opts["top_p"])) + 1].tolist())
    else:
        allowed = set(np.nonzero(p >= opts["min_p"] * p.max())[0].tolist())
    seen = set()
    for seed in range(20):
        doc = post(srv, "/v1/completions", prompt=ids, max_tokens=1, temperature=1.5, seed=seed, **opts)
        seen.add(doc["choices"][0]["text"])
        assert any(detokenize(srv, [t]) == doc["choices"][0]["text"] for t in allowed), (opts, doc["choices"][0])
    assert len(seen) > 1 or len(allowed) == 1, "20 seeds drew one token"


def test_logit_bias_matches_the_rows(srv, ebb_bin, model_path, tmp_path):
    n = 5
    first_row = model_rows(ebb_bin, model_path, tokenize(srv, PROMPT), tmp_path)[-1]
    order = np.argsort(-first_row, kind="stable")
    first, second = int(order[0]), int(order[1])
    bias = {first: -100.0, second: 3.0}
    doc = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=n, temperature=0,
               logit_bias={str(k): v for k, v in bias.items()})
    picked, _ = reference(srv, ebb_bin, model_path, tmp_path, PROMPT, n, bias=bias)
    assert picked[0] == second and first not in picked
    assert detokenize(srv, picked) == doc["choices"][0]["text"]
    # An id outside the vocabulary is named.
    r = requests.post(srv.url("/v1/completions"), json={"prompt": "a", "logit_bias": {"99999999": 1}}, timeout=IO)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias.99999999"


def test_ignore_eos_min_tokens_and_stop_ids(srv, ebb_bin, model_path, tmp_path):
    msgs = [{"role": "user", "content": "Hi"}]
    base = post(srv, "/v1/chat/completions", messages=msgs, max_tokens=60, temperature=0)
    n_base = base["usage"]["completion_tokens"]
    assert base["choices"][0]["finish_reason"] == "stop", base
    doc = post(srv, "/v1/chat/completions", messages=msgs, max_tokens=n_base + 8, temperature=0, ignore_eos=True)
    assert doc["usage"]["completion_tokens"] == n_base + 8 and doc["choices"][0]["finish_reason"] == "length"
    doc = post(srv, "/v1/chat/completions", messages=msgs, max_tokens=n_base + 20, temperature=0,
               min_tokens=n_base + 5)
    assert doc["usage"]["completion_tokens"] >= n_base + 5
    assert doc["choices"][0]["message"]["content"].startswith(base["choices"][0]["message"]["content"])
    # stop_token_ids: the third generated token ends the output, not included.
    gen, _ = reference(srv, ebb_bin, model_path, tmp_path, PROMPT, 6)
    stop = gen[2]
    k = gen.index(stop)
    doc = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, stop_token_ids=[stop])
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["completion_tokens"] == k + 1
    assert doc["choices"][0]["text"] == post(srv, "/detokenize", tokens=gen[:k])["prompt"]


def test_echo_with_prompt_logprobs(srv, ebb_bin, model_path, tmp_path):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    n = 3
    doc = post(srv, "/v1/completions", prompt=prompt, max_tokens=n, temperature=0, echo=True, logprobs=2)
    ch = doc["choices"][0]
    lp = ch["logprobs"]
    p_ids = tokenize(srv, prompt)
    assert ch["text"].startswith(prompt) and "".join(lp["tokens"]) == ch["text"]
    assert len(lp["tokens"]) == len(p_ids) + n and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    picked, _ = reference(srv, ebb_bin, model_path, tmp_path, prompt, n)
    rows = model_rows(ebb_bin, model_path, p_ids + picked, tmp_path)
    for k in range(1, len(p_ids) + n):
        row = log_softmax(rows[k - 1])
        assert abs(lp["token_logprobs"][k] - row[(p_ids + picked)[k]]) < 2e-3, k
        best = [int(i) for i in np.argsort(-row, kind="stable")[:2]]
        want = {detokenize(srv, [i]): row[i] for i in best}
        assert set(lp["top_logprobs"][k]) == set(want), (k, lp["top_logprobs"][k], want)
    # The usage counts generated tokens only; a stream carries the same logprobs.
    assert doc["usage"]["completion_tokens"] == n
    r = requests.post(srv.url("/v1/completions"), json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                         "echo": True, "logprobs": 2, "stream": True},
                      stream=True, timeout=IO)
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    streamed = [v for e in events if e["choices"] for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]


def test_echo(srv):
    doc = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=3, temperature=0)
    echoed = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + doc["choices"][0]["text"]
    ids = tokenize(srv, PROMPT)
    echoed = post(srv, "/v1/completions", prompt=[ids, ids], max_tokens=3, temperature=0, echo=True)
    assert [c["text"] for c in echoed["choices"]] == [PROMPT + doc["choices"][0]["text"]] * 2
    # Streamed: the prompt arrives in the first event.
    r = requests.post(srv.url("/v1/completions"), json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                                         "echo": True, "stream": True}, stream=True, timeout=IO)
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
             if line.startswith(b"data: {") and json.loads(line[6:])["choices"]]
    assert texts[0].startswith(PROMPT) and "".join(texts) == PROMPT + doc["choices"][0]["text"]


# ---------------------------------------------------------------- access

def test_api_keys(ebb_bin, model_path, tmp_path):
    openai = pytest.importorskip("openai")
    keyfile = tmp_path / "keys"
    keyfile.write_text("# rotated monthly\n\n  file-key-3  \n")
    s = start_ready(ebb_bin, "--api-keys", "key-one, key-two", "--api-key-file", str(keyfile),
                    catalog=tmp_path / "k.db", model_path=model_path, start_timeout=120)
    try:
        for path in ["/v1/models", "/tokenize"]:
            method = requests.get if path == "/v1/models" else requests.post
            r = method(s.url(path), json={"prompt": "x"}, timeout=IO)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and "provide an API key" in err["message"]
            r = method(s.url(path), json={"prompt": "x"}, timeout=IO, headers={"Authorization": "Bearer key-on"})
            assert r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
        for key in ["key-one", "key-two", "file-key-3"]:
            r = requests.get(s.url("/v1/models"), headers={"Authorization": f"bearer  {key}"}, timeout=IO)
            assert r.status_code == 200, (key, r.text)
        # Probes and scrapers need no key.
        for path in ["/health", "/ready", "/metrics"]:
            assert requests.get(s.url(path), timeout=IO).status_code == 200
        # The official client: its api_key is the bearer token.
        good = openai.OpenAI(base_url=s.url("/v1"), api_key="file-key-3", max_retries=0, timeout=IO)
        r = good.chat.completions.create(model=good.models.list().data[0].id, max_tokens=2,
                                         messages=[{"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content
        bad = openai.OpenAI(base_url=s.url("/v1"), api_key="nope", max_retries=0, timeout=IO)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.code == "invalid_api_key"
        # The effective configuration never shows the keys.
        assert "key-one" not in s.log()
    finally:
        s.stop_clean()


def run_refused(ebb_bin, tmp_path, *args):
    import subprocess
    from daemon import clean_env
    return subprocess.run([str(ebb_bin), "serve", "--port", "0", "--catalog", str(tmp_path / "r.db"),
                           "--default-model-path", "", *args], capture_output=True, timeout=60,
                          env=clean_env(), stdin=subprocess.DEVNULL)


def test_non_loopback_needs_keys_or_a_decision(ebb_bin, tmp_path):
    p = run_refused(ebb_bin, tmp_path, "--host", "0.0.0.0")
    assert p.returncode == 1 and b"refusing to serve the API on 0.0.0.0 without API keys" in p.stderr, p.stderr
    assert b"--insecure-no-auth" in p.stderr
    # A key file that cannot be used stops the start, naming the line, never the key.
    bad = tmp_path / "bad-keys"
    bad.write_text("good-key\nhas space\n")
    p = run_refused(ebb_bin, tmp_path, "--api-key-file", str(bad))
    assert p.returncode == 1 and b"line 2: the key has a character other than visible ASCII" in p.stderr, p.stderr
    assert b"has space" not in p.stderr
    p = run_refused(ebb_bin, tmp_path, "--api-key-file", str(tmp_path / "missing"))
    assert p.returncode == 1 and b"No such file" in p.stderr
    p = run_refused(ebb_bin, tmp_path, "--api-keys", "a,,b")
    assert p.returncode == 1 and b"api_keys: key 2 (counting from 1) is empty" in p.stderr
    # Deliberately open, or with keys: it starts (no model needed to listen).
    from daemon import Server
    for args in (["--insecure-no-auth"], ["--insecure-no-auth", "true"], ["--api-keys", "k"]):
        s = Server(str(ebb_bin), *args, host="0.0.0.0", catalog=tmp_path / f"o{len(args)}.db", model_path="")
        try:
            assert requests.get(f"http://127.0.0.1:{s.port}/health", timeout=IO).status_code == 200
        finally:
            s.stop_clean()


def test_cors(ebb_bin, tmp_path):
    from daemon import Server
    s = Server(str(ebb_bin), "--cors-origins", "https://app.example, http://localhost:3000",
               catalog=tmp_path / "c.db", model_path="")
    try:
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        r = requests.options(s.url("/v1/chat/completions"), headers=pre, timeout=IO)
        assert r.status_code == 204, r.text
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert r.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        assert int(r.headers["Access-Control-Max-Age"]) > 0 and r.headers["Vary"] == "Origin"
        r = requests.options(s.url("/v1/chat/completions"), headers={**pre, "Origin": "https://evil.example"},
                             timeout=IO)
        assert r.status_code == 403 and "cors_origins" in r.json()["error"]["message"]
        assert "Access-Control-Allow-Origin" not in r.headers
        # Ordinary responses, errors included, carry the header for an allowed origin only.
        r = requests.get(s.url("/v1/models"), headers={"Origin": "http://localhost:3000"}, timeout=IO)
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
        r = requests.get(s.url("/nowhere"), headers={"Origin": "https://app.example"}, timeout=IO)
        assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        r = requests.get(s.url("/health"), headers={"Origin": "https://evil.example"}, timeout=IO)
        assert "Access-Control-Allow-Origin" not in r.headers
        # OPTIONS that is not a preflight is still a method the route does not have.
        assert requests.options(s.url("/v1/models"), timeout=IO).status_code == 405
    finally:
        s.stop_clean()
    s = Server(str(ebb_bin), "--cors-origins", "*", catalog=tmp_path / "c2.db", model_path="")
    try:
        r = requests.get(s.url("/health"), headers={"Origin": "https://any.example"}, timeout=IO)
        assert r.headers["Access-Control-Allow-Origin"] == "https://any.example"
    finally:
        s.stop_clean()


def test_embeddings_with_the_official_client(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url("/v1"), api_key="unused", max_retries=0, timeout=IO)
    r = client.embeddings.create(model=client.models.list().data[0].id,
                                 input=["The cat sat on the mat.", "A kitten rested on the rug.", "Taxes rose."])
    v = np.array([d.embedding for d in r.data])
    assert v.shape[0] == 3 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2], "two sentences about a cat are no closer than one about taxes"
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
