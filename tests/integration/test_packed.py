"""Packed variants as users make and run them: `ebb pack`, then `ebb generate`, `ebb ppl`
and `ebb serve` on the file, and the catalog entry the packer writes.

The pack here is small on purpose (round-to-nearest weights, two calibration windows of 128
tokens: seconds, not minutes); the quality of a real pack is measured by tools/quality.sh and
bounded by tests/unit/test_pack.c. What is checked here is the user's path: the file's
metadata as the independent `gguf` package reads it, the variant in the catalog (read with
sqlite3), answers from every command, the daemon serving the variant with a KV4 cache, and
clear refusals for bad input.
"""
import concurrent.futures
import os
import pathlib
import shutil
import sqlite3
import struct
import subprocess
import sys

import pytest
import requests

from conftest import run_ebb
import gguf_header  # noqa: E402  (tools/, on the path through conftest)
from test_api import AUTH, IO_TIMEOUT, Server

ROOT = pathlib.Path(__file__).resolve().parents[2]
CALIB_TEXT = "/usr/share/common-licenses/Apache-2.0"   # base-files: on every Debian system
EVAL_TEXT = "/usr/share/common-licenses/GPL-3"


def ok(proc):
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def refused(proc, *needles):
    err = proc.stderr.decode()
    assert proc.returncode != 0, f"accepted: {proc.stdout.decode()}"
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert "Sanitizer" not in err and "runtime error" not in err, err
    return err


@pytest.fixture(scope="module")
def packed(ebb_bin, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    catalog = d / "catalog.db"
    ok(run_ebb(ebb_bin, "models", "--catalog", str(catalog), "add", model_path, "--name", "smol"))
    out = d / "smol-w4a4.gguf"
    p = run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "w4a4", "--weight-quant", "rtn",
                "--calib", CALIB_TEXT, "--calib-seqs", "2", "--calib-len", "128", "--seed", "7",
                "--eval", EVAL_TEXT, "--eval-chunks", "2", "--catalog", str(catalog), "-o", str(out))
    return {"dir": d, "catalog": catalog, "path": out, "stdout": ok(p), "stderr": p.stderr.decode()}


def read_gguf_header(path):
    """Metadata and tensor table of a packed file ({key: value}, {tensor name: (type, dims)}),
    by tools/gguf_header.py (the `gguf` package refuses ebb's own tensor types)."""
    kv, tensors, _ = gguf_header.read(path)
    return kv, {name: (t, dims) for name, (t, dims, _) in tensors.items()}


def test_pack_reports_progress_and_writes_a_gguf(packed, model_path):
    from gguf import GGUFReader

    assert "calibrating" in packed["stderr"] and "quantizing" in packed["stderr"]
    assert "all layers:" in packed["stdout"] and "8-bit" in packed["stdout"]
    kv, tensors = read_gguf_header(packed["path"])
    assert kv["ebb.format"] == "w4a4" and kv["ebb.weight_quant"] == "rtn"
    assert kv["ebb.rotation"] == "hadamard64-inputs"
    assert kv["ebb.act_bits"] == 4 and kv["ebb.group_size"] == 64
    assert "Apache-2.0" in kv["ebb.calibration"] and "seed 7" in kv["ebb.calibration"]
    act8 = kv["ebb.act8_groups"]
    src = GGUFReader(model_path)
    n_layer = next(int(f.parts[f.data[0]][0]) for k, f in src.fields.items() if k.endswith(".block_count"))
    assert len(act8) == 4 * n_layer
    # Matrices in ebb's W4G64 (type 64, docs/formats.md), embedding Q8_0 (8), norms F32 (0),
    # a permutation (I32, 26) per activation point; the head stays tied (no output.weight).
    assert tensors["blk.0.attn_q.weight"][0] == 64 and tensors["blk.29.ffn_down.weight"][0] == 64
    assert tensors["token_embd.weight"][0] == 8 and tensors["blk.0.attn_norm.weight"][0] == 0
    assert tensors["blk.3.ffn_down_in.perm"] == (26, [1536])
    assert "output.weight" not in tensors
    # At most 20% of each layer's groups (attn_in 9, attn_out 9, ffn_in 9, ffn_down_in 24).
    for layer in range(n_layer):
        assert sum(act8[4 * layer:4 * layer + 4]) <= 0.2 * 51
    # The source's own keys are kept, so the file loads like any model.
    assert kv["tokenizer.ggml.model"] == "gpt2"
    # Smaller than the Q4_1 source: 4-bit matrices, Q8_0 embedding, no separate head.
    assert os.path.getsize(packed["path"]) < os.path.getsize(model_path)


