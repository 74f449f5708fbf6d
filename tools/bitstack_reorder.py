#!/usr/bin/env python3
"""Copies a bitstack file (docs/formats.md) with another stack order, for the order
ablation in docs/benchmarks.md, without decomposing the model again.

The order is only the `ebb.bitstack.order` array: a permutation of the block numbers,
level by level, of fixed length. Another order of the same blocks is therefore the same
bytes in the same place, so the copy is the source file with that array overwritten and
nothing else changed (offsets, tensors and every other key stay as they are).

The orders are the packer's (`ebb pack --bitstack-order`, tools/pack/bitstack.c), computed
the same way so that a file from here equals the one the packer would have written:
  uniform  within a level, matrix index order (layer 0's q, k, v, o, gate, up, down, then
           layer 1's, ...);
  random   within a level, a Fisher-Yates shuffle of that list, levels in order, drawn
           from one splitmix64 generator seeded with the packer's --seed.
`importance` needs the calibration-weighted error of every block, which the file does
not hold: only the packer computes it.

    tools/bitstack_reorder.py /tmp/bs/smol.bitstack.gguf --order random --seed 1 -o random.gguf
"""
import argparse
import shutil
import sys

import numpy as np
import gguf

MASK = (1 << 64) - 1
KINDS = 7


def splitmix64(state):
    """(next state, output): the generator of tools/pack/calibrate.c."""
    state = (state + 0x9E3779B97F4A7C15) & MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return state, z ^ (z >> 31)


def stack_order(kind, n_matrices, levels, seed):
    """The block numbers (matrix * levels + level) in stack order."""
    state = seed & MASK
    order = []
    for level in range(levels):
        blocks = [m * levels + level for m in range(n_matrices)]
        if kind == "random":
            for i in range(len(blocks) - 1, 0, -1):
                state, r = splitmix64(state)
                j = r % (i + 1)
                blocks[i], blocks[j] = blocks[j], blocks[i]
        order.extend(blocks)
    return order


def order_field(path):
    """(levels, n_matrices, byte offset of the order's first element, its length)."""
    r = gguf.GGUFReader(path)
    f = r.fields
    if "ebb.bitstack.order" not in f or bytes(f["ebb.format"].parts[-1]).decode() != "bitstack":
        sys.exit(f"{path}: not a bitstack file")
    levels = int(f["ebb.bitstack.levels"].parts[-1][0])
    arch = bytes(f["general.architecture"].parts[-1]).decode()
    n_layer = int(f[f"{arch}.block_count"].parts[-1][0])
    field = f["ebb.bitstack.order"]
    first = field.data[0]
    offset = field.offset + sum(p.nbytes for p in field.parts[:first])
    return levels, n_layer * KINDS, offset, len(field.data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--order", choices=["random", "uniform"], required=True)
    ap.add_argument("--seed", type=int, default=1, help="random: the packer's --seed (default 1, as its default)")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    levels, n_matrices, offset, n = order_field(a.file)
    if n != levels * n_matrices:
        sys.exit(f"{a.file}: ebb.bitstack.order has {n} entries, not {levels * n_matrices}")
    order = np.array(stack_order(a.order, n_matrices, levels, a.seed), dtype="<u4")
    shutil.copyfile(a.file, a.output)
    with open(a.output, "r+b") as out:
        out.seek(offset)
        out.write(order.tobytes())
    print(f"{a.output}: {a.order} order of {n} blocks ({levels} levels of {n_matrices} matrices)")


if __name__ == "__main__":
    main()
