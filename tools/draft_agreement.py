#!/usr/bin/env python3
"""Would a cheaper form of the served model draft well? (issue 13's self-draft question,
for docs/benchmarks.md.)

A self-draft proposes the token a cheaper model picks; verification keeps it when the
served model (greedy) picks the same. So the acceptance a self-draft can reach is bounded
by how often the two argmaxes agree on the same context. This measures that agreement,
teacher-forced on held-out text, for:
  - a shallow prefix of the model's BitStack stack (1, 2, 3 levels: `ebb logits
    --stack-bytes` on the stack file), against the served file;
  - a draft head over the N most frequent tokens of the calibration text (the served
    model's own logits, argmax restricted to those rows), N = 2048 .. 16384;
When the served model is the stack itself (--served STACK: a stack on a 2-bit base serves
well whole), level 0 is its base alone.

And, given what a draft token costs relative to one of the served model (--costs, from
`ebb bench` tg numbers: a stack level's decode against the file's; a draft head runs every
layer and N / n_vocab of the head) and the verification curve c(k) (--verify, from `ebb
bench --verify 8`), the best speedup over plain decoding such a draft could give:
max over k of (1 + a + ... + a^k) / (k * cost + c(k)), a the agreement.

    tools/draft_agreement.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --stack /tmp/bsm/smol.ckpt.gguf --windows 4
    tools/draft_agreement.py --stack smol.wbase.gguf --served smol.wbase.gguf --levels 0,1,2 \\
        --stack-costs 0.32,0.57,0.76 --heads "" --verify 1,1.37,1.90,2.11,2.68,3.13,3.66,3.88,4.60
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile

import numpy as np


def tokenize(ebb, model, path):
    p = subprocess.run([ebb, "tokenize", "-m", model, "--file", path], capture_output=True, text=True, check=True)
    return [int(x) for line in p.stdout.splitlines() for x in line.split()]


def logits(ebb, model, ids, tmp, *extra):
    ids_file, out = os.path.join(tmp, "ids.txt"), os.path.join(tmp, "logits.f32")
    with open(ids_file, "w") as f:
        f.write(" ".join(map(str, ids)))
    p = subprocess.run([ebb, "logits", "-m", model, "--ids-file", ids_file, "-o", out, "--all", *extra],
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1)


def level_bytes(stack):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bitstack_gguf
    return bitstack_gguf.level_bytes(stack)[0]


def best_speedup(a, cost, c):
    best, best_k = 1.0, 0
    for k in range(1, len(c)):
        expect = sum(a ** i for i in range(k + 1))
        s = expect / (k * cost + c[k])
        if s > best:
            best, best_k = s, k
    return best, best_k


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ebb", default="build/ebb")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--stack", required=True, help="the model's BitStack file")
    ap.add_argument("--served", help="the file whose greedy tokens are the reference (default: --model)")
    ap.add_argument("--text", default=os.path.expanduser("~/.cache/ebb/heldout.txt"))
    ap.add_argument("--calibration", default=os.path.expanduser("~/.cache/ebb/calibration.txt"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--heads", default="2048,4096,8192,16384")
    # Measured on the development machine (docs/benchmarks.md): decode tok/s of the stack at
    # 1, 2, 3 levels (133.2, 64.1, 45.3) against the file (184), and c(k) after 53dc43c.
    ap.add_argument("--stack-costs", default="1.38,2.87,4.06", help="a draft token's cost per level")
    ap.add_argument("--head-share", type=float, default=0.31, help="the head's share of a token's time")
    ap.add_argument("--verify", default="1,1.23,1.97,1.96,2.48,2.80,3.40,3.18,3.73", help="c(0..8)")
    args = ap.parse_args()
    c = [float(x) for x in args.verify.split(",")]
    served = args.served or args.model
    ids = tokenize(args.ebb, served, args.text)
    windows = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(args.windows)]
    per_level = level_bytes(args.stack)
    levels = [int(x) for x in args.levels.split(",")]
    stack_costs = dict(zip(levels, (float(x) for x in args.stack_costs.split(","))))
    heads = [int(x) for x in args.heads.split(",") if x]
    counts = collections.Counter(tokenize(args.ebb, served, args.calibration)) if heads else None
    with tempfile.TemporaryDirectory() as tmp:
        full = [logits(args.ebb, served, w, tmp) for w in windows]
        target = [f.argmax(1) for f in full]
        n = sum(len(t) for t in target)
        rows = []
        for lv in levels:
            agree = sum(int((logits(args.ebb, args.stack, w, tmp, "--stack-bytes", str(lv * per_level)).argmax(1)
                             == t).sum()) for w, t in zip(windows, target))
            name = f"stack, {lv} level{'s' if lv > 1 else ''}" if lv else "the stack's base alone"
            rows.append((name, agree / n, stack_costs[lv]))
        vocab = full[0].shape[1]
        for h in heads:
            keep = np.array(sorted(t for t, _ in counts.most_common(h)))
            agree = sum(int((keep[f[:, keep].argmax(1)] == t).sum()) for f, t in zip(full, target))
            rows.append((f"draft head, {h} most frequent tokens", agree / n,
                         1 - args.head_share * (1 - h / vocab)))
    print(f"{n} positions ({args.windows} windows of {args.ctx}) of {args.text}; the greedy token of "
          f"{served} as the reference\n")
    print("| draft | agrees with the served model | a draft token costs | best speedup (k) |")
    print("| --- | ---: | ---: | ---: |")
    for name, a, cost in rows:
        s, k = best_speedup(a, cost, c)
        print(f"| {name} | {100 * a:.1f}% | {cost:.2f} | {s:.2f}x ({k}) |")


if __name__ == "__main__":
    main()
