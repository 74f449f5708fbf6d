#!/usr/bin/env python3
"""What the prompt cache saves a conversation: time to first token, turn by turn.

One daemon (tools/daemon.py), one conversation at a time: a system message holding a long
text (the held-out text's first --context tokens' worth of words), then --turns user
questions, each answer (greedy, --answer tokens) appended before the next question, as a
chat client does. Each turn is sent twice in alternation, with `"cache_prompt": true` and
`false`; the false one's cache is never kept, so the true one always starts from the
previous turn's. Reported per turn: prompt tokens, tokens from the cache, and the time
from admission to the first token (llama.cpp's timings.prompt_ms) both ways, with their
ratio; the answers must match (the cache never changes the text).

With --compress MODE every request asks for context compression (`{"mode": MODE, "budget":
0.25, "min_prompt": 1024}`): the cached turns go on from the last turn's compressed cache and
are compressed again at their own end (re-scored over the whole conversation), the whole ones
are compressed once, at their own end, so their answers may differ (reported, not an error);
the kept cache's bytes come from GET /admin/memory.

  tools/prompt_cache_bench.py --ebb build/ebb --kv-bits 4 --context 1500 --turns 6 [--compress drop]
"""
import argparse
import os
import pathlib
import sys
import time

import requests

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from daemon import start_ready  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Summarize the text above in two sentences.",
    "What is the most surprising claim in it?",
    "Who would find this text useful, and why?",
    "List three words from the text that a newcomer might not know.",
    "Rewrite its first sentence more simply.",
    "What question does the text leave open?",
    "Give the text a short title.",
    "What would you ask its author?",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ebb", default=str(ROOT / "build" / "ebb"))
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=os.path.expanduser("~/.cache/ebb/heldout.txt"))
    ap.add_argument("--kv-bits", default="4")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--context", type=int, default=1500, help="words of the text in the system message")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--answer", type=int, default=48, help="tokens per answer")
    ap.add_argument("--compress", choices=["demote", "drop"], help="context compression on every request")
    ap.add_argument("--lookahead", type=int, help="context_compression.lookahead (tokens; the daemon's default if unset)")
    args = ap.parse_args()
    words = pathlib.Path(args.text).read_text(encoding="utf-8", errors="replace").split()
    system = "Answer questions about this text.\n\n" + " ".join(words[:args.context])
    token = "bench"
    server = start_ready(args.ebb, "--kv-bits", args.kv_bits, "--threads", args.threads, "--speculative", "none",
                         model_path=args.model, token=token)
    extra = {"context_compression": {"mode": args.compress, "budget": 0.25, "min_prompt": 1024}} if args.compress else {}
    if args.compress and args.lookahead is not None:
        extra["context_compression"]["lookahead"] = args.lookahead
    try:
        messages = [{"role": "system", "content": system}]
        print("turn | prompt tokens | from the cache | prompt_ms cached | prompt_ms whole | ratio | kept cache MB")
        print("---: | ---: | ---: | ---: | ---: | ---: | ---:")
        for turn in range(args.turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            docs = {}
            for cache in (False, True):   # the whole one first: the cached one starts from the last turn
                r = requests.post(server.url("/v1/chat/completions"), timeout=600,
                                  json={"messages": messages, "max_tokens": args.answer, "temperature": 0,
                                        "cache_prompt": cache, **extra})
                r.raise_for_status()
                docs[cache] = r.json()
            a, b = docs[True], docs[False]
            text = a["choices"][0]["message"]["content"]
            same = text == b["choices"][0]["message"]["content"]
            if not same and not args.compress:
                sys.exit(f"turn {turn}: the answers differ with and without the cache")
            kept = requests.get(server.url("/admin/memory"), headers={"Authorization": "Bearer " + token},
                                timeout=60).json()["prompt_cache_bytes"]
            ta, tb = a["timings"]["prompt_ms"], b["timings"]["prompt_ms"]
            print(f"{turn + 1} | {a['usage']['prompt_tokens']} | {a['usage']['prompt_tokens_details']['cached_tokens']}"
                  f" | {ta:.0f} | {tb:.0f} | {tb / ta:.1f}x | {kept / 2**20:.1f}{'' if same else ' (answers differ)'}")
            messages.append({"role": "assistant", "content": text})
            time.sleep(0.1)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
