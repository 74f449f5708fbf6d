"""Context compression through the daemon (engine/compress.h).

The daemon runs at KV4 with `--context-compression demote` and
`--compression-min-prompt 1000`, so long prompts that say nothing are
compressed and short ones are not. What is checked, and against what:
  - a pass key hidden in ~1,500 tokens of filler is found with the whole
    cache, and still found with 25% of the prompt kept at 4 bits and the rest
    demoted (the classic passkey test: the answer is known); 2-bit keys
    take less memory than the default 4-bit ones;
  - usage.context_compression reports what the stage did and agrees with the
    request: kept is the budget's share, demoted + kept (+ dropped) is the
    prompt, the cache shrank; drop mode drops instead of demoting; a request
    the stage left alone reports nothing;
  - the server's default applies to requests that do not say, and
    "context_compression": false turns it off;
  - requests batched with a compressed one give the same text as alone
    (compression changes only its own cache);
  - a stream's final usage chunk carries the same report;
  - the Prometheus counters and the stage-time histogram count the requests;
  - a lookahead (tokens decoded past the prompt for the scoring, then
    forgotten) keeps the budget's share and gives the same text twice;
    so does a reconstruction's scoring, which finds the key too;
  - bad values are 400s naming the field.
"""
import concurrent.futures
import re

import pytest
import requests

from daemon import start_ready, stream_events

IO = 180
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "68231"
CONTEXT = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
           "I will quiz you about the important information there.\n" + FILLER * 30 +
           f"The pass key is {KEY}. Remember it. {KEY} is the pass key. " + FILLER * 30)
PASSKEY = CONTEXT + "\nWhat is the pass key? The pass key is"
SHORT = ["The capital of France is", "Water boils at", "def add(a, b):\n    return", "Once upon a time"]


@pytest.fixture(scope="module")
def srv(ebb_bin, model_path, tmp_path_factory):
    s = start_ready(ebb_bin, "--kv-bits", "4", "--max-running", "8", "--context-compression", "demote",
                    "--compression-min-prompt", "1000", catalog=tmp_path_factory.mktemp("cmp") / "cmp.db",
                    model_path=model_path, start_timeout=120)
    yield s
    s.stop_clean()


def complete(s, prompt, max_tokens=8, **extra):
    body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)
    r = requests.post(s.url("/v1/completions"), json=body, timeout=IO)
    assert r.status_code == 200, r.text
    return r.json()


