#!/usr/bin/env python3
"""Would a datastore of the served model's own answers draft well on open chat? (issue 13)

Retrieval drafts (REST; llama.cpp's static n-gram cache, `llama-lookup -lcs`) look the last
tokens up in a corpus instead of only in the request's own text. For open chat, where a
request offers n-gram lookup little to copy, the corpus that predicts the model best is its
own earlier output: this tool has the model answer --corpus templated questions (greedy,
`ebb generate --chat --print-ids`; no topic or wording shared with the test prompts), builds
an n-gram table (the last 1..--nmax tokens -> counts of the next token), and replays greedy
answers to the test prompts (tools/prompts/chat50.txt and spec_bench's open chat set)
step by step, as the engine would decode them, with drafts from

  own        the request's own text (the engine's n-gram lookup, 3 then 2 tokens), and
  datastore  that first, else the table's most frequent continuations, chained, while the
             top continuation's share of its counts is at least tau (and it was seen at
             least mincount times),

at every fixed draft length and threshold (the best in hindsight, so an upper bound on
what a policy would choose). A step with k drafts costs c(k) of a one-token step (--verify,
`ebb bench --verify 8`); the answers being greedy, a draft is kept exactly where the
served model emits it. Prints tokens per unit of cost against no drafts.

    ~/.cache/ebb/venv/bin/python tools/draft_datastore.py --ebb build/ebb --corpus 400 \\
        --verify avx512=1.16,1.28,1.34,1.52,1.81,1.95,2.15,2.49 \\
        --verify avx2=1.34,1.73,1.84,2.22,2.52,2.89,2.98,3.88
"""
import argparse
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from spec_bench import SETS  # noqa: E402  (the open chat prompts)

TOPICS = ("the moon, volcanoes, the internet, bees, democracy, photosynthesis, the Roman Empire, coffee, "
          "electricity, dinosaurs, the ocean, music, chess, vaccines, climate change, the printing press, bicycles, "
          "trees, money, sleep, the human heart, gravity, airplanes, bread, recycling, the Olympic Games, mountains, "
          "rivers, libraries, smartphones, gardening, exercise, the solar system, earthquakes, penguins, the "
          "pyramids, computers, rain, time zones, honey, painting, football, birds, the brain, deserts, trains, "
          "paper, glass, cheese, soap, batteries, robots, whales, castles, the alphabet, maps, clocks, salt, "
          "plastic, rice, snow, the stock market, elephants, soil, wind power, telescopes, bridges, sharks, the "
          "immune system, forests, languages, poetry, magnets, the camera, holidays, rockets, lightning, apples, "
          "hospitals, dreams, mathematics, cars, spiders, kindness, patience, reading, writing, saving money, "
          "public speaking, time management").split(", ")
TEMPLATES = ("Tell me about {t}.", "Explain {t} to a child.", "What are three interesting facts about {t}?",
             "Why is {t} important?", "Write a short paragraph about {t}.", "What should I know about {t}?",
             "Give me a brief overview of {t}.", "Describe {t} in simple words.")


