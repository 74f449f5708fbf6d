#!/usr/bin/env python3
"""Speculative decoding benchmark (docs/benchmarks.md): decode speed and acceptance of ebb's
drafts on three prompt sets, beside llama.cpp on the same prompts.

Prompt sets (18 prompts): open chat (questions, little to copy), copying (repeat, rewrite or
summarize a given text: much of the answer is in the prompt) and code editing (change a given
function: most of it comes back).

ebb runs as two daemons on the same model: the default (`draft_policy` adaptive), asked per
request with "speculative": false and "ngram"; and one with `--draft-policy always`, which
verifies every draft found. Every request is greedy, streamed, and timed from its first token
to its last: decode speed, without the prompt's prefill. The modes take turns prompt by
prompt, so a noisy machine slows them alike; --reps repeats the whole round.

llama.cpp (optional, --llama-bin DIR with llama-cli (or, in builds from late 2025 on, where
llama-cli only chats, llama-completion) and llama-lookup built, --llama-model a GGUF, e.g.
the Q4_0 conversion), same threads and the same rendered prompt: plain decoding greedily
(speed from its eval time), llama-lookup with its own n-gram lookup (at most 8 drafted
tokens: --draft-max 8, or --spec-draft-n-max 8 in the builds with llama-completion; speed
from its "decoded N tokens in S seconds" line, acceptance from n_drafted / n_accept).

    tools/spec_bench.py --ebb build/ebb --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-bin /work/ext/llama.cpp/build-avx2/bin \\
        --llama-model ~/.cache/ebb/SmolLM2-135M-Instruct.Q4_0.gguf --csv docs/data/spec_bench.csv

Prints one markdown table per set (mean decode tokens/s, ratio to ebb without drafts,
accepted/drafted) and, with --csv, writes every request's row.
"""
import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon import Server, stream_events  # noqa: E402

TEXTS = [
    "The lighthouse stood on a rock at the mouth of the bay for two hundred years. Its keepers lived in a small "
    "stone house beside it, trimming the wick each evening and polishing the great lens each morning. Ships "
    "coming home from the north watched for its beam, which turned once every twelve seconds.",
    "To make bread, mix five hundred grams of flour with three hundred millilitres of warm water, ten grams of "
    "salt and a spoon of yeast. Knead the dough for ten minutes, let it rise for an hour, shape it into a loaf "
    "and bake it for forty minutes in a hot oven.",
    "The committee met on Tuesday and approved the new budget for the public library. It asked the treasurer "
    "to publish the accounts before the end of the month and agreed to meet again in the spring to review the "
    "opening hours.",
]
CODE = [
    "def total(items):\n    result = 0\n    for item in items:\n        result = result + item.price\n"
    "    return result\n",
    "def find_user(users, name):\n    for i in range(len(users)):\n        if users[i].name == name:\n"
    "            return users[i]\n    return None\n",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def add(self, n):\n"
    "        self.count = self.count + n\n\n    def reset(self):\n        self.count = 0\n",
]
SETS = {
    "open chat": [
        "Tell me about the history of tea.", "What makes a good friend?", "Explain how a rainbow forms.",
        "Give me some tips for learning to cook.", "Why do cats purr?", "Describe a day at the beach.",
    ],
    "copying": [f"Repeat the following text exactly:\n\n{t}" for t in TEXTS]
    + [f"Rewrite the following text, keeping it as close as possible, in the past tense:\n\n{t}" for t in TEXTS],
    "code editing": [f"Add a docstring to this Python code and return the whole code:\n\n{c}" for c in CODE]
    + [f"Rename the variables in this code to longer, clearer names and return the whole code:\n\n{c}"
       for c in CODE],
}