def test_pack_registers_the_variant_with_its_perplexity(ebb_bin, packed):
    db = sqlite3.connect(packed["catalog"])
    rows = db.execute("SELECT m.name, v.kind, v.path, v.bytes, v.bits_per_weight, v.perplexity, v.ppl_text "
                      "FROM variants v JOIN models m ON m.id = v.model_id").fetchall()
    db.close()
    assert len(rows) == 1
    name, kind, path, nbytes, bpw, ppl, ppl_text = rows[0]
    assert (name, kind, path) == ("smol", "w4a4-rtn", str(packed["path"]))
    assert nbytes == os.path.getsize(packed["path"]) and 4.0 < bpw < 8.0
    # Measured on the packed file with a KV4 cache, as `ebb ppl` measures it.
    assert "GPL-3" in ppl_text and "2 windows of 512" in ppl_text and "kv_bits 4" in ppl_text
    out = ok(run_ebb(ebb_bin, "ppl", "-m", str(packed["path"]), "-f", EVAL_TEXT, "--ctx", "512", "--chunks", "2",
                     "--kv-bits", "4"))
    assert abs(ppl - float(out.split()[2])) < 1e-3, (ppl, out)
    assert "perplexity" in packed["stdout"]


def test_generate_and_ppl_run_the_packed_file(ebb_bin, packed, model_path):
    for kv in ("32", "4"):
        p = run_ebb(ebb_bin, "generate", "-m", str(packed["path"]), "--chat", "Name three primary colors.",
                    "-n", "16", "--temp", "0", "--kv-bits", kv)
        assert len(ok(p).strip()) > 0
    ppl = {}
    for label, path in (("f32", model_path), ("packed", str(packed["path"]))):
        out = run_ebb(ebb_bin, "ppl", "-m", path, "-f", EVAL_TEXT, "--ctx", "256", "--chunks", "2",
                      "--kv-bits", "4" if label == "packed" else "32")
        line = ok(out).strip().splitlines()[-1]
        ppl[label] = float(line.split()[2])
    # Round-to-nearest on two windows of calibration is the crudest pack; it is
    # still a language model, not noise (a vocabulary of 49152 would give ~49152).
    assert ppl["f32"] < ppl["packed"] < 4 * ppl["f32"], ppl


def test_a_4bit_head_is_its_own_w4g64_tensor_and_still_a_language_model(ebb_bin, model_path, tmp_path):
    # GPTQ here, so the head is quantized with the Hessian of its (rotated) input that
    # calibration captures after the last layer; two short windows keep it to seconds.
    out = tmp_path / "smol-w4a4-head4.gguf"
    p = run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "w4a4", "--head-bits", "4",
                "--calib", CALIB_TEXT, "--calib-seqs", "2", "--calib-len", "128", "--seed", "7",
                "--no-eval", "--no-register", "-t", "2", "-q", "-o", str(out))
    assert "format w4a4-head4" in ok(p)
    kv, tensors = read_gguf_header(out)
    # The embedding keeps its Q8_0 rows (8) for lookups; the head is a separate W4G64 (64).
    assert tensors["token_embd.weight"][0] == 8
    assert tensors["output.weight"] == (64, tensors["token_embd.weight"][1])
    ppl = {}
    for label, path in (("f32", model_path), ("head4", str(out))):
        line = ok(run_ebb(ebb_bin, "ppl", "-m", path, "-f", EVAL_TEXT, "--ctx", "256", "--chunks", "2",
                          "--kv-bits", "4" if label == "head4" else "32")).strip().splitlines()[-1]
        ppl[label] = float(line.split()[2])
    assert ppl["f32"] < ppl["head4"] < 2 * ppl["f32"], ppl
    answer = ok(run_ebb(ebb_bin, "generate", "-m", str(out), "--chat", "What is the capital of France?",
                        "-n", "12", "--temp", "0", "--kv-bits", "4"))
    assert "Paris" in answer, answer
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--head-bits", "6", "-o", str(tmp_path / "x.gguf")),
            "--head-bits must be 4 or 8")
    # A head whose tensor record claims another type (here Q8_0, 8) is refused with the
    # file's name, not misread: its tensor info is name, n_dims, two dims, then the type.
    data = bytearray(out.read_bytes())
    at = data.index(struct.pack("<Q", len(b"output.weight")) + b"output.weight") + 8 + len(b"output.weight")
    type_at = at + 4 + 2 * 8
    assert struct.unpack_from("<I", data, type_at)[0] == 64
    struct.pack_into("<I", data, type_at, 8)
    bad = tmp_path / "bad-head.gguf"
    bad.write_bytes(bytes(data))
    refused(run_ebb(ebb_bin, "generate", "-m", str(bad), "-p", "hi", "-n", "1"), str(bad))


