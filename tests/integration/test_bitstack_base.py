"""A BitStack stack on a 2-bit base (`ebb pack --format bitstack`, whose default is
--base-bits 2), end to end on test_bitstack.py's two-layer cut of the default model.

What is checked, and against what:
  - the file, read with numpy from the GGUF specification and docs/formats.md alone
    (tools/gguf_header.py; the `gguf` package refuses ebb's W2G64): every matrix has a W2G64
    base no further from W than round-to-nearest on the min-max grid of the same groups, and
    blocks peeled off the scaled residual, so that base + blocks diag(1/s) approaches W closer
    with every level;
  - ebb computes what the file says: perplexity in place (the base's 2-bit product on int8
    activations, the blocks' sign products) is the dense f32 rebuild's within their rounding,
    and falls with every level;
  - a bad base is refused naming the file: a base type other than W2G64, a matrix without its
    base, a base tensor of another type, a base on inputs not in groups of 64;
  - the packer's base options refuse what they cannot do, before any work;
  - packing again writes the same bytes.
The daemon serving a based stack as the bottom rung of a ladder, through budget changes
while requests stream, is test_governor.py's ladder test.
"""
import pathlib
import re
import types

import numpy as np
import pytest

from conftest import run_ebb
from test_bitstack import cut_model, refused, stack_with_ffn
import bitstack_gguf  # noqa: E402  (tools/, on the path through conftest)
import gguf_header  # noqa: E402

gguf = pytest.importorskip("gguf")

HELDOUT = pathlib.Path.home() / ".cache" / "ebb" / "heldout.txt"
LEVELS = 2
W2G64 = 65   # kernels/formats.h


@pytest.fixture(scope="module")
def based(ebb_bin, model_path, tmp_path_factory):
    if not HELDOUT.exists():
        pytest.fail("the held-out text is missing: run scripts/setup")
    d = tmp_path_factory.mktemp("bitstack-base")
    src, out = d / "cut2.gguf", d / "cut2.based.gguf"
    cut_model(model_path, src, 2)
    pack(ebb_bin, src, out)
    return src, out


def pack(ebb_bin, src, out):
    """ebb pack's default stack (on a base) of src, small and quick."""
    p = run_ebb(ebb_bin, "pack", "-m", str(src), "--format", "bitstack", "--levels", str(LEVELS),
                "--calib-seqs", "4", "--calib-len", "128", "--checkpoints", "0", "--no-eval", "--no-register",
                "-o", str(out), timeout=600)
    assert p.returncode == 0, p.stderr.decode()


def tensor_bytes(path, header, name, count):
    kv, tensors, start = header
    _, _, offset = tensors[name]
    return np.fromfile(path, dtype=np.uint8, count=count, offset=start + offset)


def w2g64(raw, rows, cols):
    """W2G64 rows as docs/formats.md and kernels/formats.h lay them out: per 64 values an f16
    step d, an f16 minimum m, and 16 bytes whose byte j holds values j, 16 + j, 32 + j, 48 + j
    from its low bits up; w = d * q + m."""
    b = raw.reshape(rows, cols // 64, 20)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = b[..., 4:20]
    q = np.concatenate([(qs >> (2 * k)) & 3 for k in range(4)], axis=-1).astype(np.float32)
    return (d * q + m).reshape(rows, cols)


def min_max_grid(w):
    """Round to nearest on each group's min-max grid of four levels (the plain baseline)."""
    g = w.reshape(-1, 64)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 3, 1)
    return (lo + np.clip(np.round((g - lo) / step), 0, 3) * step).reshape(w.shape)


