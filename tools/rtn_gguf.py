#!/usr/bin/env python3
"""Round-to-nearest baseline for the BitStack measurements (docs/benchmarks.md): a copy of
a GGUF in F32 whose seven layer matrices (attn_q/k/v/output, ffn_gate/up/down) are the
source's weights rounded to BITS bits in groups of 64 and dequantized again, so that `ebb
ppl` scores the quantized weights with f32 arithmetic. A measurement tool, not a format:
nothing serves these files.

The rule is the usual asymmetric one, per group of 64 consecutive inputs of a row:
scale = (max - min) / (2^BITS - 1), q = round((w - min) / scale), w' = min + q * scale,
with scale and min rounded to f16 as a file would store them. Its cost is BITS + 32/64
bits a weight (two f16 per group). Every other tensor (embedding, norms, head) is the
source's, dequantized to F32.

    tools/rtn_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf --bits 3 -o rtn3.gguf
"""
import argparse
import os
import re
import sys

import numpy as np
import gguf
from gguf import quants

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_gguf import copy_fields  # noqa: E402

GROUP = 64
MATRICES = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def rtn(w, bits):
    """w [rows][cols] rounded to bits in groups of GROUP along a row, dequantized."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // GROUP, GROUP).astype(np.float32)
    lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float32)
    lo = lo.astype(np.float16).astype(np.float32)
    safe = np.where(scale > 0, scale, 1)
    q = np.clip(np.round((g - lo) / safe), 0, 2 ** bits - 1)
    return (lo + q * scale).reshape(rows, cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8], required=True)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    r = gguf.GGUFReader(a.source)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(a.output, arch)
    copy_fields(r, w, lambda name: name not in {"general.architecture", "general.file_type"})
    n_rounded = 0
    for t in r.tensors:
        x = np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if MATRICES.match(t.name):
            x = rtn(x, a.bits)
            n_rounded += 1
        w.add_tensor(t.name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.output}: {n_rounded} matrices rounded to {a.bits} bits in groups of {GROUP} "
          f"({a.bits + 32 / GROUP:.2f} bits a weight)")


if __name__ == "__main__":
    main()
