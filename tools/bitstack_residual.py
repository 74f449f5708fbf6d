#!/usr/bin/env python3
"""Measurement tool for docs/benchmarks.md (issue 12's stretch question): does a BitStack
built on the residual of a low-bit round-to-nearest base beat a plain stack at the same
bytes? Writes an F32 GGUF whose seven layer matrices are

    W' = RTN_b(W) + (B_1 + ... + B_L) diag(1 / s)

where RTN_b is tools/rtn_gguf.py's rounding (b bits, groups of 64) and B_k are BitStack
blocks peeled off the scaled residual (W - RTN_b(W)) diag(s) exactly as the packer peels
W diag(s) (tools/pack/bitstack.c: sign of the residual times the rank-r SVD of its
magnitude, singular values split between the factors, factors rounded to f16 before the
residual is updated). The activation scales s and the ranks are read from a stack the
packer wrote for the same source, so the two stacks differ only in what they start from.
`ebb ppl` then scores the file; nothing serves it (no runtime format is proposed).

Cost a weight: b + 0.5 for the base, plus L levels of (1 bit + the factors' 2 r (rows +
cols) bytes over rows x cols).

    tools/bitstack_residual.py models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/bs/smol.bitstack.gguf \
        --bits 2 --levels 1 -o rtn2+1.gguf
"""
import argparse
import os
import sys

import numpy as np
import gguf
from gguf import quants

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rtn_gguf import MATRICES, rtn  # noqa: E402
from synthetic_gguf import copy_fields  # noqa: E402
import bitstack_gguf  # noqa: E402

POINT = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_out",
         "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "ffn_down_in"}


def peel(res, rank, levels):
    """The sum of `levels` blocks peeled off res (modified: what is left)."""
    total = np.zeros_like(res)
    for _ in range(levels):
        u, sv, vt = np.linalg.svd(np.abs(res), full_matrices=False)
        root = np.sqrt(np.maximum(sv[:rank], 0))
        fu = (u[:, :rank] * root).astype(np.float16).astype(np.float32)
        fv = (vt[:rank].T * root).astype(np.float16).astype(np.float32)
        block = np.where(res < 0, -1.0, 1.0).astype(np.float32) * (fu @ fv.T)
        res -= block
        total += block
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("stack", help="a stack of the same source: its scales and ranks are used")
    ap.add_argument("--bits", type=int, choices=[2, 3, 4], required=True)
    ap.add_argument("--levels", type=int, required=True)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    st = {t.name: t for t in gguf.GGUFReader(a.stack).tensors}
    r = gguf.GGUFReader(a.source)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(a.output, arch)
    copy_fields(r, w, lambda name: name not in {"general.architecture", "general.file_type"})
    bits = weights = 0
    for t in r.tensors:
        x = np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        m = MATRICES.match(t.name)
        if m:
            layer = t.name.split(".")[1]
            s = np.asarray(st[f"blk.{layer}.{POINT[m.group(1)]}.bs_scale"].data, dtype=np.float32)
            rank = bitstack_gguf.rank_of(int(st[f"blk.{layer}.{m.group(1)}.bs_blocks"].shape[0]), *x.shape)
            base = rtn(x, a.bits)
            res = (x - base) * s
            x = base + peel(res, rank, a.levels) / s
            rows, cols = x.shape
            weights += rows * cols
            bits += rows * cols * (a.bits + 0.5) + a.levels * (rows * cols + 16 * rank * (rows + cols))
            print(f"\r{t.name}", end="", file=sys.stderr)
        w.add_tensor(t.name, x)
    print(file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.output}: RTN {a.bits} bits + {a.levels} stack levels, {bits / weights:.3f} bits a weight")


if __name__ == "__main__":
    main()