def test_serve_runs_the_variant_with_a_kv4_cache(ebb_bin, packed):
    catalog = packed["dir"] / "serve.db"
    shutil.copy(packed["catalog"], catalog)
    ok(run_ebb(ebb_bin, "models", "--catalog", str(catalog), "add", str(packed["path"]), "--name", "smol-w4a4"))
    srv = Server(ebb_bin, catalog, "--default-model", "smol-w4a4", "--model-kv-bits", "smol-w4a4=4")
    try:
        srv.wait_ready()
        srv.wait_model("smol-w4a4")   # the catalog's source may be the first one ready
        r = requests.post(srv.url("/v1/chat/completions"), timeout=120, json={
            "model": "smol-w4a4", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] > 0 and body["choices"][0]["message"]["content"]
        # Batching does not change a greedy answer on the integer path either
        # (activation scales are per token; sink positions are chosen by
        # position): six prompts at once, each equal to its run alone.
        prompts = ["Name three primary colors.", "Why is the sky blue?", "Write a haiku about the sea.",
                   "What is 12 times 7?", "How do bees make honey?", "What is an API?"]

        def ask(prompt):
            r = requests.post(srv.url("/v1/chat/completions"), timeout=300, json={
                "model": "smol-w4a4", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        alone = [ask(q) for q in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(ask, prompts))
        assert together == alone
        mem = requests.get(srv.url("/admin/memory"), headers=AUTH, timeout=IO_TIMEOUT).json()
        entry = next(m for m in mem["models"] if m["model"] == "smol-w4a4")
        # Served from the mapping: the 4-bit weights, far below the f32 copy (~540 MB).
        assert entry["kv_bits"] == 4 and entry["weight_bytes"] < 100e6, entry
    finally:
        srv.stop_clean()


def test_bad_packs_are_refused_with_a_reason(ebb_bin, packed, model_path, tmp_path):
    out = str(tmp_path / "x.gguf")
    refused(run_ebb(ebb_bin, "pack", "-m", str(packed["path"]), "--calib", CALIB_TEXT, "--no-register",
                    "-o", out), "already a packed")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--act-bits", "5", "-o", out), "act-bits")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "w2", "-o", out), "w2")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--calib", str(tmp_path / "missing.txt"),
                    "--no-register", "-o", out), "missing.txt")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--calib", CALIB_TEXT, "--no-register",
                    "-o", "/nonexistent-dir/x.gguf"), "cannot write")
    # The evaluation's settings are checked before packing starts.
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--calib", CALIB_TEXT, "--no-register",
                    "--eval", str(tmp_path / "no-eval.txt"), "-o", out), "no-eval.txt")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--calib", CALIB_TEXT, "--no-register",
                    "--eval", EVAL_TEXT, "--eval-kv-bits", "5", "-o", out), "--eval-kv-bits")
    assert not os.path.exists(out)


def test_a_truncated_packed_file_is_refused_not_crashed(ebb_bin, packed, tmp_path):
    data = packed["path"].read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        refused(run_ebb(ebb_bin, "generate", "-m", str(bad), "-p", "hi", "-n", "1"), str(bad))


