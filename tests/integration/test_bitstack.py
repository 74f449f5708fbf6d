"""`ebb pack --format bitstack` and the file it writes, end to end, on a two-layer cut of
the default model (its real weights, so the decomposition sees trained matrices, small
enough to pack in seconds).

What is checked, and against what:
  - the file's block directory with the `gguf` package: every block once, level by
    level, and tensors of the shapes docs/formats.md gives;
  - `ebb ppl --stack-bytes`: the prefix kept is the longest that fits (no bytes: no
    blocks; one level's bytes: one level everywhere; all: every level), and perplexity
    falls as blocks are added, towards the f32 source's;
  - a damaged directory is refused at load, naming the file and the key.
"""
import pathlib
import re

import numpy as np
import pytest

from conftest import run_ebb
from synthetic_gguf import copy_fields  # noqa: E402  (tools/, on the path through conftest)

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


@pytest.fixture(scope="module")
def stack(ebb_bin, model_path, tmp_path_factory):
    if not CALIB.exists() or not HELDOUT.exists():
        pytest.fail("the calibration and held-out texts are missing: run scripts/setup")
    d = tmp_path_factory.mktemp("bitstack")
    src, out = d / "cut2.gguf", d / "cut2.bitstack.gguf"
    cut_model(model_path, src, 2)
    p = run_ebb(ebb_bin, "pack", "-m", str(src), "--format", "bitstack", "--levels", str(LEVELS),
                "--calib-seqs", "4", "--calib-len", "128", "--no-register", "--no-eval", "-o", str(out),
                timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    err = p.stderr.decode()
    assert "decomposing" in err and "14/14 matrices" in err, err   # progress, every matrix
    assert "format bitstack" in p.stdout.decode()
    return src, out


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
    signs, u, v = t["blk.1.ffn_up.bs_signs"], t["blk.1.ffn_up.bs_u"], t["blk.1.ffn_up.bs_v"]
    assert list(signs.shape) == [576 // 8, 1536, LEVELS]
    assert list(u.shape) == [3, 1536, LEVELS] and list(v.shape) == [3, 576, LEVELS]   # rank 3 at 1/8 bit
    assert list(t["blk.0.ffn_down_in.bs_scale"].shape) == [1536]
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


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
