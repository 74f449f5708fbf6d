"""A GGUF v3 file's metadata and tensor table, read from the GGUF specification alone.

The `gguf` package refuses tensor types it does not know, and ebb's own types (W4G64, W2G64:
kernels/formats.h, numbered from 64) are among them, so the tests and tools that look into a
packed file or a stack on a base read its header here:

    kv, tensors, data_start = read(path)
    type_number, dims, offset = tensors["blk.0.attn_q.bs_base"]

dims are in GGUF's order (the contiguous dimension first); a tensor's bytes start at
data_start + offset.
"""
import struct


def read(path):
    with open(path, "rb") as f:
        data = f.read(32 << 20)   # the header (vocabulary and merges included) fits easily
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n:pos].decode("utf-8", "surrogateescape")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert take("4s") == b"GGUF" and take("I") == 3, f"{path} is not a GGUF v3 file"
    n_tensors, n_kv = take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        key = string()
        kv[key] = value(take("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        tensors[name] = (take("I"), dims, take("Q"))
    align = kv.get("general.alignment", 32)
    return kv, tensors, (pos + align - 1) // align * align