def test_packing_is_deterministic_for_a_seed(ebb_bin, model_path, tmp_path):
    """The same seed gives the same file byte for byte (GPTQ, calibration Hessians and all,
    on two threads); another seed draws other calibration windows and so other weights.
    On the model's first 4 layers (tools/gguf_first_layers.py): every layer is packed by
    the same code, and three whole-model packs took a minute."""
    shallow = tmp_path / "first4.gguf"
    subprocess.run([sys.executable, str(ROOT / "tools" / "gguf_first_layers.py"), model_path, "--layers", "4",
                    "-o", str(shallow)], check=True, capture_output=True, timeout=120)

    def pack(seed, name):
        out = tmp_path / name
        ok(run_ebb(ebb_bin, "pack", "-m", str(shallow), "--format", "w4a4", "--calib", CALIB_TEXT,
                   "--calib-seqs", "2", "--calib-len", "64", "--seed", str(seed), "-t", "2", "-q",
                   "--no-register", "--no-eval", "-o", str(out)))
        return out.read_bytes()

    first = pack(3, "a.gguf")
    assert pack(3, "b.gguf") == first
    assert pack(4, "c.gguf") != first


def test_a_file_from_the_first_packer_is_refused(ebb_bin, packed, tmp_path):
    """The first packer folded the norms into a rotated residual stream (ebb.rotation
    "hadamard64"); the engine cannot run such a file and must say so, not misread it."""
    data = packed["path"].read_bytes()
    assert data.count(b"hadamard64-inputs") == 1
    old = tmp_path / "old.gguf"
    # Same length, so every offset in the file stays valid: only the value is foreign.
    old.write_bytes(data.replace(b"hadamard64-inputs", b"hadamard64-folded"))
    refused(run_ebb(ebb_bin, "generate", "-m", str(old), "-p", "hi", "-n", "1"), "pack it again")


# ------------------------------------------------------------ source-exact variants

SOURCE_MATRICES = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_output": "attn_out",
                   "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_down": "ffn_down_in"}


@pytest.fixture(scope="module")
def source_exact(ebb_bin, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("source")
    files = {}
    for key, bits, extra in ((8, 8, []), (4, 4, []), ("4s", 4, ["--act8-choice", "static"])):
        out = d / f"smol-source-{key}.gguf"
        p = run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "source", "--act-bits", str(bits), *extra,
                    "--calib", CALIB_TEXT, "--calib-seqs", "2", "--calib-len", "128", "--no-register", "--no-eval",
                    "-q", "-o", str(out))
        assert f"format source-w4a{bits}" in ok(p)
        files[key] = out
    return files


def field(reader, key):
    f = reader.fields[key]
    vals = [f.parts[i] for i in f.data]
    if len(vals) == 1 and f.types[0] != 9:   # 9: GGUF array
        v = vals[0]
        return bytes(v).decode() if v.dtype.kind == "u" and f.types[0] == 8 else v.tolist()[0]
    return [v.tolist()[0] for v in vals]


