"""The command line as a user meets it: help, bad arguments and bad files.

Every bad input must give a non-zero exit and a message on stderr that says
what is wrong -- never a crash (a signal) and never silence. These run
against the Release binary and, when EBB_BIN_ASAN is set, the sanitized one.
"""
import os
import random
import subprocess

import numpy as np

import pytest

from conftest import run_ebb


@pytest.fixture(params=["release", "asan"])
def any_bin(request, ebb_bin):
    if request.param == "asan":
        path = os.environ.get("EBB_BIN_ASAN")
        if not path:
            pytest.skip("EBB_BIN_ASAN not set (make test sets it)")
        return path
    return ebb_bin


def assert_clean_error(proc, *needles):
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode > 0, f"expected a failing exit status, got {proc.returncode}: {err}"
    assert err.strip(), "expected an error message on stderr"
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert "AddressSanitizer" not in err and "runtime error" not in err, err


@pytest.mark.parametrize("cmd", ["generate", "tokenize", "ppl", "bench", "inspect", "logits", "devices"])
def test_help(ebb_bin, cmd):
    proc = run_ebb(ebb_bin, cmd, "--help")
    assert proc.returncode == 0
    assert b"usage: ebb " + cmd.encode() in proc.stdout


def test_devices(any_bin):
    """`ebb devices` names the CPU path and every CUDA device, or why there is
    none (a build without CUDA, no driver): an answer, exit 0, in text and
    JSON that agree; a bad option is refused."""
    import json
    text = run_ebb(any_bin, "devices")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.decode().splitlines()
    proc = run_ebb(any_bin, "devices", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["cpu"]["path"] in ("scalar", "avx2", "avx512", "amx") and got["cpu"]["cores"] >= 1
    assert lines[0] == f"cpu: {got['cpu']['path']} path, {got['cpu']['cores']} cores"
    cuda = got["cuda"]
    if cuda["devices"]:
        assert "unavailable" not in cuda
        for i, d in enumerate(cuda["devices"]):
            assert d["index"] == i and d["total_bytes"] > 0 and d["name"]
            assert lines[1 + i].startswith(f"cuda:{i}: {d['name']}, compute {d['compute_capability']}")
    else:
        why = cuda["unavailable"]
        assert "built without CUDA" in why or "no CUDA device" in why, why
        assert lines[1] == "cuda: none: " + why
    assert_clean_error(run_ebb(any_bin, "devices", "--gpu"), "unknown option")


def test_unknown_command(ebb_bin):
    assert_clean_error(run_ebb(ebb_bin, "frobnicate"), "unknown command")


@pytest.mark.parametrize("args,needle", [
    (["generate", "-m"], "needs a value"),
    (["generate", "-p", "hi"], "-m MODEL is required"),
    (["generate", "-m", "x.gguf", "-p", "a", "--chat", "b"], "exactly one"),
    (["generate", "-m", "x.gguf", "-p", "a", "-n", "-5"], "-n expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "-n", "12abc"], "-n expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--temp", "nan"], "--temp expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--top-p", "1.5"], "--top-p expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--bogus"], "unknown option"),
    (["ppl", "-m", "x.gguf"], "-f FILE is required"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--ctx", "4"], "--ctx expects"),
    (["bench", "-m", "x.gguf", "-r", "0"], "-r expects"),
    (["bench", "-m", "x.gguf", "--verify", "0"], "--verify expects"),
    (["bench", "-m", "x.gguf", "--verify", "65"], "--verify expects"),
    (["bench", "-m", "x.gguf", "--depth", "-1"], "--depth expects"),
    (["bench", "-m", "x.gguf", "-b", "0"], "-b expects"),
    (["bench", "-m", "x.gguf", "-b", "257"], "-b expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--device", "tpu"], "a device is cpu, cuda or cuda:N"),
    (["logits", "-m", "x.gguf", "--ids-file", "i", "-o", "o", "--stack-bytes", "-3"], "--stack-bytes"),
    (["generate", "-m", "x.gguf", "-p", "a", "--weights", "q4"], "--weights must be native or f32, not 'q4'"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--weights", ""], "--weights must be native or f32"),
    (["bench", "-m", "x.gguf", "--weights", "F32"], "--weights must be native or f32"),
    (["logits", "-m", "x.gguf", "--ids-file", "i", "-o", "o", "--weights", "int8"], "--weights must be native"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress", "squash"], "--compress must be off, demote or drop"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-budget", "1.5"], "--compress-budget expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-low", "-0.1"], "--compress-low expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-tokens", "0"], "--compress-tokens expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-select", "best"], "--compress-select must be snapkv"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-keys", "3"], "--compress-keys must be 2 or 4"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-min", "-1"], "--compress-min expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-lookahead", "65"], "--compress-lookahead expects"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--compress-lookahead", "-1"], "--compress-lookahead expects"),
    (["generate", "-m", "x.gguf", "-p", "a", "--compress-bogus", "1"], "unknown option"),
    (["generate", "-m", "x.gguf", "-p", "a", "--then"], "needs a value"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--score", "0"], "--score expects"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--ctx", "64", "--score", "63"], "--score 63 leaves no context"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--compress", "half"], "--compress must be off, demote or drop"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--compress-keys", "8"], "--compress-keys"),
    (["ppl", "-m", "x.gguf", "-f", "t", "--compress-every", "100"], "--compress-every expects"),
])
def test_bad_arguments(ebb_bin, args, needle):
    assert_clean_error(run_ebb(ebb_bin, *args), needle)


