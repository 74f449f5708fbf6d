#!/usr/bin/env python3
"""Greedy agreement: the share of chat answers that a variant writes exactly as the reference does.

For each configuration (a model file and a KV cache precision) this starts `ebb serve` on a free
loopback port with a private catalog (tools/daemon.py, the test suites' harness), asks the 50
prompts of tools/prompts/chat50.txt as chat completions with temperature 0 and max_tokens 64,
eight at a time, and stops the daemon. The
first configuration is the reference (normally the f32 model with a float32 cache); every other
one is reported as the share of prompts whose answer text is identical to the reference's, and
the index of the first differing character, averaged, as a softer measure.

Greedy decoding is deterministic in ebb (batching does not change a sequence's arithmetic; see
docs/architecture.md), so the reference's answers are the same on every run, and a difference
comes from the variant's precision, not from scheduling.

Usage:
    tools/agreement.py [f32:]MODEL[:KV_BITS] ...   (the first is the reference; f32: serves a plain
                                                     GGUF on the dequantized path, `weights: f32`)
Environment: EBB (default build/ebb).
"""

import concurrent.futures
import json
import os
import re
import sys
import urllib.request

from daemon import Server

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "prompts", "chat50.txt")
MODEL_NAME = "agreement"


def chat(srv, prompt):
    body = json.dumps({"model": MODEL_NAME, "temperature": 0, "max_tokens": 64,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(srv.url("/v1/chat/completions"), data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def answers(binary, model, kv_bits, weights, prompts):
    """The greedy answers of one configuration, from a daemon of its own (private catalog)."""
    srv = Server(binary, "--default-model", MODEL_NAME, "--kv-bits", str(kv_bits), "--max-running", "8",
                 "--weights", weights, model_path=model, start_timeout=120)
    try:
        srv.wait_ready(timeout=300)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda p: chat(srv, p), prompts))
    finally:
        srv.stop()


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary = os.environ.get("EBB", os.path.join(HERE, "..", "build", "ebb"))
    with open(PROMPTS, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    configs = []
    for arg in sys.argv[1:]:
        weights = "f32" if arg.startswith("f32:") else "native"
        arg = arg[4:] if weights == "f32" else arg
        model, _, kv = arg.rpartition(":") if re.search(r":\d+$", arg) else (arg, "", "32")
        configs.append((model, int(kv), weights))
    ref_model, ref_kv, ref_weights = configs[0]
    ref = answers(binary, ref_model, ref_kv, ref_weights, prompts)
    print(f"reference: {os.path.basename(ref_model)} ({ref_weights}) kv{ref_kv}, {len(prompts)} prompts, greedy, "
          "64 tokens")
    print("| configuration | identical answers | mean agreeing prefix |\n|---|---|---|")
    for model, kv, weights in configs[1:]:
        got = answers(binary, model, kv, weights, prompts)
        same = sum(a == b for a, b in zip(ref, got))
        prefix = sum(common_prefix(a, b) / max(1, len(a)) for a, b in zip(ref, got)) / len(prompts)
        print(f"| {os.path.basename(model)} ({weights}) kv{kv} | {same}/{len(prompts)} ({100 * same / len(prompts):.0f}%) "
              f"| {100 * prefix:.0f}% of the reference answer |", flush=True)


if __name__ == "__main__":
    main()