def test_source_exact_files_hold_the_sources_blocks_permuted(source_exact, model_path):
    """Read with the independent `gguf` package: every tensor of the source is there in its
    own type; a layer matrix's rows hold exactly the source row's blocks (scales, minimums
    and codes), in the order of its activation point's permutation, which moves whole
    blocks of 32; everything else is byte for byte the source's."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    src = {t.name: t for t in gguf.GGUFReader(model_path).tensors}
    n_layer = 1 + max(int(n.split(".")[1]) for n in src if n.startswith("blk."))
    for key, path in source_exact.items():
        bits = 4 if key == "4s" else key
        r = gguf.GGUFReader(str(path))
        assert field(r, "ebb.format") == "source" and field(r, "ebb.rotation") == "none"
        assert field(r, "ebb.group_size") == 32 and field(r, "ebb.act_bits") == bits
        if bits == 4:
            assert field(r, "ebb.act8_choice") == ("static" if key == "4s" else "token")
        got = {t.name: t for t in r.tensors}
        assert set(got) == set(src) | {f"blk.{l}.{p}.perm" for l in range(n_layer)
                                       for p in ("attn_in", "attn_out", "ffn_in", "ffn_down_in")}
        moved = 0
        for name, t in src.items():
            g = got[name]
            assert g.tensor_type == t.tensor_type and list(g.shape) == list(t.shape), name
            parts = name.split(".")
            if len(parts) != 4 or parts[2] not in SOURCE_MATRICES:
                assert np.array_equal(np.asarray(g.data), np.asarray(t.data)), name
                continue
            perm = np.asarray(got[f"blk.{parts[1]}.{SOURCE_MATRICES[parts[2]]}.perm"].data)
            blocks = perm[::32] // 32
            assert np.array_equal(perm.reshape(-1, 32), blocks[:, None] * 32 + np.arange(32)), "whole blocks move"
            a, b = np.asarray(t.data), np.asarray(g.data)
            rows = a.reshape(a.shape[0], len(blocks), -1)
            assert np.array_equal(b.reshape(rows.shape), rows[:, blocks, :]), name
            moved += not np.array_equal(blocks, np.arange(len(blocks)))
        act8 = field(r, "ebb.act8_groups")
        total = n_layer * (576 + 576 + 576 + 1536) // 32
        if key == "4s":
            assert moved > 0   # the blocks calibration ranks noisiest lead
        else:
            assert moved == 0   # W4A8 needs no order, nor do 8-bit blocks chosen per token
        if bits == 8:
            assert act8 == [g // 32 for _ in range(n_layer) for g in (576, 576, 576, 1536)]
        else:
            assert 0.15 * total < sum(act8) <= 0.2 * total, sum(act8)


def test_source_exact_w4a8_is_the_source_served_natively(ebb_bin, source_exact, model_path, tmp_path):
    """The source served natively reads its activations as 8-bit blocks of 32 already: the
    W4A8 source-exact file must give its logits bit for bit. The W4A4 file's 4-bit blocks
    cost some perplexity, not the model."""
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i) for i in [1, 504, 3458, 314, 4456, 28, 282, 1860, 30, 216, 198, 2070, 253]))
    out = {}
    for label, path in (("native", model_path), ("w4a8", source_exact[8])):
        dst = tmp_path / f"{label}.bin"
        ok(run_ebb(ebb_bin, "logits", "-m", str(path), "--ids-file", str(ids), "-o", str(dst), "--all"))
        out[label] = dst.read_bytes()
    assert len(out["native"]) == 13 * 49152 * 4 and out["native"] == out["w4a8"]
    ppl = {}
    for label, path in (("native", model_path), ("token", source_exact[4]), ("static", source_exact["4s"])):
        line = ok(run_ebb(ebb_bin, "ppl", "-m", str(path), "-f", EVAL_TEXT, "--ctx", "256", "--chunks", "2"))
        ppl[label] = float(line.strip().splitlines()[-1].split()[2])
    assert ppl["native"] < ppl["token"] < 1.4 * ppl["native"], ppl
    assert ppl["native"] < ppl["static"] < 1.4 * ppl["native"], ppl


def test_source_exact_refuses_what_it_cannot_keep(ebb_bin, packed, model_path, tmp_path):
    out = str(tmp_path / "x.gguf")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "source", "--head-bits", "4", "-o", out),
            "do not apply to --format source")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "w4a4", "--act8-choice", "token", "-o", out),
            "--act8-choice applies to --format source --act-bits 4 only")
    refused(run_ebb(ebb_bin, "pack", "-m", model_path, "--format", "source", "--act8-choice", "loud", "-o", out),
            "token or static")
    refused(run_ebb(ebb_bin, "pack", "-m", str(packed["path"]), "--format", "source", "--calib", CALIB_TEXT,
                    "--no-register", "-o", out), "already a packed")
    assert not os.path.exists(out)


def test_a_source_exact_file_with_bad_metadata_is_refused(ebb_bin, source_exact, tmp_path):
    """The loader checks what it reads: an unknown ebb.act8_choice or a rotation a
    source-exact file cannot have is refused naming the key, not guessed."""
    data = source_exact[4].read_bytes()
    for key, good, bad, needle in ((b"ebb.act8_choice", b"token", b"tokes", "ebb.act8_choice must be"),
                                   (b"ebb.rotation", b"none", b"nope", "ebb.rotation must be \"none\"")):
        at = data.index(key) + len(key)
        value = data.index(good, at)
        assert value - at == 12   # u32 type + u64 length, then the string
        damaged = tmp_path / "damaged.gguf"
        damaged.write_bytes(data[:value] + bad + data[value + len(good):])
        refused(run_ebb(ebb_bin, "generate", "-m", str(damaged), "-p", "hi", "-n", "1"), str(damaged), needle)
