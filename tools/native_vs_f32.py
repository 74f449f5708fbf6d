#!/usr/bin/env python3
"""How far the native path's logits are from the f32-dequantized path's, on the same file.

The native path multiplies a GGUF's own blocks against activations quantized to 8 bits in
blocks of 32 (or 256 for the K-quants), as llama.cpp does; `--weights f32` dequantizes the
weights once and computes in float32 (the path checked against the numpy reference). This runs
`ebb logits --all` both ways over windows of the held-out text (tools/heldout.py; its lines
tokenized one by one and concatenated, `ebb tokenize --file`) and prints,
per file: the largest absolute logit difference, the mean over positions of the row's largest
difference relative to the row's spread (max - min), how often the top token differs, and the
KL divergence of the native distribution from the f32 one (mean and 99th percentile, nats).

Greedy 64-token answers to the chat prompts are compared by tools/agreement.py
(`tools/agreement.py f32:MODEL MODEL`).

Usage: tools/native_vs_f32.py [MODEL ...]   (default: the default model)
Environment: EBB (default build/ebb), WINDOWS (default 4), CTX (default 512).
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
EBB = os.environ.get("EBB", os.path.join(HERE, "..", "build", "ebb"))


def heldout():
    return subprocess.run([sys.executable, os.path.join(HERE, "heldout.py")], check=True, capture_output=True,
                          text=True).stdout.strip()


def logits(model, ids, weights, tmp):
    ids_file, out = os.path.join(tmp, "ids.txt"), os.path.join(tmp, f"{weights}.bin")
    with open(ids_file, "w") as f:
        f.write(" ".join(map(str, ids)))
    subprocess.run([EBB, "logits", "-m", model, "--ids-file", ids_file, "-o", out, "--all", "--weights", weights],
                   check=True, capture_output=True)
    return np.fromfile(out, dtype=np.float32).reshape(len(ids), -1).astype(np.float64)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def main():
    models = sys.argv[1:] or [os.path.join(HERE, "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")]
    windows, ctx = int(os.environ.get("WINDOWS", "4")), int(os.environ.get("CTX", "512"))
    text = heldout()
    print("| file | positions | max abs error | mean row error / row spread | top-1 differs | KL mean | KL p99 |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        ids = [int(t) for t in subprocess.run([EBB, "tokenize", "-m", model, "--file", text], check=True,
                                              capture_output=True, text=True).stdout.split()]
        worst, rel, flips, kls, n = 0.0, [], 0, [], 0
        with tempfile.TemporaryDirectory() as tmp:
            for w in range(windows):
                chunk = ids[w * ctx:(w + 1) * ctx]
                if len(chunk) < ctx:
                    break
                a, b = logits(model, chunk, "native", tmp), logits(model, chunk, "f32", tmp)
                d = np.abs(a - b)
                worst = max(worst, float(d.max()))
                rel += list(d.max(axis=1) / (b.max(axis=1) - b.min(axis=1)))
                flips += int((a.argmax(axis=1) != b.argmax(axis=1)).sum())
                lp, lq = log_softmax(b), log_softmax(a)
                kls += list((np.exp(lp) * (lp - lq)).sum(axis=1))
                n += len(chunk)
        print(f"| {os.path.basename(model)} | {n} | {worst:.3f} | {100 * np.mean(rel):.2f}% | {flips} "
              f"({100 * flips / max(1, n):.1f}%) | {np.mean(kls):.5f} | {np.percentile(kls, 99):.5f} |", flush=True)


if __name__ == "__main__":
    main()
