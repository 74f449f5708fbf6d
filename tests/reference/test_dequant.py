"""ebb's dequantizers (kernels/formats.c) against the `gguf` Python package.

The reference is gguf.quants.dequantize, code ebb does not share. A small GGUF
file is written here with GGUFWriter, one or more tensors per supported type:

  - F32, F16, BF16: random values, plus every one of the 65536 F16/BF16 bit
    patterns (infinities, NaNs, subnormals, signed zeros);
  - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: real data quantized by gguf.quants.quantize,
    and random raw blocks (every bit pattern of the quants, any scale sign);
  - Q2_K .. Q6_K, which gguf.quants cannot quantize: random raw blocks whose
    f16 scale fields are set to finite random halves (the positions come from
    the GGUF block layouts), everything else random bytes.

ebb reads the file through its own validated reader and writes each tensor
dequantized (`ebb inspect FILE --tensor NAME --out OUT.f32`); the values must
match the reference. The F16/BF16 conversions must match bit for bit (NaNs:
position and sign). The quantized types must match to 1e-6 of the tensor's
largest value: the arithmetic is the same sequence of float32 operations, so
in practice they are identical, and the slack only admits a compiler fusing a
multiply-add; one wrong bit of a quant moves a value by a whole quantization
step, thousands of times more. The `ebb inspect` listing is checked against
GGUFReader's view of the same file.

Environment: EBB_BIN (default /work/main/build/ebb).
"""
import os
import re
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

EBB_BIN = os.environ.get("EBB_BIN", "/work/main/build/ebb")

pytestmark = pytest.mark.skipif(not os.access(EBB_BIN, os.X_OK), reason=f"needs {EBB_BIN}")

ROWS, COLS = 3, 512           # 512 is a whole number of blocks for every type

# Byte offsets of the f16 scale fields in each K-quant block (GGUF block layouts).
K_QUANT_F16_FIELDS = {
    T.Q2_K: (84, [80, 82]),   # scales[16] qs[64] d dmin
    T.Q3_K: (110, [108]),     # hmask[32] qs[64] scales[12] d
    T.Q4_K: (144, [0, 2]),    # d dmin scales[12] qs[128]
    T.Q5_K: (176, [0, 2]),    # d dmin scales[12] qh[32] qs[128]
    T.Q6_K: (210, [208]),     # ql[128] qh[64] scales[16] d
}
# Legacy quants: block bytes and f16 field offsets (d, and m for the _1 types).
LEGACY_F16_FIELDS = {
    T.Q4_0: (18, [0]), T.Q4_1: (20, [0, 2]), T.Q5_0: (22, [0]), T.Q5_1: (24, [0, 2]),
    T.Q8_0: (34, [0]),
}


