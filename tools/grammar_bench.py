#!/usr/bin/env python3
"""Constrained decoding's cost (docs/benchmarks.md, "Structured output"): decode time per
token with a grammar against the same request without one.

One daemon, one request at a time, no speculative drafts (so nothing but the mask differs).
For each prompt and schema, a structured request (response_format json_schema or
json_object, greedy) runs first; then the same prompt without a grammar, forced to the same
number of tokens (min_tokens = max_tokens = that count, ignore_eos). Both decode times come
from the response's timings (first token to last, prefill excluded); timings.grammar_ms is
the masking itself. The pairs take turns, so a noisy machine slows both alike; --reps
repeats the round.

    tools/grammar_bench.py --ebb build/ebb --model models/SmolLM2-135M-Instruct.Q4_1.gguf [--reps 3]
        [--temperature 0.8]

Greedy by default: there the mask is computed only when the best token is refused; with
--temperature (seeded), every step masks the whole vocabulary. Prints per-schema means and
the overall ratio.
"""
import argparse
import os
import statistics
import sys

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon import start_ready  # noqa: E402

S = {"type": "string", "maxLength": 30}
CASES = [
    ("person", "Invent a person with a name, an age and a city.",
     {"type": "object", "properties": {"name": S, "age": {"type": "integer"}, "city": S},
      "required": ["name", "age", "city"]}),
    ("order", "Write an order with two items, each with a name, a quantity and a price.",
     {"type": "object", "properties": {"items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
         "type": "object", "properties": {"name": S, "qty": {"type": "integer"}, "price": {"type": "number"}},
         "required": ["name", "qty", "price"]}}}, "required": ["items"]}),
    ("review", "Review a film: its title, a rating from 1 to 5 and a one-sentence summary.",
     {"type": "object", "properties": {"title": S, "rating": {"enum": [1, 2, 3, 4, 5]},
                                       "summary": {"type": "string", "maxLength": 200}},
      "required": ["title", "rating", "summary"]}),
    ("json_object", "Describe the planet Mars as JSON.", None),
]


def chat(url, body):
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def per_token_ms(doc):
    t = doc["timings"]
    return t["predicted_ms"] / max(1, t["predicted_n"] - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ebb", default="build/ebb")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    a = ap.parse_args()
    srv = start_ready(a.ebb, "--max-running", "1", "--speculative", "none", model_path=a.model)
    rows = {name: {"with": [], "without": [], "mask": [], "tokens": []} for name, _, _ in CASES}
    try:
        for _ in range(a.reps):
            for name, prompt, schema in CASES:
                msgs = [{"role": "user", "content": prompt}]
                fmt = ({"type": "json_schema", "json_schema": {"name": name, "schema": schema}} if schema
                       else {"type": "json_object"})
                sampling = {"temperature": a.temperature, "seed": 1}
                doc = chat(srv.base, {"messages": msgs, "max_tokens": 200, "response_format": fmt, **sampling})
                n = doc["usage"]["completion_tokens"]
                plain = chat(srv.base, {"messages": msgs, "max_tokens": n, "min_tokens": n, "ignore_eos": True,
                                        **sampling})
                row = rows[name]
                row["with"].append(per_token_ms(doc))
                row["without"].append(per_token_ms(plain))
                row["mask"].append(doc["timings"].get("grammar_ms", 0) / n)
                row["tokens"].append(n)
    finally:
        srv.stop()
    print("| schema | tokens | ms/token, no grammar | ms/token, grammar | ratio | masking ms/token |")
    print("|---|---|---|---|---|---|")
    all_with, all_without, all_mask = [], [], []
    for name, row in rows.items():
        w, wo, m = statistics.mean(row["with"]), statistics.mean(row["without"]), statistics.mean(row["mask"])
        all_with += row["with"]
        all_without += row["without"]
        all_mask += row["mask"]
        print(f"| {name} | {statistics.mean(row['tokens']):.0f} | {wo:.2f} | {w:.2f} | {w / wo:.3f} | {m:.3f} |")
    w, wo = statistics.mean(all_with), statistics.mean(all_without)
    print(f"| all | | {wo:.2f} | {w:.2f} | {w / wo:.3f} | {statistics.mean(all_mask):.3f} |")


if __name__ == "__main__":
    main()
