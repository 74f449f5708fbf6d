"""Speculative decoding through the daemon: drafts change speed, never text.

The daemon runs with `--draft-policy always`, so every n-gram draft found is
verified (the adaptive default would skip most of them on this machine, and
then the test would check little). What is checked, and against what:
  - 50 prompts (copying, summarizing, code edits, open questions) decoded
    greedily with `"speculative": "ngram"` give byte-identical text to the
    same prompts with `"speculative": false` -- one at a time, and all at once
    with 16 sequences running (each speculating request batched with 15
    others, speculating or not) -- at KV32 and KV4. The reference is the
    daemon's one-token-a-step decoding, which test_scheduler.c checks against
    generate() and the reference suites check against llama.cpp and numpy;
  - sampled with fixed seeds, each seed's text is identical with and without
    drafts (the n-gram draft is deterministic, so each kept token is the one
    the sampler drew from the model's own distribution: the same draws);
  - drafts were verified and some accepted (usage's draft_tokens and
    accepted_draft_tokens, the spec_decode counters), so the equality above
    is not vacuous; a request without drafts reports none;
  - a response's "timings" (llama.cpp's names) agree with its usage;
  - a bad "speculative" value is a 400 naming the field.
"""
import concurrent.futures

import pytest
import requests

from daemon import start_ready

IO = 120
MAX_TOKENS = 32

TEXTS = [
    "The lighthouse stood on a rock at the mouth of the bay for two hundred years, and its keepers trimmed the "
    "wick each evening and polished the great lens each morning.",
    "Bees collect nectar from flowers, carry it back to the hive, and turn it into honey by fanning it with their "
    "wings until most of the water evaporates.",
    "The train to the coast leaves at seven in the morning from platform four, stops at every village on the "
    "way, and reaches the harbour just before noon.",
    "To make bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let it rise for an hour, "
    "shape it, and bake it in a hot oven.",
    "Mercury is the smallest planet in the solar system and the closest to the sun; a year there lasts only "
    "eighty-eight Earth days.",
    "def total(items):\n    result = 0\n    for item in items:\n        result = result + item.price\n    "
    "return result\n",
    "The committee met on Tuesday, approved the new budget for the library, and asked the treasurer to publish "
    "the accounts before the end of the month.",
    "Rain fell on the city all night, filling the gutters and the old stone fountains, and by morning the river "
    "had risen to the top of its banks.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')\n",
    "Ada Lovelace wrote the first published algorithm meant for a machine, notes on Charles Babbage's "
    "Analytical Engine, in 1843.",
]
TASKS = [
    "Repeat the following text exactly, word for word:\n\n{t}",
    "Summarize this in one sentence:\n\n{t}",
    "Rewrite the following, changing as little as possible but fixing any mistakes:\n\n{t}",
    "Here is a passage.\n\n{t}\n\nCopy the passage again below.",
    "What is this about?\n\n{t}",
]
PROMPTS = [task.format(t=text) for text in TEXTS for task in TASKS]
assert len(PROMPTS) == 50


@pytest.fixture(scope="module", params=[32, 4])
def srv(request, ebb_bin, model_path, tmp_path_factory):
    kv_bits = request.param
    s = start_ready(ebb_bin, "--max-running", "16", "--queue-length", "256", "--kv-bits", str(kv_bits),
                    "--draft-policy", "always", catalog=tmp_path_factory.mktemp("spec") / f"spec{kv_bits}.db",
                    model_path=model_path, start_timeout=120)
    s.kv_bits = request.param
    yield s
    s.stop_clean()


def chat(s, prompt, speculative, **extra):
    body = dict(messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
                speculative=speculative, **extra)
    r = requests.post(s.url("/v1/chat/completions"), json=body, timeout=IO)
    assert r.status_code == 200, r.text
    doc = r.json()
    return doc["choices"][0]["message"]["content"], doc["usage"]