def random_blocks(rng, qtype, block_bytes, f16_offsets, n_blocks):
    """Random bytes, with finite random halves (either sign) at the scale fields."""
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in f16_offsets:
        mag = rng.uniform(1e-3, 2.0, size=n_blocks) * rng.choice([-1.0, 1.0], size=n_blocks)
        raw[:, off:off + 2] = mag.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def build_cases(rng):
    """name -> (type, array to write, raw_dtype or None, reference float32 array)."""
    cases = {}
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    special = x.copy()
    special[0, :8] = [0.0, -0.0, 1e-30, -1e30, 65504.0, 3.0e-8, np.inf, np.nan]
    cases["f32.random"] = (T.F32, special, None, special)

    h = x.astype(np.float16)
    cases["f16.random"] = (T.F16, h, None, dequantize(h.view(np.uint8), T.F16))
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(128, 512)
    cases["f16.every"] = (T.F16, every.view(np.float16), None, dequantize(every.view(np.uint8), T.F16))

    b = quantize(x, T.BF16)
    cases["bf16.random"] = (T.BF16, b, T.BF16, dequantize(b, T.BF16))
    eb = every.view(np.uint8)
    cases["bf16.every"] = (T.BF16, eb, T.BF16, dequantize(eb, T.BF16))

    for qtype, (block_bytes, offs) in LEGACY_F16_FIELDS.items():
        name = qtype.name.lower()
        q = quantize(x, qtype)
        cases[f"{name}.quantized"] = (qtype, q, qtype, dequantize(q, qtype))
        raw = random_blocks(rng, qtype, block_bytes, offs, ROWS * COLS // 32).reshape(ROWS, -1)
        cases[f"{name}.random"] = (qtype, raw, qtype, dequantize(raw, qtype))

    for qtype, (block_bytes, offs) in K_QUANT_F16_FIELDS.items():
        raw = random_blocks(rng, qtype, block_bytes, offs, ROWS * COLS // 256).reshape(ROWS, -1)
        cases[f"{qtype.name.lower()}.random"] = (qtype, raw, qtype, dequantize(raw, qtype))
    return cases


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    rng = np.random.default_rng(20240611)
    cases = build_cases(rng)
    path = tmp_path_factory.mktemp("dequant") / "types.gguf"
    w = GGUFWriter(str(path), arch="llama")
    w.add_string("test.string", 'tab\there "quoted"\nnew line')
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -42)
    w.add_float32("test.f32", 0.25)
    w.add_bool("test.bool", True)
    w.add_array("test.ints", [1, 2, 3, 4, 5])
    w.add_array("test.strings", ["a", "bc"])
    for name, (_, arr, raw_dtype, _) in cases.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.add_tensor("i32.plain", np.arange(64, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path), cases


def ebb(*args, **kw):
    return subprocess.run([EBB_BIN, "inspect", *args], capture_output=True, text=True, timeout=60, **kw)


def ebb_tensor(path, name, tmp_path):
    out = tmp_path / (name + ".f32")
    res = ebb(path, "--tensor", name, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return np.fromfile(out, dtype="<f4")


def test_reference_sees_every_type(model_file):
    _, cases = model_file
    types = {c[0] for c in cases.values()}
    assert types == {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                     T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


@pytest.mark.parametrize("name", [n for n in build_cases(np.random.default_rng(0))])
def test_dequantized_values_match(model_file, name, tmp_path):
    path, cases = model_file
    qtype, _, _, ref = cases[name]
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    got = ebb_tensor(path, name, tmp_path)
    assert got.shape == ref.shape
    if qtype in (T.F32, T.F16, T.BF16):
        nan = np.isnan(ref)
        assert np.array_equal(np.isnan(got), nan), "NaNs in different places"
        assert np.array_equal(np.signbit(got[nan]), np.signbit(ref[nan]))
        assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32)), \
            f"{name}: {np.count_nonzero(got[~nan].view(np.uint32) != ref[~nan].view(np.uint32))} differ"
    else:
        assert np.all(np.isfinite(ref)) and np.all(np.isfinite(got))
        scale = float(np.max(np.abs(ref)))
        err = np.abs(got.astype(np.float64) - ref)
        worst = int(np.argmax(err))
        assert err[worst] <= 1e-6 * scale, \
            f"{name}: value {worst} is {got[worst]!r}, reference {ref[worst]!r}"


VALUE_TYPE_NAMES = {
    GGUFValueType.UINT8: "u8", GGUFValueType.INT8: "i8", GGUFValueType.UINT16: "u16",
    GGUFValueType.INT16: "i16", GGUFValueType.UINT32: "u32", GGUFValueType.INT32: "i32",
    GGUFValueType.FLOAT32: "f32", GGUFValueType.BOOL: "bool", GGUFValueType.STRING: "string",
    GGUFValueType.UINT64: "u64", GGUFValueType.INT64: "i64", GGUFValueType.FLOAT64: "f64",
}


def test_listing_matches_reader(model_file):
    path, _ = model_file
    res = ebb(path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    reader = GGUFReader(path)
    assert re.search(rf"GGUF version 3\b.*\b{len(reader.tensors)} tensors", out.splitlines()[0])

    lines = {ln.split(" = ", 1)[0]: ln.split(" = ", 1)[1] for ln in out.splitlines() if " = " in ln}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue                       # the reader's pseudo-fields for the header
        assert key in lines, f"metadata key {key} missing"
        if field.types[0] == GGUFValueType.ARRAY:
            assert lines[key] == f"{VALUE_TYPE_NAMES[field.types[1]]}[{len(field.data)}]"
    assert lines["test.string"] == r'"tab\there \"quoted\"\nnew line"'
    assert lines["test.u32"] == "4000000000"
    assert lines["test.i32"] == "-42"
    assert lines["test.f32"] == "0.25"
    assert lines["test.bool"] == "true"

    rows = {}
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) == 4 and parts[3].isdigit():
            rows[parts[0]] = parts[1:]
    assert len(rows) == len(reader.tensors)
    for t in reader.tensors:
        typ, shape, nbytes = rows[t.name]
        assert typ == t.tensor_type.name
        assert shape == "x".join(str(int(d)) for d in t.shape)   # reader's shape is ne[0] first
        assert int(nbytes) == int(t.n_bytes)


def test_errors(model_file, tmp_path):
    path, _ = model_file
    res = ebb("--help")
    assert res.returncode == 0 and "usage" in res.stdout
    res = ebb(path, "--tensor", "no.such.tensor", "--out", str(tmp_path / "x.f32"))
    assert res.returncode != 0 and "no.such.tensor" in res.stderr
    res = ebb(path, "--tensor", "i32.plain", "--out", str(tmp_path / "y.f32"))
    assert res.returncode != 0 and "I32" in res.stderr
    res = ebb(str(tmp_path / "missing.gguf"))
    assert res.returncode != 0 and "missing.gguf" in res.stderr
    res = ebb(path, "--tensor", "f32.random")
    assert res.returncode != 0
    res = ebb(path, "--bogus", "1")
    assert res.returncode != 0
    res = ebb(path, "--tensor", "f32.random", "--out", str(tmp_path / "no" / "dir.f32"))
    assert res.returncode != 0 and res.stderr
