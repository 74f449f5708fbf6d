"""The prompt cache through the daemon: a conversation's next turn computes only what is new.

A chat client sends the whole conversation every turn. The daemon keeps the KV cache of
each finished request (engine/scheduler.h, `prompt_cache_bytes`) and starts a request
whose prompt begins with a kept cache's tokens from that cache. What is checked:
  - turn after turn, usage.prompt_tokens_details.cached_tokens (OpenAI's field) is every
    token the last turn's cache held -- its prompt and every answer token but the last,
    which was sampled and never fed -- and timings' cache_n + prompt_n is the prompt;
  - the answer is the same text as the same request with `"cache_prompt": false`
    (computed whole), at KV32 and KV4;
  - the ebb_prompt_cache_* metrics count the hits and the tokens;
  - kept caches are part of the KV reserved (GET /admin/memory's prompt_cache_bytes) and
    a budget lowered under them lets them go at once, with the engine idle;
  - a compressed conversation (context_compression) goes on from its compressed cache:
    the next turn takes it and, adding more than a page, is compressed again over the whole
    conversation (more demoted); the turn after goes on from that cache too
    (test_scheduler holds their text to generate() compressed at the same points);
  - an operator's `--prompt-cache-bytes 0` turns it off; a bad `cache_prompt` is a 400.
"""
import re
import time

import pytest
import requests

from daemon import start_ready

IO = 120
TURNS = ["Tell me about the moon.", "And the sun?", "Which one is bigger, and by how much?"]


def chat(server, messages, **extra):
    r = requests.post(server.url("/v1/chat/completions"), timeout=IO,
                      json={"messages": messages, "max_tokens": 24, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def metric(server, name):
    text = requests.get(server.url("/metrics"), timeout=IO).text
    m = re.search(r"^%s\{[^}]*\} (\S+)$" % name, text, re.M)
    assert m, name + " missing from /metrics"
    return float(m.group(1))


@pytest.mark.parametrize("kv_bits", ["32", "4"])
def test_turns_reuse_the_conversation(binary, model_path, kv_bits):
    server = start_ready(binary, "--kv-bits", kv_bits, model_path=model_path)
    try:
        messages, expected, total = [], 0, 0
        for turn, question in enumerate(TURNS):
            messages.append({"role": "user", "content": question})
            doc = chat(server, messages)
            whole = chat(server, messages, cache_prompt=False)
            usage, timings = doc["usage"], doc["timings"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            answer = doc["choices"][0]["message"]["content"]
            assert answer == whole["choices"][0]["message"]["content"], f"turn {turn}: the cache changed the answer"
            assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert doc["choices"][0]["finish_reason"] == "length"
            assert cached == expected, f"turn {turn}: {cached} tokens from the cache, the last turn left {expected}"
            assert timings["cache_n"] == cached and timings["prompt_n"] + cached == usage["prompt_tokens"]
            total += cached
            expected = usage["prompt_tokens"] + usage["completion_tokens"] - 1
            messages.append({"role": "assistant", "content": answer})
        assert metric(server, "ebb_prompt_cache_hits_total") == len(TURNS) - 1
        assert metric(server, "ebb_prompt_cache_tokens_total") == total
        assert metric(server, "ebb_prompt_cache_entries") == 1
        assert metric(server, "ebb_prompt_cache_bytes") > 0
    finally:
        server.stop_clean()


def test_a_compressed_conversation_goes_on_from_its_compressed_cache(binary, model_path):
    server = start_ready(binary, model_path=model_path)
    compress = {"mode": "demote", "budget": 0.25, "min_prompt": 200}
    try:
        notes = " ".join(["The river runs to the sea and the hills stand over the town."] * 24)
        messages = [{"role": "user", "content": notes + " " + TURNS[0]}]
        first = chat(server, messages, context_compression=compress)
        assert first["usage"]["context_compression"]["demoted_tokens"] > 0, first["usage"]
        longer = (TURNS[1] + " Say it plainly, in a few short sentences, for a child who has never looked up at"
                  " it, and then say how far away it is, how hot it is, and how long its light takes to reach us.")
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": longer}]
        second = chat(server, messages, context_compression=compress)
        usage = second["usage"]
        want = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"] - 1
        assert usage["prompt_tokens_details"]["cached_tokens"] == want, usage
        assert (usage["context_compression"]["demoted_tokens"] >
                first["usage"]["context_compression"]["demoted_tokens"]), (first["usage"], usage)
        # A short turn goes on from that cache: past where it was compressed, at most up to its
        # own last 32 tokens (the window it scores with if it compresses again).
        messages += [{"role": "assistant", "content": second["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "Why?"}]
        usage = chat(server, messages, context_compression=compress)["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert second["usage"]["prompt_tokens"] <= cached < usage["prompt_tokens"], (second["usage"], usage)
        if "context_compression" in usage:
            assert (usage["context_compression"]["demoted_tokens"] >=
                    second["usage"]["context_compression"]["demoted_tokens"]), usage
        # Other settings take nothing from it.
        usage = chat(server, messages, context_compression=dict(compress, budget=0.5))["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0 and "context_compression" in usage, usage
    finally:
        server.stop_clean()


def test_off_and_bad_input(binary, model_path):
    server = start_ready(binary, "--prompt-cache-bytes", "0", model_path=model_path)
    try:
        messages = [{"role": "user", "content": TURNS[0]}]
        first = chat(server, messages)
        messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": TURNS[1]}]
        assert chat(server, messages)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert metric(server, "ebb_prompt_cache_entries") == 0
        r = requests.post(server.url("/v1/chat/completions"), timeout=IO,
                          json={"messages": messages, "max_tokens": 4, "cache_prompt": "yes"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_prompt", r.text
        assert "boolean" in r.json()["error"]["message"]
    finally:
        server.stop_clean()


def test_a_lower_budget_lets_kept_caches_go(binary, model_path):
    token = "secret"
    server = start_ready(binary, model_path=model_path, token=token)
    auth = {"Authorization": "Bearer " + token}

    def memory():
        r = requests.get(server.url("/admin/memory"), headers=auth, timeout=IO)
        assert r.status_code == 200, r.text
        return r.json()
    try:
        # A few pages' worth, so that the kept cache outweighs the least request's one page.
        long = " ".join(["The moon has phases because we see different parts of its lit half."] * 20)
        messages = [{"role": "user", "content": long + " " + TURNS[0]}]
        first = chat(server, messages)
        state = memory()
        kept = state["prompt_cache_bytes"]
        assert kept > 0 and state["kv_reserved_bytes"] == kept and state["models"][0]["prompt_cache_bytes"] == kept
        assert state["minimum_bytes"] < state["weight_bytes"] + kept, "kept caches are not held: not in the minimum"
        budget = state["minimum_bytes"] + (state["weight_bytes"] + kept - state["minimum_bytes"]) // 2
        r = requests.put(server.url("/admin/memory"), json={"memory_budget_bytes": budget}, headers=auth, timeout=IO)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while memory()["prompt_cache_bytes"] and time.monotonic() < deadline:
            time.sleep(0.05)
        state = memory()
        assert state["prompt_cache_bytes"] == 0 and state["kv_reserved_bytes"] == 0, state
        assert metric(server, "ebb_prompt_cache_evictions_total") == 1
        assert first["choices"][0]["finish_reason"] == "length"
        # The daemon serves on under the new budget (the conversation itself no longer fits it).
        assert chat(server, [{"role": "user", "content": TURNS[1]}])["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        server.stop_clean()