def spec_counter(s, name):
    text = requests.get(s.url("/metrics"), timeout=IO).text
    for line in text.splitlines():
        if line.startswith(name + "{") and 'source="ngram"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_greedy_alone_identical(srv):
    drafted = accepted = 0
    for i, p in enumerate(PROMPTS):
        plain, u_plain = chat(srv, p, False)
        spec, u_spec = chat(srv, p, "ngram")
        assert spec == plain, (srv.kv_bits, i, p, plain, spec)
        assert u_spec["completion_tokens"] == u_plain["completion_tokens"]
        assert "draft_tokens" not in u_plain
        drafted += u_spec.get("draft_tokens", 0)
        accepted += u_spec.get("accepted_draft_tokens", 0)
    print(f"kv{srv.kv_bits} alone: {drafted} drafted, {accepted} accepted")
    assert drafted > 0 and 0 < accepted < drafted
    assert spec_counter(srv, "ebb_spec_decode_num_draft_tokens_total") >= drafted
    assert spec_counter(srv, "ebb_spec_decode_num_accepted_tokens_total") >= accepted
    assert spec_counter(srv, "ebb_spec_decode_num_drafts_total") > 0


def test_greedy_batched_identical(srv):
    # Every prompt twice, with and without drafts, all queued at once: each
    # speculating sequence shares its steps with 15 others.
    alone = {}
    for i in range(0, len(PROMPTS), 5):   # a reference from one-at-a-time decoding for some
        alone[i] = chat(srv, PROMPTS[i], False)[0]
    jobs = [(i, spec) for i in range(len(PROMPTS)) for spec in (False, "ngram")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda j: chat(srv, PROMPTS[j[0]], j[1])[0], jobs))
    got = {}
    for (i, spec), text in zip(jobs, results):
        got.setdefault(i, {})[spec] = text
    for i, pair in got.items():
        assert pair["ngram"] == pair[False], (srv.kv_bits, i, pair)
        if i in alone:
            assert pair[False] == alone[i], (srv.kv_bits, i, pair[False], alone[i])


def test_sampled_same_seed_identical(srv):
    prompt = PROMPTS[0]   # a copying prompt: drafts are accepted while sampling too
    accepted = 0
    for seed in range(12):
        extra = dict(temperature=0.8, seed=seed)
        body = dict(messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, **extra)
        texts = []
        for spec in (False, "ngram"):
            r = requests.post(srv.url("/v1/chat/completions"), json=dict(body, speculative=spec), timeout=IO)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["message"]["content"])
            accepted += r.json()["usage"].get("accepted_draft_tokens", 0)
        assert texts[0] == texts[1], (srv.kv_bits, seed, texts)
    assert accepted > 0


def test_timings_as_llama_cpp_returns_them(srv):
    body = dict(messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=MAX_TOKENS, temperature=0,
                speculative="ngram")
    doc = requests.post(srv.url("/v1/chat/completions"), json=body, timeout=IO).json()
    u, t = doc["usage"], doc["timings"]
    assert t["prompt_n"] + t["cache_n"] == u["prompt_tokens"] and t["predicted_n"] == u["completion_tokens"]
    assert t["draft_n"] == u["draft_tokens"] > 0 and t["draft_n_accepted"] == u["accepted_draft_tokens"]
    assert t["prompt_ms"] > 0 and t["predicted_ms"] > 0 and t["predicted_per_second"] > 0
    doc = requests.post(srv.url("/v1/chat/completions"), json=dict(body, speculative=False), timeout=IO).json()
    assert doc["timings"]["draft_n"] == 0 and "draft_tokens" not in doc["usage"]


def test_bad_speculative_value(srv):
    for bad, needle in [("eagle", "got a string"), (1, "got 1"), ({}, "got an object")]:
        r = requests.post(srv.url("/v1/completions"), json=dict(prompt="Hi", max_tokens=1, speculative=bad),
                          timeout=IO)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "speculative" and "must be true, false or a draft source" in err["message"], err
        assert needle in err["message"], err
    assert requests.get(srv.url("/health"), timeout=IO).status_code == 200
