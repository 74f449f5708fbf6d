"""`ebb pack --format bitstack` and the file it writes, end to end, on a two-layer cut of
the default model (its real weights, so the decomposition sees trained matrices, small
enough to pack in seconds).

What is checked, and against what:
  - the file's block directory with the `gguf` package: every block once, level by
    level, and tensors of the shapes docs/formats.md gives;
  - `ebb ppl --stack-bytes`: the prefix kept is the longest that fits (no bytes: no
    blocks; one level's bytes: one level everywhere; all: every level), and perplexity
    falls as blocks are added, towards the f32 source's;
  - a damaged directory is refused at load, naming the file and the key;
  - the perplexity checkpoints the packer measures into the file: from one level to all,
    bytes increasing, read back by `ebb ppl` (interpolated as bitstack_ppl_at says), the
    same bytes when packed again, and malformed ones refused naming the key;
  - `--bitstack-order random` draws the order tools/bitstack_reorder.py draws for the
    same seed (the ablation's files are what the packer would write).
"""
import os
import pathlib
import re

import numpy as np
import pytest

from conftest import run_ebb
from synthetic_gguf import copy_fields  # noqa: E402  (tools/, on the path through conftest)
from bitstack_reorder import stack_order  # noqa: E402
import bitstack_gguf  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
HELDOUT = pathlib.Path.home() / ".cache" / "ebb" / "heldout.txt"
CALIB = pathlib.Path.home() / ".cache" / "ebb" / "calibration.txt"
LEVELS = 4