def test_missing_model(any_bin):
    assert_clean_error(run_ebb(any_bin, "generate", "-m", "/nonexistent.gguf", "-p", "hi"),
                       "/nonexistent.gguf", "cannot open")


def test_not_a_gguf(any_bin, tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_bytes(b"this is not a model\n" * 10)
    assert_clean_error(run_ebb(any_bin, "generate", "-m", str(p), "-p", "hi"), str(p), "magic")


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.999])
def test_truncated_model(any_bin, model_path, tmp_path, fraction):
    data = open(model_path, "rb").read()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    assert_clean_error(run_ebb(any_bin, "generate", "-m", str(p), "-p", "hi", "-n", "1"),
                       str(p), "truncated")


@pytest.mark.parametrize("type_name", ["IQ4_NL", "TQ2_0", "IQ2_XXS"])
def test_tensor_type_ebb_cannot_compute(any_bin, tmp_path, type_name):
    """A GGUF whose tensor is in a type ebb has no product for is refused at load,
    naming the file, the tensor and the type -- never dequantized by a guess."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    p = tmp_path / f"{type_name}.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 256 // block * nbytes), dtype=np.uint8),
                 raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(run_ebb(any_bin, "generate", "-m", str(p), "-p", "hi"),
                       str(p), "blk.0.attn_q.weight", f"type {type_name} ({int(qtype)})",
                       "cannot compute")


def test_corrupted_metadata(any_bin, model_path, tmp_path):
    """Random bytes flipped in the header region: refused cleanly or, if the
    damage happens to keep the file valid, it still runs without crashing."""
    data = bytearray(open(model_path, "rb").read(2_000_000))
    full = open(model_path, "rb").read()
    rng = random.Random(7)
    for trial in range(6):
        damaged = bytearray(full)
        for _ in range(4):
            i = rng.randrange(24, len(data))
            damaged[i] ^= 0xFF
        p = tmp_path / f"damaged{trial}.gguf"
        p.write_bytes(bytes(damaged))
        proc = run_ebb(any_bin, "generate", "-m", str(p), "-p", "hi", "-n", "1", "--temp", "0")
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {err}"
        assert "AddressSanitizer" not in err and "runtime error" not in err, err
        if proc.returncode:
            assert str(p) in err, err


def test_invalid_utf8_prompt(ebb_bin, model_path, tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello \xff\xfe world")
    # argv can carry any bytes; the prompt must be refused as invalid UTF-8
    proc = run_ebb(ebb_bin, "generate", "-m", model_path, "-p", b"hi \xc3\x28 there")
    assert_clean_error(proc, "UTF-8")
    assert_clean_error(run_ebb(ebb_bin, "ppl", "-m", model_path, "-f", str(p)), "UTF-8")


def test_out_of_range_ids(ebb_bin, model_path, tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("1 2 99999999")
    assert_clean_error(run_ebb(ebb_bin, "logits", "-m", model_path, "--ids-file", str(p), "-o",
                               str(tmp_path / "out.f32")), "out of range")


def test_generate_chat_greedy_is_deterministic(ebb_bin, model_path):
    # "What is the capital of France?" alone is a near-tie at its first token (the numpy
    # reference: 25.33 for "The" against 25.24 for "L"), which the CPU paths' own float
    # order in RMSNorm and softmax may decide either way (AVX2 and scalar pick "L"); with
    # "Answer in one word." the reference's margin is 1.47 and both say the capital is Paris.
    args = ["generate", "-m", model_path, "--chat", "What is the capital of France? Answer in one word.", "-n",
            "24", "--temp", "0"]
    a, b = run_ebb(ebb_bin, *args), run_ebb(ebb_bin, *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    assert b"Paris" in a.stdout


def test_generate_seeded_sampling(ebb_bin, model_path):
    base = ["generate", "-m", model_path, "--chat", "Tell me a story.", "-n", "32", "--temp", "1.0"]
    a = run_ebb(ebb_bin, *base, "--seed", "11")
    b = run_ebb(ebb_bin, *base, "--seed", "11")
    c = run_ebb(ebb_bin, *base, "--seed", "12")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_stop_string(ebb_bin, model_path):
    base = ["generate", "-m", model_path, "--chat", "Count from 1 to 10, separated by commas.", "-n", "48", "--temp", "0"]
    full = run_ebb(ebb_bin, *base)
    assert full.returncode == 0
    text = full.stdout.decode()
    assert "5" in text
    cut = run_ebb(ebb_bin, *base, "--stop", "5")
    assert cut.returncode == 0
    assert cut.stdout.decode().rstrip("\n") == text[: text.index("5")]
    assert b"finish: stop" in cut.stderr


def test_max_tokens_length(ebb_bin, model_path):
    proc = run_ebb(ebb_bin, "generate", "-m", model_path, "-p", "Once upon a time", "-n", "5",
                   "--temp", "0", "--print-ids")
    assert proc.returncode == 0
    assert len(proc.stdout.split()) == 5
    assert b"finish: length" in proc.stderr


@pytest.mark.parametrize("unit", ["test_scheduler", "test_kv", "test_tokenizer"])
def test_unit_tests_without_the_model_say_skipped(ebb_bin, unit, tmp_path):
    """One skip policy (tests/unit/check.h): without the default model a unit test runs what
    it can and exits 77, ctest's SKIP_RETURN_CODE, naming what it skipped -- never a pass."""
    binary = os.path.join(os.path.dirname(ebb_bin), unit)
    if not os.path.exists(binary):
        pytest.skip(f"{binary} not built")
    p = subprocess.run([binary], capture_output=True, timeout=300,
                       env=dict(os.environ, EBB_SOURCE_DIR=str(tmp_path)))
    assert p.returncode == 77, (p.returncode, p.stdout[-500:], p.stderr[-500:])
    assert b"were skipped" in p.stdout and str(tmp_path).encode() in p.stdout


