#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/<target>/ (README.md there).

    ~/.cache/ebb/venv/bin/python tests/fuzz/make_seeds.py --ebb build/ebb

Seeds are named seed-*; files named crash-* (reproducers of fixed bugs) are never
touched. The GGUF seeds are a tiny Llama-shaped model (one layer, width 64, the first
300 tokens of the default model's vocabulary with the merges that make them, quantized
weights of random values) written with the `gguf` package, the same packed by `ebb pack`
(w4a4 and source formats, when --ebb is given), a reader-only file holding one tensor of
every type, and truncated or damaged copies. Each stays under 64 KiB so the fuzzer can
mutate it whole. The other seeds are written out below as the bytes they are.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import gguf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MAX_SEED = 64 << 10
N_VOCAB = 300


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    assert len(data) <= MAX_SEED, (target, name, len(data))
    with open(os.path.join(HERE, target, "seed-" + name), "wb") as f:
        f.write(data)


def clear_seeds():
    for target in ("http", "json", "tokenizer", "gguf", "catalog"):
        os.makedirs(os.path.join(HERE, target), exist_ok=True)
        for name in os.listdir(os.path.join(HERE, target)):
            if name.startswith("seed-"):
                os.unlink(os.path.join(HERE, target, name))


# ---------------------------------------------------------------- http

def http_seeds():
    """Byte 0: handler mode (bit 2: end with a reset), byte 1: write size (0: one write)."""
    chat = b'{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true}'
    reqs = {
        "get-health": b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "post-chat": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:8080\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer sk-test\r\nContent-Length: %d\r\n\r\n%s" % (len(chat), chat),
        "chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5;ext=1\r\n{\"pro\r\n10\r\nmpt\":\"hello\",\"max\r\n0\r\nX-Trailer: yes\r\n\r\n",
        "pipelined": b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"POST /tokenize HTTP/1.1\r\nHost: a\r\nContent-Length: 17\r\n\r\n{\"prompt\":\"hi!\"}\n"
                     b"HEAD /ready HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"DELETE /v1/requests/cmpl-42 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "http10-keepalive": b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /health HTTP/1.0\r\n\r\n",
        "expect-continue": b"PUT /admin/memory HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 30\r\n\r\n"
                           b"{\"memory_budget_bytes\":123456}",
        "absolute-form": b"GET http://localhost:8080/v1/models?x=1 HTTP/1.1\r\nHost: localhost:8080\r\n\r\n"
                         b"GET http://localhost?q HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n  two\r\n\r\n",
        "no-host": b"GET /health HTTP/1.1\r\nUser-Agent: fuzz\r\n\r\n",
        "two-hosts": b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "percent-path": b"DELETE /admin/models/smol%3Alatest HTTP/1.1\r\nHost: a\r\nAuthorization: bearer t\r\n\r\n"
                        b"GET /v1/models/a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n",
        "cl-and-te": b"POST /debug/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\n\r\n",
        "bad-chunk": b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        "upgrade": b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "big-header": b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"A" * 4200 + b"\r\n\r\n",
        "body-too-large": b"POST /v1/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999\r\n\r\n{",
        "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        "query-utf8": "GET /v1/models/é?q=ü HTTP/1.1\r\nHost: ä\r\n\r\n".encode(),
        "close-then-more": b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /ready HTTP/1.1\r\nHost: a\r\n\r\n",
    }
    for i, (name, req) in enumerate(sorted(reqs.items())):
        mode = i % 8
        write("http", f"{name}", bytes([mode, 0]) + req)
    # The same requests cut into small writes, and answered asynchronously.
    write("http", "pipelined-split7-async", bytes([2, 7]) + reqs["pipelined"])
    write("http", "chunked-split1", bytes([1, 1]) + reqs["chunked"])
    write("http", "obs-fold-split3", bytes([0, 3]) + reqs["obs-fold"])
    write("http", "post-chat-stream-reset", bytes([5, 13]) + reqs["post-chat"])


# ---------------------------------------------------------------- json