def test_the_base_and_the_blocks_rebuild_the_source_matrix(based):
    src, out = based
    header = gguf_header.read(out)
    kv, tensors, _ = header
    assert kv["ebb.format"] == "bitstack" and kv["ebb.bitstack.base"] == "W2G64"
    for layer in range(2):
        for kind in bitstack_gguf.KINDS:
            t, dims, _ = tensors[f"blk.{layer}.{kind}.bs_base"]
            rows, cols = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576),
                          "attn_output": (576, 576), "ffn_gate": (1536, 576), "ffn_up": (1536, 576),
                          "ffn_down": (576, 1536)}[kind]
            assert t == W2G64 and dims == [cols, rows], (layer, kind, t, dims)
    rows, cols = 1536, 576
    w = np.asarray({x.name: x for x in gguf.GGUFReader(str(src)).tensors}["blk.1.ffn_up.weight"].data)
    assert w.shape == (rows, cols)
    base = w2g64(tensor_bytes(out, header, "blk.1.ffn_up.bs_base", rows * cols // 64 * 20), rows, cols)
    scale = tensor_bytes(out, header, "blk.1.ffn_in.bs_scale", cols * 4).view(np.float32)
    # Rounded with each weight's error weighted by its input's s^2: in that measure no further
    # from W than the min-max grid.
    base_err = np.linalg.norm((w - base) * scale) / np.linalg.norm(w * scale)
    assert base_err <= np.linalg.norm((w - min_max_grid(w)) * scale) / np.linalg.norm(w * scale) * 1.001, base_err
    _, dims, _ = tensors["blk.1.ffn_up.bs_blocks"]
    block, levels = dims
    assert levels == LEVELS
    blocks = types.SimpleNamespace(shape=[block, levels], data=tensor_bytes(out, header, "blk.1.ffn_up.bs_blocks",
                                                                            block * levels).view(np.int8))
    rebuilt, errors = base.copy(), [np.linalg.norm(w - base) / np.linalg.norm(w)]
    for signs, u, v in bitstack_gguf.split_blocks(blocks, rows, cols):
        negative = np.unpackbits(signs, axis=1, bitorder="little").astype(bool)
        magnitude = u.astype(np.float32) @ v.astype(np.float32).T
        rebuilt += np.where(negative, -magnitude, magnitude) / scale
        errors.append(np.linalg.norm(w - rebuilt) / np.linalg.norm(w))
    assert len(errors) == LEVELS + 1 and all(b < a for a, b in zip(errors, errors[1:])), errors


def ppl(ebb_bin, model, *args):
    p = run_ebb(ebb_bin, "ppl", "-m", str(model), "-f", str(HELDOUT), "--chunks", "2", *args, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    out = p.stdout.decode()
    m = re.search(r"stack: (\d+) of (\d+) bytes resident", out)
    return float(re.search(r"PPL = ([0-9.]+)", out).group(1)), (int(m.group(1)), int(m.group(2))) if m else None


def test_in_place_computes_what_the_file_says_and_levels_help(ebb_bin, based):
    src, out = based
    p = run_ebb(ebb_bin, "ppl", "-m", str(out), "-f", str(HELDOUT), "--chunks", "1", timeout=600)
    _, tensors, _ = gguf_header.read(out)
    base = sum(dims[0] * dims[1] // 64 * 20 for name, (_, dims, _) in tensors.items() if name.endswith(".bs_base"))
    assert f", on a W2G64 base of {base} bytes" in p.stdout.decode(), p.stdout.decode()
    in_place, (resident, total) = ppl(ebb_bin, out)
    dense, _ = ppl(ebb_bin, out, "--weights", "f32")
    assert resident == total and abs(in_place - dense) <= 0.03 * dense, (in_place, dense)
    one, (resident, _) = ppl(ebb_bin, out, "--stack-bytes", str(total // LEVELS))
    assert resident == total // LEVELS and one > in_place, (one, in_place)
    reference, no_stack = ppl(ebb_bin, src, "--weights", "f32")
    assert no_stack is None and reference < in_place, (reference, in_place)


def patched(path, tmp_path, old, new):
    data = bytearray(path.read_bytes())
    at = data.index(old)
    data[at:at + len(old)] = new
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("old,new,why", [
    (b"W2G64", b"W3G64", 'ebb.bitstack.base must be "W2G64"'),
    (b"blk.1.ffn_up.bs_base", b"blk.1.ffn_up.bs_bass", "stack tensor 'blk.1.ffn_up.bs_base' is missing"),
])
def test_a_bad_base_is_refused_naming_the_file(ebb_bin, based, tmp_path, old, new, why):
    bad = patched(based[1], tmp_path, old, new)
    p = run_ebb(ebb_bin, "ppl", "-m", str(bad), "-f", str(HELDOUT), "--chunks", "1")
    err = p.stderr.decode()
    assert p.returncode != 0 and str(bad) in err and why in err, err


def test_packing_again_writes_the_same_bytes(ebb_bin, based, tmp_path):
    # The base's rounding and the stack above it are deterministic: the same source, options
    # and seed give the same file.
    src, out = based
    again = tmp_path / "again.gguf"
    pack(ebb_bin, src, again)
    assert again.read_bytes() == out.read_bytes()


def test_a_base_tensor_of_another_type_is_refused(ebb_bin, based, tmp_path):
    # The tensor table's type field of one base (after its name, its dimension count and two
    # dimensions) changed from W2G64 to Q4_0.
    data = bytearray(based[1].read_bytes())
    name = b"blk.0.attn_k.bs_base"
    at = data.index(name) + len(name) + 4 + 16
    assert int.from_bytes(data[at:at + 4], "little") == W2G64
    data[at:at + 4] = (2).to_bytes(4, "little")
    bad = tmp_path / "q4_0-base.gguf"
    bad.write_bytes(bytes(data))
    assert "stack tensor 'blk.0.attn_k.bs_base' is of another type or shape; expected W2G64 [576, 192, 1]" \
        in refused(ebb_bin, bad)


def test_a_base_on_inputs_not_in_groups_of_64_is_refused(ebb_bin, tmp_path):
    odd = stack_with_ffn(tmp_path / "ffn40.gguf", 40, [("ebb.bitstack.base", "W2G64", gguf.GGUFValueType.STRING)])
    assert "a W2G64 base needs inputs in multiples of 64 (ffn_down has 40)" in refused(ebb_bin, odd)


@pytest.mark.parametrize("args,why", [
    (("--base-bits", "1"), "--base-bits must be 0 or 2"),
    (("--base-bits", "3"), "--base-bits"),
    (("--base-bits", "0", "--weight-quant", "gptq"), "--weight-quant applies to a bitstack's base; --base-bits 0 has none"),
    (("--format", "w4a4", "--base-bits", "2"), "apply to --format bitstack only"),
])
def test_base_options_that_cannot_apply_are_refused(ebb_bin, model_path, tmp_path, args, why):
    fmt = () if "--format" in args else ("--format", "bitstack")
    out = tmp_path / "never.gguf"
    p = run_ebb(ebb_bin, "pack", "-m", model_path, *fmt, *args, "--no-register", "-o", str(out), timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 2 and why in err and not out.exists(), err
