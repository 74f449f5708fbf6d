#!/usr/bin/env python3
"""The first N layers of a GGUF as a model of their own: the same tokenizer, embedding,
final norm and head, every tensor byte for byte in its own type, and `block_count` N.
Its text is no good, but every op of the full model runs on it: tools/gpu-check.sh
carries one to the GPU machine, which cannot fetch the model and takes only 64 MiB.

    tools/gguf_first_layers.py models/SmolLM2-135M-Instruct.Q4_1.gguf --layers 6 -o first6.gguf
"""
import argparse
import os
import re
import sys

import gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_gguf import copy_fields  # noqa: E402

LAYER = re.compile(r"blk\.(\d+)\.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    r = gguf.GGUFReader(a.source)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    count_key = f"{arch}.block_count"
    total = int(r.fields[count_key].parts[-1][0])
    if not 1 <= a.layers <= total:
        sys.exit(f"{a.source} has {total} layers; --layers must be 1..{total}")
    w = gguf.GGUFWriter(a.output, arch)
    copy_fields(r, w, lambda name: name not in {"general.architecture", count_key})
    w.add_block_count(a.layers)
    kept = 0
    for t in r.tensors:
        m = LAYER.match(t.name)
        if m and int(m.group(1)) >= a.layers:
            continue
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        kept += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.output}: {a.layers} of {total} layers, {kept} tensors, {os.path.getsize(a.output)} bytes")


if __name__ == "__main__":
    main()