def answers(args, prompts, path):
    """Greedy answers (token ids) to prompts, cached in path (one JSON line each)."""
    done = []
    if os.path.exists(path):
        with open(path) as f:
            done = [json.loads(line) for line in f]
    with open(path, "a") as out:
        for i, p in enumerate(prompts[len(done):], len(done)):
            r = subprocess.run([args.ebb, "generate", "-m", args.model, "--chat", p, "--temp", "0", "-n",
                                str(args.max_tokens), "--print-ids", "-t", "1"], capture_output=True, text=True,
                               check=True)
            done.append({"prompt": p, "ids": [int(x) for x in r.stdout.split()]})
            out.write(json.dumps(done[-1]) + "\n")
            out.flush()
            if (i + 1) % 50 == 0:
                print(f"  {path}: {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    return [d["ids"] for d in done[:len(prompts)]]


def own_draft(ctx, k):
    """The engine's lookup: the tokens after the latest earlier match of the last 3, then 2."""
    for n in (3, 2):
        if len(ctx) <= n:
            continue
        key = ctx[-n:]
        for j in range(len(ctx) - n - 1, -1, -1):
            if ctx[j:j + n] == key:
                return ctx[j + n:j + n + k]
    return []


class Table:
    def __init__(self, corpus, nmax):
        self.nmax, self.next = nmax, defaultdict(Counter)
        for seq in corpus:
            for i in range(1, len(seq)):
                for n in range(1, min(nmax, i) + 1):
                    self.next[tuple(seq[i - n:i])][seq[i]] += 1

    def draft(self, ctx, k, tau, mincount):
        out, c = [], list(ctx)
        while len(out) < k:
            for n in range(self.nmax, 0, -1):
                counts = self.next.get(tuple(c[-n:])) if len(c) >= n else None
                if counts:
                    break
            else:
                break
            tok, cnt = counts.most_common(1)[0]
            total = sum(counts.values())
            if cnt / total < tau or total < mincount:
                break
            out.append(tok)
            c.append(tok)
        return out


def replay(test, cost, draft):
    """Tokens per unit of cost decoding every answer with draft(ctx) proposals."""
    tokens = spent = kept = drafted = 0
    for y in test:
        i = 0
        while i < len(y):
            d = draft(y[:i])[:max(0, len(y) - i - 1)] if i else []
            a = 0
            while a < len(d) and d[a] == y[i + a]:
                a += 1
            spent += cost[len(d)]
            tokens += a + 1
            kept += a
            drafted += len(d)
            i += a + 1
    return tokens / spent, kept, drafted


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ebb", default=os.path.join(os.path.dirname(HERE), "build", "ebb"))
    ap.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--corpus", type=int, default=400, help="templated questions answered for the datastore")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--nmax", type=int, default=3)
    ap.add_argument("--verify", action="append", required=True,
                    help="PATH=c(1),...,c(8): a pass over k + 1 tokens against one token")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/ebb/draft_datastore"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    rng = random.Random(7)
    questions = [t.format(t=topic) for topic in TOPICS for t in TEMPLATES]
    rng.shuffle(questions)
    with open(os.path.join(HERE, "prompts", "chat50.txt")) as f:
        tests = [line.strip() for line in f if line.strip()] + SETS["open chat"]
    corpus = answers(args, questions[:args.corpus], os.path.join(args.work, "corpus.jsonl"))
    test = answers(args, tests, os.path.join(args.work, "test.jsonl"))
    table = Table(corpus, args.nmax)
    first = sum(1 for y in test for i in range(1, len(y)) if table.draft(y[:i], 1, 0, 1) == [y[i]])
    print(f"datastore: {len(corpus)} answers, {sum(map(len, corpus))} tokens; test: {len(test)} answers, "
          f"{sum(map(len, test))} tokens; the table's next token is the model's at "
          f"{first / sum(len(y) - 1 for y in test):.1%} of positions")
    print("| path | drafts | best tokens per cost | k | tau | min count | kept / drafted |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for spec in args.verify:
        path, vals = spec.split("=")
        cost = [1.0] + [float(x) for x in vals.split(",")]
        ks = range(1, len(cost))
        best_own = max((replay(test, cost, lambda c, k=k: own_draft(c, k)) + (k,) for k in ks), key=lambda r: r[0])
        print(f"| {path} | own text | {best_own[0]:.3f}x | {best_own[3]} | - | - | {best_own[1]} / {best_own[2]} |")
        best = None
        for k in ks:
            for tau in (0.0, 0.3, 0.5, 0.7, 0.9):
                for mincount in (1, 3):
                    r = replay(test, cost, lambda c, k=k, tau=tau, m=mincount: own_draft(c, k) or
                               table.draft(c, k, tau, m))
                    if not best or r[0] > best[0]:
                        best = r + (k, tau, mincount)
        print(f"| {path} | own text, else datastore | {best[0]:.3f}x | {best[3]} | {best[4]} | {best[5]} | "
              f"{best[1]} / {best[2]} |")


if __name__ == "__main__":
    main()