def stream_chat(srv, prompt, max_tokens, speculative):
    body = dict(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, speculative=speculative)
    first = last = None
    usage = None
    text = []
    with requests.post(srv.url("/v1/chat/completions"), json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for doc in stream_events(r):
            if doc.get("usage"):
                usage = doc["usage"]
            for ch in doc.get("choices", []):
                piece = ch.get("delta", {}).get("content")
                if piece:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    text.append(piece)
    n = usage["completion_tokens"]
    speed = (n - 1) / (last - first) if first and last > first and n > 1 else float("nan")
    return dict(tokens=n, tok_s=speed, drafted=usage.get("draft_tokens", 0),
                accepted=usage.get("accepted_draft_tokens", 0), text="".join(text))


def rendered_prompt(srv, prompt):
    """The chat prompt as text, the daemon's own template, for llama.cpp."""
    r = requests.post(srv.url("/tokenize"), json={"messages": [{"role": "user", "content": prompt}],
                                                  "return_token_strs": True}, timeout=60)
    r.raise_for_status()
    return "".join(r.json()["token_strs"])


DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
EVAL = re.compile(r"(?:llama_perf_context_print|common_perf_print):\s+eval time =\s+([\d.]+) ms /\s+(\d+) runs")


def llama_run(args, exe, prompt):
    """Plain decoding (exe "plain": llama-completion where the build has it, else llama-cli; its
    eval time over its runs) or llama-lookup (its decode line)."""
    completion = os.path.exists(os.path.join(args.llama_bin, "llama-completion"))
    if exe == "plain":
        exe = "llama-completion" if completion else "llama-cli"
    cmd = [os.path.join(args.llama_bin, exe), "-m", args.llama_model, "-n", str(args.max_tokens), "-p", prompt,
           "--temp", "0", "-t", str(args.threads), "-c", "4096"]
    if exe == "llama-lookup":
        cmd += ["--spec-draft-n-max" if completion else "--draft-max", "8"]
    else:
        cmd += ["-no-cnv", "--no-warmup"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    m = (DECODED if exe == "llama-lookup" else EVAL).search(out)
    if p.returncode or not m:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed:\n{out[-2000:]}")
    if exe != "llama-lookup":
        n, s = int(m.group(2)), float(m.group(1)) / 1000
    else:
        n, s = int(m.group(1)), float(m.group(2))
    drafted = re.search(r"n_drafted\s*=\s*(\d+)", out)
    accepted = re.search(r"n_accept\s*=\s*(\d+)", out)
    return dict(tokens=n, tok_s=n / s if s > 0 else float("nan"), drafted=int(drafted.group(1)) if drafted else 0,
                accepted=int(accepted.group(1)) if accepted else 0, text="")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ebb", default="build/ebb")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-bits", type=int, default=32)
    ap.add_argument("--llama-bin")
    ap.add_argument("--llama-model")
    ap.add_argument("--csv")
    ap.add_argument("--sets", help="comma-separated prompt sets to run (default: all): " + ", ".join(SETS))
    ap.add_argument("--cpu-path", help="the daemons' CPU kernels (EBB_CPU_PATH: amx, avx512, avx2, scalar; "
                    "default: the best this CPU runs)")
    args = ap.parse_args()
    sets = SETS if not args.sets else {k: SETS[k] for k in args.sets.split(",")}

    tmp = tempfile.TemporaryDirectory()
    common = ["--threads", str(args.threads), "--kv-bits", str(args.kv_bits), "--max-running", "4"]
    env = {"EBB_CPU_PATH": args.cpu_path} if args.cpu_path else None
    adaptive = Server(args.ebb, *common, catalog=os.path.join(tmp.name, "a.db"), model_path=args.model,
                      start_timeout=120, env=env)
    always = Server(args.ebb, *common, "--draft-policy", "always", catalog=os.path.join(tmp.name, "b.db"),
                    model_path=args.model, start_timeout=120, env=env)
    rows = []
    try:
        adaptive.wait_ready()
        always.wait_ready()
        modes = [("ebb, no drafts", lambda p: stream_chat(adaptive, p, args.max_tokens, False)),
                 ("ebb, n-gram adaptive (default)", lambda p: stream_chat(adaptive, p, args.max_tokens, "ngram")),
                 ("ebb, n-gram every draft", lambda p: stream_chat(always, p, args.max_tokens, "ngram"))]
        if args.llama_bin and args.llama_model:
            modes += [("llama.cpp Q4_0, no drafts", lambda p: llama_run(args, "plain", rendered_prompt(adaptive, p))),
                      ("llama.cpp Q4_0, llama-lookup", lambda p: llama_run(args, "llama-lookup",
                                                                          rendered_prompt(adaptive, p)))]
        for rep in range(args.reps):
            for set_name, prompts in sets.items():
                for i, prompt in enumerate(prompts):
                    ref = None
                    for mode, run in modes:
                        r = run(prompt)
                        if mode.startswith("ebb"):
                            ref = ref if ref is not None else r["text"]
                            if r["text"] != ref:
                                print(f"TEXT DIFFERS: {set_name} #{i} {mode}", file=sys.stderr)
                        rows.append(dict(rep=rep, set=set_name, prompt=i, mode=mode, **{k: v for k, v in r.items()
                                                                                           if k != "text"}))
                        print(f"{set_name} #{i} {mode}: {r['tokens']} tokens, {r['tok_s']:.1f} tok/s, "
                              f"{r['accepted']}/{r['drafted']} drafts kept", file=sys.stderr)
    finally:
        adaptive.stop()
        always.stop()
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    for set_name in sets:
        base = statistics.mean(r["tok_s"] for r in rows if r["set"] == set_name and r["mode"] == "ebb, no drafts")
        print(f"\n{set_name} ({len(sets[set_name])} prompts x {args.reps}, {args.max_tokens} tokens, greedy)\n")
        print("| decoder | decode tok/s | vs ebb without drafts | drafts kept | kept per token |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for mode in dict.fromkeys(r["mode"] for r in rows):
            rs = [r for r in rows if r["set"] == set_name and r["mode"] == mode]
            speed = statistics.mean(r["tok_s"] for r in rs)
            drafted, accepted, tokens = (sum(r[k] for r in rs) for k in ("drafted", "accepted", "tokens"))
            kept = f"{accepted}/{drafted} ({100 * accepted / drafted:.0f}%)" if drafted else "-"
            print(f"| {mode} | {speed:.1f} | {speed / base:.2f}x | {kept} | {accepted / tokens:.2f} |")


if __name__ == "__main__":
    main()