def cut_model(src, dst, n_layers):
    """The first n_layers of src with every tensor in f32."""
    r = gguf.GGUFReader(src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(str(dst), arch)
    copy_fields(r, w, lambda name: name not in {"general.architecture", f"{arch}.block_count", "general.file_type"})
    w.add_block_count(n_layers)
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= n_layers:
            continue
        w.add_tensor(t.name, np.ascontiguousarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# The module's stack: its checkpoints and its perplexity on the first two windows of the
# held-out text.
EVAL = ("--eval", str(HELDOUT), "--eval-chunks", "2", "--checkpoint-windows", "2")


def pack(ebb_bin, src, out, *args):
    p = run_ebb(ebb_bin, "pack", "-m", str(src), "--format", "bitstack", "--base-bits", "0", "--levels", str(LEVELS),
                "--calib-seqs", "4", "--calib-len", "128", "--no-register", "-o", str(out), *args,
                timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    return p


@pytest.fixture(scope="module")
def stack(ebb_bin, model_path, tmp_path_factory):
    if not CALIB.exists() or not HELDOUT.exists():
        pytest.fail("the calibration and held-out texts are missing: run scripts/setup")
    d = tmp_path_factory.mktemp("bitstack")
    src, out = d / "cut2.gguf", d / "cut2.bitstack.gguf"
    cut_model(model_path, src, 2)
    p = pack(ebb_bin, src, out, *EVAL)
    err = p.stderr.decode()
    assert "decomposing" in err and "14/14 matrices" in err, err   # progress, every matrix
    assert "checkpoints  [8/8]" in err, err
    assert "format bitstack" in p.stdout.decode()
    (d / "pack.stdout").write_bytes(p.stdout)
    return src, out


def array(fields, key):
    return [fields[key].parts[i][0].item() for i in fields[key].data]


def checkpoints(path):
    f = gguf.GGUFReader(str(path)).fields
    return array(f, "ebb.bitstack.checkpoint_bytes"), array(f, "ebb.bitstack.checkpoint_ppl")


def ppl(ebb_bin, model, *args):
    p = run_ebb(ebb_bin, "ppl", "-m", str(model), "-f", str(HELDOUT), "--chunks", "2", *args, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    value = float(re.search(r"PPL = ([0-9.]+)", out).group(1))
    m = re.search(r"stack: (\d+) of (\d+) bytes resident, (\d+) to (\d+) of (\d+) levels", out)
    return value, tuple(int(x) for x in m.groups()) if m else None


def test_the_directory_is_every_block_once_level_by_level(stack):
    _, out = stack
    r = gguf.GGUFReader(str(out))
    fields = r.fields
    assert bytes(fields["ebb.format"].parts[-1]).decode() == "bitstack"
    assert fields["ebb.bitstack.levels"].parts[-1][0] == LEVELS
    order = [int(fields["ebb.bitstack.order"].parts[i][0]) for i in fields["ebb.bitstack.order"].data]
    n_matrices = 2 * 7
    assert sorted(order) == list(range(n_matrices * LEVELS))
    assert [b % LEVELS for b in order] == [i // n_matrices for i in range(len(order))]
    t = {x.name: x for x in r.tensors}
    # One tensor a matrix, whole blocks level after level: signs, then u and v at rank 3 (1/8 bit).
    assert list(t["blk.1.ffn_up.bs_blocks"].shape) == [1536 * 576 // 8 + 3 * (1536 + 576) * 2, LEVELS]
    assert not [x.name for x in r.tensors if x.name.split(".")[-1] in ("bs_signs", "bs_u", "bs_v")]
    assert list(t["blk.0.ffn_down_in.bs_scale"].shape) == [1536]
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_the_blocks_rebuild_the_scaled_source_matrix(stack):
    # Read with numpy from the file alone, as docs/formats.md lays a block out: the sum of the
    # first k blocks approaches W diag(s) of the f32 source, closer with every level.
    src, out = stack
    r = gguf.GGUFReader(str(out))
    t = {x.name: x for x in r.tensors}
    w = np.asarray({x.name: x for x in gguf.GGUFReader(str(src)).tensors}["blk.1.ffn_up.weight"].data)
    target = w * np.asarray(t["blk.1.ffn_in.bs_scale"].data)
    assert bitstack_gguf.matrix_shape(r, "ffn_up") == target.shape == (1536, 576)
    rebuilt, errors = np.zeros_like(target), []
    for signs, u, v in bitstack_gguf.split_blocks(t["blk.1.ffn_up.bs_blocks"], 1536, 576):
        negative = np.unpackbits(signs, axis=1, bitorder="little").astype(bool)
        magnitude = u.astype(np.float32) @ v.astype(np.float32).T
        rebuilt += np.where(negative, -magnitude, magnitude)
        errors.append(np.linalg.norm(target - rebuilt) / np.linalg.norm(target))
    assert len(errors) == LEVELS and all(b < a for a, b in zip(errors, errors[1:])) and errors[-1] < 0.5, errors


def test_a_budget_keeps_the_longest_prefix_and_quality_follows_it(ebb_bin, stack):
    src, out = stack
    full, (resident, total, lo, hi, levels) = ppl(ebb_bin, out)
    assert resident == total and (lo, hi, levels) == (LEVELS, LEVELS, LEVELS)
    per_level = total // LEVELS   # every level of every matrix has the same bytes
    one, (resident, _, lo, hi, _) = ppl(ebb_bin, out, "--stack-bytes", str(per_level))
    assert resident == per_level and (lo, hi) == (1, 1)
    _, (resident, _, lo, hi, _) = ppl(ebb_bin, out, "--stack-bytes", str(per_level + per_level // 2))
    assert per_level < resident <= per_level + per_level // 2 and (lo, hi) == (1, 2)
    _, (resident, _, lo, hi, _) = ppl(ebb_bin, out, "--stack-bytes", "0")
    assert resident == 0 and (lo, hi) == (0, 0)
    reference, stack_line = ppl(ebb_bin, src, "--weights", "f32")
    assert stack_line is None
    assert reference < full < one, (reference, full, one)


def test_logits_at_a_budget(ebb_bin, stack, tmp_path):
    # `ebb logits --stack-bytes` computes with the prefix that fits (what a
    # measurement of a shallow stack as a draft reads): one level's logits
    # differ from the whole stack's, and the file without a stack refuses it.
    src, out = stack
    ids = tmp_path / "ids.txt"
    ids.write_text("1 504 3458 282 1345 30 216 3386")
    total = stack_bytes(out)
    rows = {}
    for name, extra in [("full", []), ("one", ["--stack-bytes", str(total // LEVELS)])]:
        dst = tmp_path / f"{name}.f32"
        p = run_ebb(ebb_bin, "logits", "-m", str(out), "--ids-file", str(ids), "-o", str(dst), "--all", *extra)
        assert p.returncode == 0, p.stderr.decode()
        assert re.search(r"stack: (\d+) of (\d+) bytes resident", p.stdout.decode())
        rows[name] = np.fromfile(dst, dtype=np.float32).reshape(8, -1)
    assert np.isfinite(rows["full"]).all() and np.isfinite(rows["one"]).all()
    assert not np.array_equal(rows["full"], rows["one"])
    p = run_ebb(ebb_bin, "logits", "-m", str(src), "--ids-file", str(ids), "-o", str(tmp_path / "x.f32"),
                "--stack-bytes", "5")
    assert p.returncode == 2 and "bitstack files only" in p.stderr.decode()


def test_a_damaged_directory_is_refused(ebb_bin, stack, tmp_path):
    _, out = stack
    data = bytearray(out.read_bytes())
    key = b"ebb.bitstack.order"
    at = data.index(key) + len(key) + 4 + 4 + 8   # value type, element type, count: the first element
    data[at:at + 4] = data[at + 4:at + 8]     # the second block twice
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    p = run_ebb(ebb_bin, "ppl", "-m", str(bad), "-f", str(HELDOUT), "--chunks", "1")
    err = p.stderr.decode()
    assert p.returncode != 0 and str(bad) in err and "ebb.bitstack.order is not every block once" in err, err
    p = run_ebb(ebb_bin, "ppl", "-m", str(stack[0]), "-f", str(HELDOUT), "--chunks", "1", "--stack-bytes", "5")
    assert p.returncode == 2 and "bitstack files only" in p.stderr.decode()


def stack_bytes(path):
    return bitstack_gguf.stack_bytes(gguf.GGUFReader(str(path)))


def test_checkpoints_span_the_stack_and_quality_follows(ebb_bin, stack):
    _, out = stack
    f = gguf.GGUFReader(str(out)).fields
    assert f["ebb.bitstack.checkpoint_bytes"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT64]
    assert f["ebb.bitstack.checkpoint_ppl"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    at, ppl = checkpoints(out)
    total = stack_bytes(out)
    assert len(at) == len(ppl) == 8
    assert at[0] == total // LEVELS and at[-1] == total   # one full level to all
    assert all(b > a for a, b in zip(at, at[1:]))
    assert all(np.isfinite(ppl)) and min(ppl) >= 1
    assert ppl[-1] < ppl[0], ppl   # the whole stack beats one level
    # They scored the held-out text, as the file says: the last, the whole stack, is the
    # perplexity `ebb pack` then measured for the variant (the same two windows, f32 KV)
    # and `ebb ppl` measures.
    assert bytes(f["ebb.bitstack.checkpoint_text"].parts[-1]).decode() == "heldout.txt, 2 windows of 512"
    printed = (out.parent / "pack.stdout").read_text()
    assert "checkpoints on heldout.txt, 2 windows of 512:" in printed, printed
    variant = float(re.search(r"^perplexity ([0-9.]+) \+/- [0-9.]+ on heldout\.txt, 2 windows", printed,
                              re.M).group(1))
    assert ppl[-1] == pytest.approx(variant, rel=1e-4), (ppl, printed)
    whole = run_ebb(ebb_bin, "ppl", "-m", str(out), "-f", str(HELDOUT), "--chunks", "2", timeout=600)
    assert ppl[-1] == pytest.approx(float(re.search(r"PPL = ([0-9.]+)", whole.stdout.decode()).group(1)), rel=1e-4)
    assert "(on heldout.txt, 2 windows of 512)" in whole.stdout.decode(), whole.stdout.decode()
    # `ebb ppl` quotes them, interpolated in bytes between the two around its prefix.
    mid = (at[2] + at[3]) // 2
    _, (resident, _), quoted = ppl_run(ebb_bin, out, "--stack-bytes", str(mid))
    assert at[2] <= resident < at[3]
    t = (resident - at[2]) / (at[3] - at[2])
    assert quoted == pytest.approx((1 - t) * ppl[2] + t * ppl[3], rel=1e-4)
    assert ppl_run(ebb_bin, out, "--stack-bytes", str(at[0] - 1))[2] is None   # below the first: none


def ppl_run(ebb_bin, model, *args):
    p = run_ebb(ebb_bin, "ppl", "-m", str(model), "-f", str(HELDOUT), "--chunks", "1", "--ctx", "64", *args,
                timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    m = re.search(r"stack: (\d+) of (\d+) bytes resident", out)
    q = re.search(r"checkpoints give perplexity ([0-9.]+)", out)
    return float(re.search(r"PPL = ([0-9.]+)", out).group(1)), tuple(int(x) for x in m.groups()), \
        float(q.group(1)) if q else None


def test_an_evaluation_text_with_an_odd_name_is_named_in_utf8(ebb_bin, stack, tmp_path):
    """File names are bytes; the name the file records for its checkpoints' text must be
    UTF-8 or the loader would refuse the stack it just packed. Multi-byte characters stay."""
    src, _ = stack
    text = tmp_path / os.fsdecode(b"held\xffout \xc3\xa9t\xc3\xa9.txt")
    text.write_bytes(HELDOUT.read_bytes()[:200_000])
    out = tmp_path / "odd.gguf"
    pack(ebb_bin, src, out, "--eval", str(text), "--eval-chunks", "1", "--checkpoints", "1", "--checkpoint-windows", "1")
    named = bytes(gguf.GGUFReader(str(out)).fields["ebb.bitstack.checkpoint_text"].parts[-1]).decode()
    assert named == "held?out \u00e9t\u00e9.txt, 1 window of 512", named
    assert ppl_run(ebb_bin, out)[2] is not None   # it loads, and quotes its one checkpoint


def test_packing_again_writes_the_same_bytes(ebb_bin, stack, tmp_path):
    src, out = stack
    again = tmp_path / "again.gguf"
    pack(ebb_bin, src, again, *EVAL)
    assert again.read_bytes() == out.read_bytes()


def test_random_order_is_the_seeded_shuffle_of_the_reorder_tool(ebb_bin, stack, tmp_path):
    src, out = stack
    shuffled = tmp_path / "random.gguf"
    pack(ebb_bin, src, shuffled, "--bitstack-order", "random", "--seed", "7", "--checkpoints", "0", "--no-eval")
    f = gguf.GGUFReader(str(shuffled)).fields
    assert "ebb.bitstack.checkpoint_bytes" not in f
    order = array(f, "ebb.bitstack.order")
    assert order == stack_order("random", 14, LEVELS, 7)
    assert order != stack_order("random", 14, LEVELS, 1) != array(gguf.GGUFReader(str(out)).fields,
                                                                  "ebb.bitstack.order")
    # A file without checkpoints loads, and quotes none.
    assert ppl_run(ebb_bin, shuffled)[2] is None
    p = run_ebb(ebb_bin, "pack", "-m", str(src), "--format", "w4a16", "--checkpoints", "4", "-o",
                str(tmp_path / "x.gguf"))
    assert p.returncode == 2 and "bitstack only" in p.stderr.decode()


def patched(out, tmp_path, edit):
    data = bytearray(out.read_bytes())
    edit(data)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    return bad


def first_element(data, key):
    return data.index(key) + len(key) + 4 + 4 + 8   # value type, element type, count


def rewritten(out, dst, at, ppl, text=None, blocks=None):
    """out with the checkpoint arrays replaced (a length mismatch cannot be patched in place), and
    with text (a (value, gguf type) pair) as what they scored, or without one; blocks, when
    given, turns each block tensor into a list of (name, array, gguf type)."""
    r = gguf.GGUFReader(str(out))
    w = gguf.GGUFWriter(str(dst), bytes(r.fields["general.architecture"].parts[-1]).decode())
    copy_fields(r, w, lambda name: not name.startswith("ebb.bitstack.") and name != "general.architecture")
    # copy_fields lets the gguf package choose an array's element type; the stack's are fixed.
    w.add_key_value("ebb.bitstack.levels", LEVELS, gguf.GGUFValueType.UINT32)
    w.add_key_value("ebb.bitstack.order", array(r.fields, "ebb.bitstack.order"), gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.UINT32)
    w.add_key_value("ebb.bitstack.checkpoint_bytes", at, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT64)
    w.add_key_value("ebb.bitstack.checkpoint_ppl", ppl, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
    if text is not None:
        w.add_key_value("ebb.bitstack.checkpoint_text", *text)
    for t in r.tensors:
        if blocks and t.name.endswith(".bs_blocks"):
            for name, data, kind in blocks(t):
                w.add_tensor(name, data, raw_dtype=kind)
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def refused(ebb_bin, path):
    p = run_ebb(ebb_bin, "ppl", "-m", str(path), "-f", str(HELDOUT), "--chunks", "1")
    assert p.returncode != 0
    err = p.stderr.decode()
    assert str(path) in err, err
    return err


def test_malformed_checkpoints_are_refused(ebb_bin, stack, tmp_path):
    _, out = stack
    at, ppl = checkpoints(out)
    kb, kp = b"ebb.bitstack.checkpoint_bytes", b"ebb.bitstack.checkpoint_ppl"

    def swap_bytes(data):
        i = first_element(data, kb)
        data[i:i + 16] = data[i + 8:i + 16] + data[i:i + 8]
    assert "checkpoint_bytes[1]" in refused(ebb_bin, patched(out, tmp_path, swap_bytes))

    def nan_ppl(data):
        i = first_element(data, kp) + 4 * 3
        data[i:i + 4] = np.array([np.nan], dtype="<f4").tobytes()
    assert "checkpoint_ppl[3] = nan is not a perplexity" in refused(ebb_bin, patched(out, tmp_path, nan_ppl))

    def only_ppl(data):   # the bytes key renamed away: the perplexities alone
        i = data.index(kb)
        data[i:i + len(kb)] = b"ebb.bitstack.checkpoint_bytez"
    assert "ebb.bitstack.checkpoint_bytes must be" in refused(ebb_bin, patched(out, tmp_path, only_ppl))

    def text_not_utf8(data):
        assert data.count(b"heldout.txt, 2 windows of 512") == 1
        i = data.index(b"heldout.txt, 2 windows of 512")
        data[i + 7] = 0xff
    assert "ebb.bitstack.checkpoint_text must be a line of UTF-8" in refused(ebb_bin, patched(out, tmp_path,
                                                                                             text_not_utf8))

    def text_alone(data):   # both arrays renamed away: what they scored, without them
        for key in (kb, kp):
            i = data.index(key)
            data[i + len(key) - 1:i + len(key)] = b"z"
    assert "ebb.bitstack.checkpoint_bytes must be" in refused(ebb_bin, patched(out, tmp_path, text_alone))

    short = rewritten(out, tmp_path / "short.gguf", at, ppl[:-1])
    assert "ebb.bitstack.checkpoint_ppl must be 8 f32" in refused(ebb_bin, short)
    beyond = rewritten(out, tmp_path / "beyond.gguf", at[:-1] + [at[-1] + 1], ppl)
    assert "not increasing within the stack" in refused(ebb_bin, beyond)
    # The same rewrite with the file's own values loads and quotes them.
    same = rewritten(out, tmp_path / "same.gguf", at, ppl)
    assert ppl_run(ebb_bin, same, "--stack-bytes", str(at[-1]))[2] == pytest.approx(ppl[-1], rel=1e-4)


def stack_with_ffn(path, n_ff, extra_kv=()):
    """The tiny fuzz seed's plain stack with an FFN of n_ff and blocks of the sizes that
    width gives (rank 1, zeros), written to path, with extra (key, value, type) metadata: a
    stack of a shape the packer never writes (it needs dimensions in multiples of 64)."""
    seed = ROOT / "tests" / "fuzz" / "gguf" / "seed-tiny-packed-bitstack"
    r = gguf.GGUFReader(str(seed))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    n_embd, levels = 64, bitstack_gguf.levels(r)
    w = gguf.GGUFWriter(str(path), arch)
    copy_fields(r, w, lambda name: name not in {"general.architecture", f"{arch}.feed_forward_length"}
                and not name.startswith("ebb.bitstack."))
    w.add_feed_forward_length(n_ff)
    w.add_key_value("ebb.bitstack.levels", levels, gguf.GGUFValueType.UINT32)
    w.add_key_value("ebb.bitstack.order", array(r.fields, "ebb.bitstack.order"), gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.UINT32)
    for key, value, vtype in extra_kv:
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        x, kind = np.asarray(t.data), t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in ("ffn_gate", "ffn_up", "ffn_down"):
            rows, cols = (n_embd, n_ff) if kind == "ffn_down" else (n_ff, n_embd)
            x = np.zeros((levels, rows * cols // 8 + 2 * (rows + cols)), dtype=np.int8)   # rank 1
        elif t.name.endswith("ffn_down_in.bs_scale"):
            x = np.ones(n_ff, dtype=np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(x), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_matrix_whose_signs_are_not_whole_bytes_is_refused_at_load(ebb_bin, tmp_path):
    # A block's signs are whole bytes a row (inputs a multiple of 8), or its factors would be
    # misaligned. The packer never writes such a file, so one is made with an FFN of 36:
    # refused naming the matrix and the rule.
    odd = stack_with_ffn(tmp_path / "ffn36.gguf", 36)
    assert "stack matrices need inputs in multiples of 8 and rows x inputs in multiples of 16 (ffn_down is " \
        "64 x 36)" in refused(ebb_bin, odd)


def test_blocks_not_in_the_layout_are_refused_naming_the_fix(ebb_bin, stack, tmp_path):
    _, out = stack
    at, ppl = checkpoints(out)
    r = gguf.GGUFReader(str(out))
    i8, f16 = gguf.GGMLQuantizationType.I8, gguf.GGMLQuantizationType.F16

    def before_2026_12_06(t):   # the layout stacks were packed in before: three tensors a matrix
        stem = t.name[:-len(".bs_blocks")]
        rows, cols = bitstack_gguf.matrix_shape(r, stem.split(".")[2])
        levels = bitstack_gguf.split_blocks(t, rows, cols)
        return [(stem + ".bs_signs", np.stack([b[0] for b in levels]).view(np.int8), i8),
                (stem + ".bs_u", np.stack([b[1] for b in levels]), f16),
                (stem + ".bs_v", np.stack([b[2] for b in levels]), f16)]
    err = refused(ebb_bin, rewritten(out, tmp_path / "old.gguf", at, ppl, blocks=before_2026_12_06))
    assert "packed by an older ebb" in err and "pack it again with ebb pack --format bitstack" in err, err

    def two_bytes_short(t):
        return [(t.name, np.ascontiguousarray(np.asarray(t.data).reshape(LEVELS, -1)[:, :-2]), i8)]
    err = refused(ebb_bin, rewritten(out, tmp_path / "short.gguf", at, ppl, blocks=two_bytes_short))
    assert "stack tensor 'blk.0.attn_q.bs_blocks' is not whole blocks of signs and factors of one rank" in err, err


def test_what_the_checkpoints_scored_is_a_short_line_of_text(ebb_bin, stack, tmp_path):
    _, out = stack
    at, ppl = checkpoints(out)
    string = gguf.GGUFValueType.STRING
    for name, text in [("empty", ("", string)), ("long", ("x" * 256, string)), ("nul", ("held\0out", string)),
                       ("number", (512, gguf.GGUFValueType.UINT32))]:
        bad = rewritten(out, tmp_path / f"{name}.gguf", at, ppl, text)
        err = refused(ebb_bin, bad)
        assert "ebb.bitstack.checkpoint_text must be a line of UTF-8 text, 1 to 255 bytes" in err, (name, err)
    longest = "é" * 127 + "x"   # 255 bytes: the most a file may say
    p = run_ebb(ebb_bin, "ppl", "-m", str(rewritten(out, tmp_path / "longest.gguf", at, ppl, (longest, string))),
                "-f", str(HELDOUT), "--chunks", "1", "--ctx", "64", "--stack-bytes", str(at[-1]))
    assert p.returncode == 0 and f"(on {longest})" in p.stdout.decode("utf-8"), p.stderr.decode()
    # Without the key, a file from before it was written: its checkpoints scored calibration windows.
    p = run_ebb(ebb_bin, "ppl", "-m", str(rewritten(out, tmp_path / "old.gguf", at, ppl)), "-f", str(HELDOUT),
                "--chunks", "1", "--ctx", "64", "--stack-bytes", str(at[-1]))
    assert p.returncode == 0 and "(on calibration windows)" in p.stdout.decode(), p.stderr.decode()