def json_seeds():
    """Byte 0: the route (0 completions, 1 chat, 2 tokenize, 3 detokenize, 4 admin memory,
    5 admin models, 6 path parameters, 7 every OpenAI parser)."""
    seeds = {
        "completion": (0, '{"model":"smollm2","prompt":"Once upon a time","max_tokens":16,"temperature":0.7,'
                          '"top_p":0.9,"n":2,"stop":["\\n","."],"seed":42,"logprobs":1,"echo":false}'),
        "completion-array": (0, '{"prompt":["a","b\\u00e9"],"stream":true,"stream_options":{"include_usage":true}}'),
        "completion-tokens": (0, '{"prompt":[1,2,3,49151],"max_tokens":1,"top_k":40,"min_p":0.05,'
                                 '"repetition_penalty":1.1}'),
        "completion-nested": (0, '{"prompt":[[1,2],[3]],"max_tokens":null,"presence_penalty":0,"logit_bias":{}}'),
        "chat": (1, '{"model":"smollm2","messages":[{"role":"system","content":"Be brief."},'
                    '{"role":"user","content":"Hello \\ud83d\\ude00"}],"max_tokens":32,"stream":false,'
                    '"response_format":{"type":"text"}}'),
        "chat-parts": (1, '{"messages":[{"role":"developer","content":[{"type":"text","text":"a"},'
                          '{"type":"text","text":"b"}]},{"role":"user","content":"x","name":"bob"}],'
                          '"max_completion_tokens":5,"stop":"END","user":"u1","frequency_penalty":0.0}'),
        "chat-tool": (1, '{"messages":[{"role":"assistant","content":null},{"role":"tool","content":"42",'
                         '"tool_call_id":"c1"}],"tools":[]}'),
        "chat-stream": (1, '{"messages":[{"role":"user","content":"hi"}],"stream":true,'
                           '"stream_options":{"include_usage":false},"temperature":0,"logprobs":true,"top_logprobs":0}'),
        "chat-bad-type": (1, '{"messages":"hi"}'),
        "chat-schema": (1, '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema",'
                           '"json_schema":{"name":"a","schema":{}}}}'),
        "tokenize": (2, '{"prompt":"Hello <|im_start|> world","add_special_tokens":true,"return_token_strs":true}'),
        "tokenize-messages": (2, '{"model":"m","messages":[{"role":"user","content":"hi"}],'
                                 '"add_generation_prompt":false}'),
        "detokenize": (3, '{"tokens":[1,2,3,100,200]}'),
        "detokenize-empty": (3, '{"model":"smollm2","tokens":[]}'),
        "memory": (4, '{"memory_budget_bytes":1073741824}'),
        "memory-zero": (4, '{"memory_budget_bytes":0}'),
        "memory-bad": (4, '{"memory_budget_bytes":-1,"extra":true}'),
        "models-add": (5, '{"path":"/var/lib/ebb/models/smollm2.gguf","name":"smollm2:q4_1"}'),
        "models-add-noname": (5, '{"path":"models/x.gguf"}'),
        "models-add-badname": (5, '{"path":"a","name":".hidden"}'),
        "path-admin": (6, "/admin/models/smol%3Alatest"),
        "path-v1": (6, "/v1/models/SmolLM2-135M%2b"),
        "path-cancel": (6, "/v1/requests/chatcmpl-18446744073709551615"),
        "path-bad-escape": (6, "/admin/models/a%zz%00"),
        "all-parsers": (7, '{"prompt":"x","messages":[{"role":"user","content":"y"}],"tokens":[5]}'),
        "deep": (0, "[" * 200 + "]" * 200),
        "dup-key": (1, '{"messages":[],"messages":[]}'),
        "not-utf8": (0, b'{"prompt":"\xff\xfe"}'),
        "nul-escape": (0, '{"prompt":"a\\u0000b"}'),
        "huge-numbers": (0, '{"prompt":"x","max_tokens":1e309,"n":99999999999999999999,"temperature":1e-400}'),
    }
    for name, (route, body) in seeds.items():
        if isinstance(body, str):
            body = body.encode()
        write("json", name, bytes([route]) + body)


# ---------------------------------------------------------------- tokenizer

def tokenizer_seeds():
    """Byte 0: bit 0 parse specials, bit 1 add BOS, bit 2 token ids instead of text."""
    texts = {
        "ascii": (0, b"Hello, world! The quick brown fox jumps over the lazy dog."),
        "chatml": (1, b"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"),
        "chatml-plain": (0, b"<|im_start|>user<|im_end|>"),
        "bos": (3, b"Once upon a time"),
        "latin1": (0, "naïve café résumé Ünïcödé".encode()),
        "cjk": (0, "日本語のテキスト、中文文本，한국어 텍스트".encode()),
        "emoji-zwj": (0, "👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 \U0001F600".encode()),
        "combining": (0, "e\u0301 a\u0308\u0323 \u0915\u094d\u0937".encode()),
        "rtl": (0, "مرحبا بالعالم שלום עולם \u202e reversed".encode()),
        "numbers": (0, b"12345678901234567890 3.14159 1,000,000 0x1F"),
        "whitespace": (0, b"  \t\t\n\n\r\n    leading and trailing   \n\n\n"),
        "contractions": (0, b"I'm sure you're right, they'll've done it; don't WON'T"),
        "code": (0, b"def f(x):\n    return x**2  # square\n\tif (a && b) { c++; }"),
        "max-codepoint": (0, "\U0010FFFF\U00010000\u0800\u0080\uFFFD".encode()),
        "invalid-continuation": (0, b"abc\x80def"),
        "invalid-overlong": (0, b"\xc0\x80 \xe0\x80\x80"),
        "invalid-surrogate": (0, b"\xed\xa0\x80"),
        "invalid-above-max": (0, b"\xf4\x90\x80\x80"),
        "invalid-truncated": (0, b"end \xe2\x82"),
        "nul": (0, b"a\x00b\x00\x00c"),
        "long-word": (0, b"a" * 3000),
        "long-digits": (0, b"9" * 2000),
        "ids": (4, bytes(range(256))),
        "ids-split-utf8": (4, struct.pack("<8H", 200, 201, 1, 2, 0, 65535, 300, 17)),
    }
    for name, (flags, text) in texts.items():
        write("tokenizer", name, bytes([flags]) + text)


