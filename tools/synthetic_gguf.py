#!/usr/bin/env python3
"""Writes a synthetic Llama-shaped GGUF with random quantized weights, for speed and
memory measurements beyond the 135M default model (tools/bench.sh, docs/benchmarks.md).

Speed does not depend on the weights' values, only on their shapes and storage type, so
the blocks are random bytes with small finite f16 scales (weights of roughly the size a
trained model's have, so activations stay finite through the layers). The tokenizer is
copied from a real GGUF (the default model's), which makes the file loadable by ebb and by
llama.cpp alike; the text it generates is noise.

    tools/synthetic_gguf.py --type Q4_0 -o ~/.cache/ebb/synthetic-1.1B.Q4_0.gguf
    tools/synthetic_gguf.py --type Q4_K -o ~/.cache/ebb/synthetic-1.1B.Q4_K.gguf
    tools/synthetic_gguf.py --type Q4_K_M -o ~/.cache/ebb/synthetic-1.1B.Q4_K_M.gguf

The default shape is TinyLlama-1.1B's (22 layers, hidden 2048, 32 query heads over 4 KV
heads, FFN 5632) with the source tokenizer's vocabulary: about 1.1 billion parameters.
`--shape llama3-8b` gives Llama-3-8B's layers (32 of hidden 4096, 32 query heads over 8 KV
heads, FFN 14336; the vocabulary stays the source tokenizer's 49,152, not Llama 3's 128,256,
so the head is smaller): the GPU benchmark's large model (issue 16).

    tools/synthetic_gguf.py --type Q4_K --shape llama3-8b -o ~/.cache/ebb/synthetic-llama3-8b.Q4_K.gguf
"""

SHAPES = {   # layers, hidden, FFN, query heads, KV heads
    "tinyllama-1.1b": (22, 2048, 5632, 32, 4),
    "llama3-8b": (32, 4096, 14336, 32, 8),
}
import argparse
import os
import sys

import numpy as np
import gguf

# Bytes per block and block length of the types this tool writes, and where each block
# keeps its f16 scale fields (which must be finite and small; every other byte is random).
BLOCKS = {
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, 32, 18, [0]),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, 32, 34, [0]),
    "Q4_K": (gguf.GGMLQuantizationType.Q4_K, 256, 144, [0, 2]),
    "Q5_K": (gguf.GGMLQuantizationType.Q5_K, 256, 176, [0, 2]),
    "Q6_K": (gguf.GGMLQuantizationType.Q6_K, 256, 210, [208]),
}


def random_blocks(rng, kind, n_elems, scale):
    qtype, block, nbytes, f16_at = BLOCKS[kind]
    n_blocks = n_elems // block
    data = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for at in f16_at:
        halves = (rng.random(n_blocks, dtype=np.float32) * scale + scale / 4).astype(np.float16)
        data[:, at:at + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return data, qtype


def copy_fields(reader, writer, wanted):
    """Every metadata key of the source for which wanted(name) holds, value for value
    (GGUF's own header fields never)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or not wanted(field.name):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                value = [field.parts[i][0].item() for i in field.data]
            writer.add_array(field.name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8"))
        else:
            writer.add_key_value(field.name, field.parts[field.data[0]][0].item(), vtype)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", choices=["Q4_0", "Q4_K", "Q4_K_M", "Q5_K", "Q5_K_M"], required=True,
                    help="storage type of every matrix (Q4_K, Q5_K: the output head in Q6_K, as llama.cpp does; "
                         "Q4_K_M, Q5_K_M: also attn_v and ffn_down in Q6_K in the layers llama.cpp's _M mixes "
                         "give more bits, the first and last eighth and every third between)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--tokenizer-from", default=os.path.join(here, "..", "models",
                                                             "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b",
                    help="a model's layer shapes; the flags below override its numbers")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--embd", type=int)
    ap.add_argument("--ff", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    for key, value in zip(("layers", "embd", "ff", "heads", "kv_heads"), SHAPES[a.shape]):
        if getattr(a, key) is None:
            setattr(a, key, value)

    base = a.type[:-2] if a.type.endswith("_M") else a.type
    block = BLOCKS[base][1]
    if a.embd % block or a.ff % block:
        sys.exit(f"synthetic_gguf: hidden {a.embd} and FFN {a.ff} must be multiples of {block} for {a.type}")
    reader = gguf.GGUFReader(a.tokenizer_from)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = a.embd // a.heads
    kv_dim = head_dim * a.kv_heads
    rng = np.random.default_rng(a.seed)

    tmp = a.output + ".part"
    w = gguf.GGUFWriter(tmp, "llama", use_temp_file=True)
    w.add_name(f"synthetic {a.type} ({a.layers} layers x {a.embd}, random weights)")
    w.add_context_length(4096)
    w.add_embedding_length(a.embd)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    copy_fields(reader, w, lambda name: name.startswith("tokenizer."))

    params = 0

    def matrix(name, n_out, n_in, kind=base):
        nonlocal params
        # weights of about 1/sqrt(n_in): a 4-bit code times d spans roughly +-8 d
        scale = 1.0 / (8.0 * np.sqrt(n_in))
        data, qtype = random_blocks(rng, kind, n_out * n_in, scale)
        w.add_tensor(name, data, raw_shape=(n_out, n_in * BLOCKS[kind][2] // BLOCKS[kind][1]), raw_dtype=qtype)
        params += n_out * n_in

    def vector(name, n):
        nonlocal params
        w.add_tensor(name, np.ones(n, dtype=np.float32))
        params += n

    matrix("token_embd.weight", n_vocab, a.embd)
    for layer in range(a.layers):
        p = f"blk.{layer}."
        eighth = a.layers // 8
        more_bits = layer < eighth or layer >= 7 * a.layers // 8 or (layer - eighth) % 3 == 2
        wide = "Q6_K" if a.type.endswith("_M") and more_bits else base
        vector(p + "attn_norm.weight", a.embd)
        matrix(p + "attn_q.weight", a.embd, a.embd)
        matrix(p + "attn_k.weight", kv_dim, a.embd)
        matrix(p + "attn_v.weight", kv_dim, a.embd, wide)
        matrix(p + "attn_output.weight", a.embd, a.embd)
        vector(p + "ffn_norm.weight", a.embd)
        matrix(p + "ffn_gate.weight", a.ff, a.embd)
        matrix(p + "ffn_up.weight", a.ff, a.embd)
        matrix(p + "ffn_down.weight", a.embd, a.ff, wide)
        print(f"\rsynthetic_gguf: layer {layer + 1}/{a.layers}", end="", file=sys.stderr, flush=True)
    vector("output_norm.weight", a.embd)
    matrix("output.weight", n_vocab, a.embd, "Q6_K" if base in ("Q4_K", "Q5_K") else base)
    print(file=sys.stderr)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    os.replace(tmp, a.output)
    print(f"synthetic_gguf: wrote {a.output}: {params / 1e9:.2f}B parameters, "
          f"{os.path.getsize(a.output) / 2**20:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