def test_then_not_utf8(any_bin, model_path):
    """--then's text is tokenized after the model loads; bytes that are not UTF-8 are refused."""
    proc = subprocess.run([any_bin, "generate", "-m", model_path, "-p", "hello", "--then", b"caf\xc3(".decode(
        "utf-8", "surrogateescape"), "-n", "1"], capture_output=True, timeout=120)
    assert_clean_error(proc, "--then is not valid UTF-8")


def test_ppl_scores_the_last_n_predictions(ebb_bin, model_path, tmp_path):
    """--score N: the perplexity of each window's last N predictions, recomputed here from the
    logits of whole windows (ebb logits --all, log-softmax in float64); the default scores the
    second half, the same as --score n_ctx - 1 - n_ctx/2."""
    import math
    import re
    text = tmp_path / "text.txt"
    text.write_text("The river rose in the spring and the town moved its market to the hill. " * 12 +
                    "Traders came from the coast with salt, and from the north with furs and amber. " * 10)
    ids = [int(x) for x in run_ebb(ebb_bin, "tokenize", "-m", model_path, "--file", str(text)).stdout.split()]
    n_ctx, score, windows = 64, 20, 2

    def ppl(*extra):
        p = run_ebb(ebb_bin, "ppl", "-m", model_path, "-f", str(text), "--ctx", str(n_ctx), "--chunks",
                    str(windows), *extra)
        assert p.returncode == 0, p.stderr.decode()
        assert f"{len(ids)} tokens" in p.stderr.decode(), (len(ids), p.stderr)   # no BOS added: ids are the windows
        m = re.search(r"PPL = ([0-9.]+) \+/- [0-9.]+  \((\d+) tokens scored", p.stdout.decode())
        return float(m.group(1)), int(m.group(2))

    nll = []
    for w in range(windows):
        win = ids[w * n_ctx:(w + 1) * n_ctx]
        (tmp_path / "ids.txt").write_text(" ".join(map(str, win)))
        out = tmp_path / "logits.bin"
        p = run_ebb(ebb_bin, "logits", "-m", model_path, "--ids-file", str(tmp_path / "ids.txt"), "--all", "-o",
                    str(out))
        assert p.returncode == 0, p.stderr.decode()
        logits = np.fromfile(out, dtype=np.float32).reshape(n_ctx, -1).astype(np.float64)
        for j in range(n_ctx - 1 - score, n_ctx - 1):
            row = logits[j]
            top = row.max()
            nll.append(top + math.log(np.exp(row - top).sum()) - row[win[j + 1]])
    want = math.exp(sum(nll) / len(nll))
    got, scored = ppl("--score", str(score))
    assert scored == windows * score
    assert abs(got - want) <= 1e-4 * want + 1e-4, (got, want)
    assert ppl() == ppl("--score", str(n_ctx - 1 - n_ctx // 2))


def test_ppl_compresses_as_a_conversation_would(ebb_bin, model_path):
    """--compress-every N compresses each window's context every N tokens as it is read (a
    conversation compressed at each turn's end), then at its end: the same bytes at the end
    as compressing once (the budget is a share of the whole context), another perplexity (the
    rows were chosen by other windows), and N past the context is compressing once."""
    import pathlib
    import re
    heldout = pathlib.Path.home() / ".cache" / "ebb" / "heldout.txt"

    def ppl(*extra):
        p = run_ebb(ebb_bin, "ppl", "-m", model_path, "-f", str(heldout), "--ctx", "1024", "--chunks", "1",
                    "--kv-bits", "4", "--compress", "drop", "--compress-budget", "0.25", *extra, timeout=600)
        assert p.returncode == 0, p.stderr.decode()
        out = p.stdout.decode()
        return (float(re.search(r"PPL = ([0-9.]+)", out).group(1)),
                re.search(r"KV (\d+) -> (\d+) bytes", out).groups())

    once, every, past = ppl(), ppl("--compress-every", "128"), ppl("--compress-every", "4096")
    assert every[1] == once[1], (every, once)
    assert every[0] != once[0], (every, once)
    assert past == once, (past, once)


def test_bench_decodes_a_batch(ebb_bin, model_path):
    """`ebb bench -b B`: B sequences decoding together, a row of its own beside tg."""
    p = run_ebb(ebb_bin, "bench", "-m", model_path, "-p", "8", "-n", "4", "-r", "1", "-b", "3", "--kv-bits", "4")
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    rows = {line.split("|")[1].strip(): float(line.split("|")[2].split()[0]) for line in out.splitlines()
            if line.startswith("| pp") or line.startswith("| tg")}
    assert set(rows) == {"pp8", "tg4", "tg4 b3"} and all(v > 0 for v in rows.values()), out
