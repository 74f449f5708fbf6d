"""A BitStack file's blocks as the `gguf` package reads them (docs/formats.md's "bitstack"), for
the tools and tests that look inside a stack without ebb.

Each layer matrix is one I8 tensor `blk.N.M.bs_blocks` of shape (block bytes, levels): level
after level, each block whole -- its signs [rows][cols/8], then u [rows][rank] and v
[cols][rank] in f16. The rank is not stored: it is what the block's bytes leave after the
signs, as engine/bitstack.c's loader derives it.

Run as a script, it prints the bytes of one level of the stack and the number of levels (of
any stack, a stack on a base included; the functions above need the `gguf` package, which
opens plain stacks only).
"""
import sys

import numpy as np

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def levels(reader):
    return int(reader.fields["ebb.bitstack.levels"].parts[-1][0])


def block_tensors(reader):
    return [t for t in reader.tensors if t.name.endswith(".bs_blocks")]


def stack_bytes(reader):
    """Bytes of every block of the stack (what `ebb ppl` reports as the whole stack)."""
    return sum(int(t.n_bytes) for t in block_tensors(reader))


def matrix_shapes(kv):
    """{kind: (rows, cols)} of a layer's matrices, outputs by inputs, from the model's dimensions
    in kv ({key: value}, as tools/gguf_header.py reads them)."""
    arch = kv["general.architecture"]
    n_embd, n_ff = kv[f"{arch}.embedding_length"], kv[f"{arch}.feed_forward_length"]
    n_head, n_head_kv = kv[f"{arch}.attention.head_count"], kv[f"{arch}.attention.head_count_kv"]
    head_dim = kv.get(f"{arch}.attention.key_length", n_embd // n_head)
    q, kv_dim = n_head * head_dim, n_head_kv * head_dim
    return {"attn_q": (q, n_embd), "attn_k": (kv_dim, n_embd), "attn_v": (kv_dim, n_embd),
            "attn_output": (n_embd, q), "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd),
            "ffn_down": (n_embd, n_ff)}


def matrix_shape(reader, kind):
    """(rows, cols) of a kind's matrices, from a `gguf` reader's fields."""
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    keys = ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
            "attention.key_length")
    kv = {f"{arch}.{k}": int(reader.fields[f"{arch}.{k}"].parts[-1][0]) for k in keys if f"{arch}.{k}" in reader.fields}
    return matrix_shapes({"general.architecture": arch, **kv})[kind]


def rank_of(block_bytes, rows, cols):
    rank, extra = divmod(block_bytes - rows * cols // 8, 2 * (rows + cols))
    if rank < 1 or extra:
        raise ValueError(f"{block_bytes} bytes are not a block of a {rows} x {cols} matrix")
    return rank


def split_blocks(tensor, rows, cols):
    """A matrix's levels as (signs uint8 [rows][cols/8], u f16 [rows][rank], v f16 [cols][rank])."""
    data = np.asarray(tensor.data, dtype=np.int8).view(np.uint8).reshape(-1, int(tensor.shape[0]))
    rank = rank_of(int(tensor.shape[0]), rows, cols)
    sign_bytes, u_bytes = rows * cols // 8, 2 * rows * rank
    out = []
    for block in data:
        signs = block[:sign_bytes].reshape(rows, cols // 8)
        u = block[sign_bytes:sign_bytes + u_bytes].view(np.float16).reshape(rows, rank)
        v = block[sign_bytes + u_bytes:].view(np.float16).reshape(cols, rank)
        out.append((signs, u, v))
    return out


def stack_weights(reader):
    """Weights in the stack's matrices (each level holds one sign bit of each)."""
    total = 0
    for t in block_tensors(reader):
        rows, cols = matrix_shape(reader, t.name.split(".")[2])
        total += rows * cols
    return total


def level_bytes(path):
    """(bytes of one level, levels) of the stack in the file at path, from the header alone
    (tools/gguf_header.py), so that a stack on a W2G64 base, which the `gguf` package cannot
    open, is read too."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gguf_header
    kv, tensors, _ = gguf_header.read(path)
    n = kv["ebb.bitstack.levels"]
    total = sum(dims[0] * dims[1] for name, (_, dims, _) in tensors.items() if name.endswith(".bs_blocks"))
    return total // n, n


def main():
    print(*level_bytes(sys.argv[1]))


if __name__ == "__main__":
    main()