# ---------------------------------------------------------------- gguf

def source_tokenizer():
    r = gguf.GGUFReader(os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    f = r.fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8", "surrogateescape")
              for i in f["tokenizer.ggml.tokens"].data[:N_VOCAB]]
    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data[:N_VOCAB]]
    # Merge k makes token 273 + k in this vocabulary: keep those that make a kept token.
    merges = [bytes(f["tokenizer.ggml.merges"].parts[i]).decode() for i in f["tokenizer.ggml.merges"].data[:N_VOCAB - 273]]
    tpl = bytes(f["tokenizer.chat_template"].parts[f["tokenizer.chat_template"].data[0]]).decode()
    return tokens, types, merges, tpl


def q_blocks(rng, qtype, n):
    """n values as random blocks of qtype with small finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
    scales = (rng.random(n // block, dtype=np.float32) * 0.02 + 0.005).astype(np.float16).view(np.uint8)
    data[:, 0:2] = scales.reshape(-1, 2)
    if qtype in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q5_1):
        data[:, 2:4] = scales.reshape(-1, 2)   # the minimum, as small
    return data


def tiny_model(path, arch="llama", qtype=gguf.GGMLQuantizationType.Q4_0, head_qtype=None, biases=False,
               rope_freqs=False, pre="smollm", extra=None):
    tokens, types, merges, tpl = source_tokenizer()
    rng = np.random.default_rng(1)
    E, F, H = 64, 128, 1
    w = gguf.GGUFWriter(path, arch)
    w.add_name("fuzz seed")
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(1)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(E // H)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(tpl)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)

    def matrix(name, n_out, n_in, t=qtype):
        block, size = gguf.GGML_QUANT_SIZES[t]
        w.add_tensor(name, q_blocks(rng, t, n_out * n_in).reshape(n_out, n_in // block * size), raw_dtype=t)

    def vector(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    matrix("token_embd.weight", N_VOCAB, E)
    vector("blk.0.attn_norm.weight", E)
    matrix("blk.0.attn_q.weight", E, E)
    matrix("blk.0.attn_k.weight", E, E)
    matrix("blk.0.attn_v.weight", E, E)
    matrix("blk.0.attn_output.weight", E, E)
    if biases:
        for b in ("q", "k", "v"):
            w.add_tensor(f"blk.0.attn_{b}.bias", np.zeros(E, dtype=np.float32))
    vector("blk.0.ffn_norm.weight", E)
    matrix("blk.0.ffn_gate.weight", F, E)
    matrix("blk.0.ffn_up.weight", F, E)
    matrix("blk.0.ffn_down.weight", E, F)
    vector("output_norm.weight", E)
    if head_qtype is not None:
        matrix("output.weight", N_VOCAB, E, head_qtype)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(E // 2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


def every_type(path):
    """Not a model: one tensor of each type the reader knows, for the walk and dequantization."""
    rng = np.random.default_rng(2)
    w = gguf.GGUFWriter(path, "none")
    w.add_uint8("t.u8", 1)
    w.add_int8("t.i8", -1)
    w.add_uint16("t.u16", 2)
    w.add_int16("t.i16", -2)
    w.add_uint32("t.u32", 3)
    w.add_int32("t.i32", -3)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float64("t.f64", 2.5)
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "", "é"])
    w.add_array("t.arr_f32", [0.25, -1.0])
    Q = gguf.GGMLQuantizationType
    for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[t]
        n = 256
        data = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
        data[:, 0:2] = np.array([0.01], dtype=np.float16).view(np.uint8)   # values need not be sensible
        w.add_tensor(f"t.{t.name}", data.reshape(1, -1), raw_dtype=t)
    w.add_tensor("t.F16", np.linspace(-1, 1, 64, dtype=np.float16))
    w.add_tensor("t.F32", np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("t.F64", np.linspace(-1, 1, 8, dtype=np.float64))
    w.add_tensor("t.I8", np.arange(-8, 8, dtype=np.int8))
    w.add_tensor("t.I16", np.arange(-8, 8, dtype=np.int16))
    w.add_tensor("t.I32", np.arange(8, dtype=np.int32).reshape(2, 2, 2))
    w.add_tensor("t.BF16", np.full(16, 0x3f80, dtype=np.uint16).view(np.uint8).reshape(1, 32), raw_dtype=Q.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as f:
        return f.read()


def damaged(name, data):
    """Truncated and altered copies of one valid file."""
    out = {}
    n_tensors_at, n_kv_at = 8, 16   # GGUF v3: magic, version, u64 tensor count, u64 kv count
    for cut in (4, 8, 24, 200, len(data) // 2, len(data) - 1):
        out[f"{name}-cut{cut}"] = data[:cut]
    out[f"{name}-bad-magic"] = b"GGUG" + data[4:]
    out[f"{name}-version1"] = data[:4] + struct.pack("<I", 1) + data[8:]
    out[f"{name}-many-tensors"] = data[:n_tensors_at] + struct.pack("<Q", 1 << 62) + data[16:]
    out[f"{name}-many-kv"] = data[:n_kv_at] + struct.pack("<Q", (1 << 64) - 1) + data[24:]
    # the first key's length made huge
    out[f"{name}-key-length"] = data[:24] + struct.pack("<Q", 1 << 63) + data[32:]
    return out


def gguf_seeds(ebb):
    Q = gguf.GGMLQuantizationType
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        p = lambda n: os.path.join(tmp, n)
        files["tiny-q4_0"] = tiny_model(p("a.gguf"))
        files["tiny-q4_1-head"] = tiny_model(p("b.gguf"), qtype=Q.Q4_1, head_qtype=Q.Q4_0)
        files["tiny-qwen2-bias"] = tiny_model(p("c.gguf"), arch="qwen2", qtype=Q.Q5_0, biases=True, rope_freqs=True)
        files["tiny-q5_1-pre-gpt2"] = tiny_model(p("d.gguf"), qtype=Q.Q5_1, pre="gpt2")
        files["every-type"] = every_type(p("e.gguf"))
        if ebb:
            calib = p("calib.txt")
            with open(calib, "w") as f:
                f.write("The cat sat on the mat. In the beginning there was text, and it was tokenized. " * 20)
            src = p("a.gguf")
            for fmt, extra_args in (("w4a4", []), ("source", ["--act-bits", "4"]), ("w4a16", []),
                                    ("bitstack", ["--base-bits", "0", "--levels", "2", "--checkpoints", "0"]),
                                    ("bitstack-base", ["--levels", "2", "--checkpoints", "0"])):
                out = p(f"packed-{fmt}.gguf")
                subprocess.run([ebb, "pack", "-m", src, "--format", fmt.split("-")[0], "-o", out, "--calib", calib,
                                "--calib-seqs", "2", "--calib-len", "16", "--no-register", "--no-eval", "-q",
                                "-t", "1"] + extra_args, check=True)
                with open(out, "rb") as f:
                    files[f"tiny-packed-{fmt}"] = f.read()
    files.update(damaged("every-type", files["every-type"]))
    for name in ("tiny-q4_0", "tiny-packed-w4a4", "tiny-packed-source", "tiny-packed-bitstack",
                 "tiny-packed-bitstack-base"):   # big: cut only
        if name in files:
            files[f"{name}-cut-half"] = files[name][:len(files[name]) // 2]
            files[f"{name}-cut-last"] = files[name][:-1]
    for name, data in files.items():
        write("gguf", name, data)
    # The catalog imports the same files: the valid ones and a few damaged.
    for name in ("tiny-q4_0", "tiny-qwen2-bias", "every-type", "tiny-packed-source", "tiny-q4_0-cut-half",
                 "every-type-bad-magic", "every-type-many-tensors", "every-type-key-length"):
        if name in files:
            write("catalog", name, files[name])
    write("catalog", "empty", b"")
    write("catalog", "no-arch", files["every-type"].replace(b"general.architecture", b"general.architectuRe"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ebb", help="an ebb binary, to pack the tiny model into packed seeds")
    a = ap.parse_args()
    clear_seeds()
    http_seeds()
    json_seeds()
    tokenizer_seeds()
    gguf_seeds(a.ebb)
    for target in ("http", "json", "tokenizer", "gguf", "catalog"):
        names = [n for n in os.listdir(os.path.join(HERE, target)) if n.startswith("seed-")]
        print(f"make_seeds: {target}: {len(names)} seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