def test_passkey_survives_demotion(srv):
    full = complete(srv, PASSKEY, context_compression=False)
    assert KEY in full["choices"][0]["text"], full
    assert "context_compression" not in full["usage"]
    doc = complete(srv, PASSKEY, context_compression={"mode": "demote", "budget": 0.25})
    assert KEY in doc["choices"][0]["text"], doc
    u = doc["usage"]
    c = u["context_compression"]
    n = u["prompt_tokens"]
    assert abs(c["kept_tokens"] - n // 4) <= 1, c
    assert c["kept_tokens"] + c["demoted_tokens"] == n and c["dropped_tokens"] == 0, c
    assert 0 < c["kv_bytes_compressed"] < c["kv_bytes"] * 9 // 10, c
    keys2 = complete(srv, PASSKEY, context_compression={"mode": "demote", "budget": 0.25, "key_bits": 2})
    c2 = keys2["usage"]["context_compression"]
    assert c2["kv_bytes_compressed"] < c["kv_bytes_compressed"] * 0.85, (c2, c)


def test_lookahead(srv):
    """A lookahead decodes past the prompt and forgets it: the request keeps
    the same share and answers the same way twice (the lookahead is greedy),
    whatever its own sampling."""
    ask = dict(context_compression={"mode": "drop", "budget": 0.25, "lookahead": 32})
    doc = complete(srv, PASSKEY, **ask)
    c, n = doc["usage"]["context_compression"], doc["usage"]["prompt_tokens"]
    assert abs(c["kept_tokens"] - n // 4) <= 1 and c["kept_tokens"] + c["dropped_tokens"] == n, c
    assert doc["usage"]["completion_tokens"] == 8, doc
    again = complete(srv, PASSKEY, **ask)
    assert again["choices"][0]["text"] == doc["choices"][0]["text"], (again, doc)
    assert again["usage"]["context_compression"]["kept_tokens"] == c["kept_tokens"]


def test_reconstruct(srv):
    """Scored by a reconstruction (the prompt written again past its end, a
    chunk per pass, then forgotten): the budget's share is kept, the key
    found, and the same text comes twice."""
    ask = dict(context_compression={"mode": "drop", "budget": 0.25, "select": "reconstruct"})
    doc = complete(srv, PASSKEY, **ask)
    c, n = doc["usage"]["context_compression"], doc["usage"]["prompt_tokens"]
    assert abs(c["kept_tokens"] - n // 4) <= 1 and c["kept_tokens"] + c["dropped_tokens"] == n, c
    assert KEY in doc["choices"][0]["text"], doc
    again = complete(srv, PASSKEY, **ask)
    assert again["choices"][0]["text"] == doc["choices"][0]["text"], (again, doc)


def test_drop_and_token_budget(srv):
    doc = complete(srv, PASSKEY, context_compression={"mode": "drop", "budget": 300})
    c = doc["usage"]["context_compression"]
    assert c["kept_tokens"] == 300 and c["demoted_tokens"] == 0, c
    assert c["kept_tokens"] + c["dropped_tokens"] == doc["usage"]["prompt_tokens"], c
    mixed = complete(srv, PASSKEY, context_compression={"budget": 0.1, "low_budget": 0.2})
    m = mixed["usage"]["context_compression"]
    n = mixed["usage"]["prompt_tokens"]
    assert abs(m["demoted_tokens"] - round(0.2 * n)) <= 1 and m["dropped_tokens"] > 0, m
    assert m["kv_bytes_compressed"] < m["kv_bytes"] * 0.4, m


def test_server_default_and_threshold(srv):
    doc = complete(srv, PASSKEY)   # long, silent: the server's demote at 25%
    c = doc["usage"]["context_compression"]
    assert c["demoted_tokens"] > 0 and c["dropped_tokens"] == 0, c
    short = complete(srv, SHORT[0])
    assert "context_compression" not in short["usage"]
    forced = complete(srv, FILLER * 8, context_compression={"min_prompt": 0, "budget": 0.5})
    assert forced["usage"]["context_compression"]["demoted_tokens"] > 0, forced["usage"]


def test_batched_neighbours_unchanged(srv):
    alone = [complete(srv, p, max_tokens=16)["choices"][0]["text"] for p in SHORT]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        big = [pool.submit(complete, srv, PASSKEY, 8, context_compression={"budget": 0.25}) for _ in range(2)]
        small = [pool.submit(complete, srv, p, 16) for p in SHORT]
        texts = [f.result()["choices"][0]["text"] for f in small]
        for f in big:
            assert KEY in f.result()["choices"][0]["text"]
    assert texts == alone


def test_stream_reports_compression(srv):
    body = dict(prompt=PASSKEY, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
                context_compression={"mode": "demote", "budget": 0.25})
    with requests.post(srv.url("/v1/completions"), json=body, timeout=IO, stream=True) as r:
        assert r.status_code == 200
        events = list(stream_events(r))
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    usage = [e["usage"] for e in events if e.get("usage")]
    assert KEY in text and usage and usage[-1]["context_compression"]["demoted_tokens"] > 0, usage


def test_metrics_count_compressions(srv):
    complete(srv, PASSKEY, context_compression={"mode": "drop", "budget": 0.25})
    text = requests.get(srv.url("/metrics"), timeout=IO).text

    def value(pattern):
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        assert m, pattern
        return float(m.group(1))

    assert value(r'ebb_context_compression_requests_total\{model="[^"]+",mode="drop"\}') >= 1
    assert value(r'ebb_context_compression_requests_total\{model="[^"]+",mode="demote"\}') >= 1
    assert value(r'ebb_context_compression_tokens_total\{model="[^"]+",mode="drop",tier="dropped"\}') > 0
    assert value(r'ebb_context_compression_tokens_total\{model="[^"]+",mode="demote",tier="demoted"\}') > 0
    assert value(r'ebb_context_compression_kv_bytes_saved_total\{model="[^"]+",mode="demote"\}') > 0
    assert value(r'ebb_context_compression_seconds_count\{model="[^"]+",mode="demote"\}') >= 1


@pytest.mark.parametrize("value, needle", [
    (3, "context_compression"),
    ("demote", "context_compression"),
    ({"mode": "squash"}, "context_compression.mode"),
    ({"budget": 1.5}, "context_compression.budget"),
    ({"budget": -0.1}, "context_compression.budget"),
    ({"budget": "half"}, "context_compression.budget"),
    ({"low_budget": 2}, "context_compression.low_budget"),
    ({"select": "best"}, "context_compression.select"),
    ({"key_bits": 3}, "context_compression.key_bits"),
    ({"key_bits": 8}, "context_compression.key_bits"),
    ({"min_prompt": -3}, "context_compression.min_prompt"),
    ({"window": 32}, "context_compression.window"),
    ({"lookahead": 65}, "context_compression.lookahead"),
    ({"lookahead": -1}, "context_compression.lookahead"),
    ({"lookahead": "32"}, "context_compression.lookahead"),
])
def test_bad_values(srv, value, needle):
    r = requests.post(srv.url("/v1/completions"), json=dict(prompt="hi", max_tokens=2, context_compression=value),
                      timeout=IO)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == needle and needle in err["message"], err
    assert requests.get(srv.url("/health"), timeout=IO).status_code == 200
