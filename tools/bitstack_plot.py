#!/usr/bin/env python3
"""Plots tools/bitstack_sweep.sh's CSVs: held-out perplexity against the bits a weight the
layer matrices cost, a stack at its budgets (one line per order) beside the baselines, for
docs/benchmarks.md.

The x axis is the layer matrices' bytes over their weights, so a stack prefix and a
quantized copy sit where they cost the same: a prefix's resident bytes times 8 over the
weights of the stack's matrices (counted from its sign tensors: one bit a weight a level),
plus a base's bytes when the stack sits on one (drawn as its own line);
round-to-nearest at b bits in groups of 64 costs b + 0.5 (two f16 a group), a Q4_1 source
5 (20 bytes a block of 32). f32 is drawn as a line: 32 bits a weight is off the scale.
Perplexity is on a log axis: the stack's one-level prefix is orders of magnitude worse
than its last.

    tools/bitstack_plot.py ablation.csv budgets.csv baselines.csv -o docs/bitstack_sweep.png
    tools/bitstack_plot.py docs/data/bitstack_{budgets,halves,baselines}_32.csv \
        --windows 32 -o docs/bitstack_sweep_32.png
    tools/bitstack_plot.py docs/data/bitstack_{budgets,halves,baselines,base_halves}_32.csv \
        --windows 32 --model models/SmolLM2-135M-Instruct.Q4_1.gguf -o docs/bitstack_base_32.png
"""
import argparse
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bitstack_gguf  # noqa: E402
import gguf_header  # noqa: E402

BASELINE_BPW = {"source": 5.0, "rtn2": 2.5, "rtn3": 3.5, "rtn4": 4.5}


def stack_weights(path, model=None):
    """Weights of the stack's matrices and the bytes of its base (0 without one), from the
    header alone (the `gguf` package cannot open a stack on a base). A stack file that is
    gone is taken for a plain stack of `model`'s shapes, when given."""
    if not os.path.exists(path) and model:
        path = model
    kv, tensors, _ = gguf_header.read(path)
    per_layer = sum(rows * cols for rows, cols in bitstack_gguf.matrix_shapes(kv).values())
    base = sum(dims[0] * dims[1] // 64 * 20 for name, (_, dims, _) in tensors.items() if name.endswith(".bs_base"))
    return kv[f"{kv['general.architecture']}.block_count"] * per_layer, base


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--windows", type=int, help="windows the CSVs' runs scored, named in the title")
    ap.add_argument("--model", help="a GGUF of the same model: its shapes stand for a plain stack file that is gone")
    a = ap.parse_args()
    rows = []
    for path in a.csv:
        with open(path) as f:
            rows += list(csv.DictReader(f))
    weights = {}
    series = {}
    for r in rows:
        base = 0
        if r["resident_bytes"]:
            if r["file"] not in weights:
                weights[r["file"]] = stack_weights(r["file"], a.model)
            n, base = weights[r["file"]]
            bpw = 8 * (int(r["resident_bytes"]) + base) / n
        else:
            bpw = BASELINE_BPW.get(r["kind"])
        key = (r["kind"] + ("+base" if base else "")) if r["resident_bytes"] else \
            ("rtn" if r["kind"].startswith("rtn") else r["kind"])
        series.setdefault(key, {})[bpw] = float(r["ppl"])   # a repeated point: the last run counts
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"importance": ("o-", "stack, importance order"), "random": ("s--", "stack, random order"),
              "uniform": ("^:", "stack, matrix order (uniform)"),
              "importance+base": ("v-", "stack on a 2-bit base (W2G64)"), "rtn": ("D-", "round to nearest, g64"),
              "source": ("*", "Q4_1 source")}
    for key, (style, label) in styles.items():
        if key in series:
            pts = sorted(series[key].items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=7)
            if key == "rtn":
                for x, y in pts:
                    ax.annotate(f"{x - 0.5:.0f} bits", (x, y),
                                textcoords="offset points", xytext=(4, 4), fontsize=8)
    if "f32" in series:
        ax.axhline(next(iter(series["f32"].values())), color="gray", lw=1, ls="-.", label="f32 source")
    ax.set_yscale("log")
    ax.set_xlabel("bits a weight of the layer matrices")
    ax.set_ylabel("perplexity, held-out text (log)")
    title = "SmolLM2-135M: BitStack prefixes against round to nearest"
    ax.set_title(title + (f" ({a.windows} windows)" if a.windows else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.output, dpi=110)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
