"""ebb's tokenizer against Hugging Face `tokenizers`, built independently.

The reference tokenizer is assembled here from the GGUF's vocabulary and
merges (read with the `gguf` package) and the pre-tokenizer the model's
tokenizer.json declares: for SmolLM ("smollm") a Sequence of Digits
(individual digits) and ByteLevel with the GPT-2 expression; for the other
supported families the Split expression of their tokenizer.json followed by
ByteLevel without its own expression. Nothing here comes from ebb's code.

The text is a few thousand lines: Python standard-library sources and
docstrings (code, prose), the licence texts in /usr/share/common-licenses
(prose), and lines generated with a fixed seed that stress what tokenizers get
wrong: emoji and ZWJ sequences, CJK and other scripts, numbers in many forms,
tabs, runs of spaces, \\r and other odd whitespace, trailing spaces, Unicode
punctuation, combining marks and contractions.

Environment: EBB_BIN (default /work/main/build/ebb), EBB_MODEL (default
/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf).
"""
import ast
import glob
import os
import random
import re
import subprocess
import sysconfig

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

EBB_BIN = os.environ.get("EBB_BIN", "/work/main/build/ebb")
EBB_MODEL = os.environ.get("EBB_MODEL", "/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf")

# The Split patterns of the models' tokenizer.json files.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CONTROL, USER_DEFINED = 3, 4

pytestmark = pytest.mark.skipif(
    not (os.access(EBB_BIN, os.X_OK) and os.path.exists(EBB_MODEL)),
    reason=f"needs {EBB_BIN} and {EBB_MODEL}")


# --------------------------------------------------------------------------
# Reading the GGUF and building the reference.
# --------------------------------------------------------------------------

def _field_strings(field):
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _field_ints(field):
    return [int(field.parts[i][0]) for i in field.data]


@pytest.fixture(scope="module")
def vocab():
    r = gguf.GGUFReader(EBB_MODEL)
    f = r.fields
    v = {
        "model": bytes(f["tokenizer.ggml.model"].parts[-1]).decode(),
        "pre": bytes(f["tokenizer.ggml.pre"].parts[-1]).decode(),
        "tokens": _field_strings(f["tokenizer.ggml.tokens"]),
        "types": _field_ints(f["tokenizer.ggml.token_type"]),
        "merges": _field_strings(f["tokenizer.ggml.merges"]),
        "bos": int(f["tokenizer.ggml.bos_token_id"].parts[-1][0]),
        "eos": int(f["tokenizer.ggml.eos_token_id"].parts[-1][0]),
    }
    assert v["model"] == "gpt2"
    assert v["pre"] == "smollm"
    return v


def build_hf(v, pre_tokenizer, with_specials=True):
    token_to_id = {t: i for i, t in enumerate(v["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in v["merges"]]
    tok = Tokenizer(models.BPE(vocab=token_to_id, merges=merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    if with_specials:
        tok.add_special_tokens([
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(v["tokens"], v["types"]) if ty in (CONTROL, USER_DEFINED)])
    return tok


def smollm_pre():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def split_pre(pattern):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# --------------------------------------------------------------------------
# Text.
# --------------------------------------------------------------------------

def _stdlib_files():
    root = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(root, "*.py")))


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (UnicodeDecodeError, OSError):
        return None


def code_lines(rng, n):
    lines = []
    for path in _stdlib_files():
        text = _read_text(path)
        if text:
            lines.extend(text.split("\n"))
    return rng.sample(lines, min(n, len(lines)))


def docstring_lines(rng, n):
    lines = []
    for path in _stdlib_files()[:120]:
        text = _read_text(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    lines.extend(doc.split("\n"))
    return rng.sample(lines, min(n, len(lines)))


def license_lines(rng, n):
    seen, lines = set(), []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        text = _read_text(real)
        if text:
            lines.extend(text.split("\n"))
    return rng.sample(lines, min(n, len(lines)))


EMOJI = ["😀", "🤖", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "❤️", "🔥", "✨", "🧑🏿‍💻", "☕", "🍣", "🫠", "©", "™"]
WORDS = ["the", "Tokenizer", "don't", "WE'LL", "it'ſ", "you're", "I'M", "they've", "she'd",
         "naïve", "café", "Ærøskøbing", "straße", "Ελληνικά", "русский", "עברית", "العربية",
         "हिन्दी", "ไทย", "日本語", "中文字符", "한국어", "ｆｕｌｌｗｉｄｔｈ", "ǅemal", "ﬁnance",
         "x²", "H₂O", "½", "Ⅻ", "٣٤٥", "१२३", "１２３", "3.14159", "1,000,000", "0x1F",
         "2024-05-09", "v1.2.3", "e\u0301", "a\u0308\u0323", "Z\u0351\u0352\u0357a\u0300\u0301lgo",
         "<html>", "foo_bar", "camelCase", "snake_case_name", "--flag", "a->b", "x+=1", "@user",
         "#tag", "$HOME", "C:\\path", "http://example.com/a?b=c&d=e", "<|im_start|>",
         "<|im_end", "<reponame>", "<repo_name>"]
PUNCT = ["“", "”", "‘", "’", "—", "–", "…", "«", "»", "¿", "¡", "‹", "›", "、", "。", "「", "」",
         "·", "•", "§", "¶", "†", "‰", "′", "″", "!", "?", ".", ",", ";", ":", "(", ")", "'", '"']
SPACES = [" ", "  ", "   ", "\t", "\t\t", " \t ", "\r", "\r ", "\x0b", "\x0c", "\u00a0",
          "\u2003", "\u2009", "\u3000", "\u0085", "\u2028", "\u2029", "\u200b", "\ufeff",
          "\u180e", "\x1c", "\x1f", "\x00", "\x7f"]
CJK = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生"
KANA = "あいうえおかきくけこさしすせそアイウエオカキクケコー"
HANGUL = "가나다라마바사아자차카타파하한국어문장"


def generated_lines(rng, n):
    lines = []
    for i in range(n):
        kind = i % 8
        parts = []
        for _ in range(rng.randint(1, 14)):
            r = rng.random()
            if kind == 0 or r < 0.2:
                parts.append(rng.choice(WORDS))
            elif kind == 1 or r < 0.3:
                parts.append("".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4))))
            elif kind == 2 or r < 0.4:
                alphabet = rng.choice([CJK, KANA, HANGUL])
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
            elif kind == 3 or r < 0.5:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 15))))
            elif kind == 4 or r < 0.7:
                parts.append(rng.choice(SPACES))
            elif kind == 5 or r < 0.8:
                parts.append(rng.choice(PUNCT))
            else:
                parts.append("".join(rng.choice("abcdefgh ijklmno'PQRS") for _ in range(rng.randint(1, 9))))
        sep = rng.choice(["", " ", "  ", "\t"]) if kind in (4, 6) else " "
        line = sep.join(parts)
        if kind == 7:
            line += rng.choice([" ", "   ", "\t", "\r", " \r"])   # trailing whitespace
        lines.append(line)
    lines += ["", " ", "   ", "\t", "\r", "1234567890", "a" * 3000, " " * 2000 + "x",
              "🤖" * 500, "\u00e9" * 700, "ab" * 2000, "<|im_start|>" * 5]
    return lines


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(20240509)
    lines = (code_lines(rng, 2200) + docstring_lines(rng, 700) + license_lines(rng, 1300)
             + generated_lines(rng, 2600))
    assert all("\n" not in s for s in lines)
    assert len(lines) > 6000
    return lines


# --------------------------------------------------------------------------
# Running ebb.
# --------------------------------------------------------------------------

def run_ebb(args, input_bytes=None, model=EBB_MODEL):
    return subprocess.run([EBB_BIN, "tokenize", "-m", model] + args, input=input_bytes,
                          capture_output=True, timeout=300)


def ebb_file(tmp_path, lines, *flags, model=EBB_MODEL):
    path = tmp_path / "lines.txt"
    path.write_bytes("\n".join(lines).encode("utf-8") + b"\n")
    res = run_ebb(["--file", str(path), *flags], model=model)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    out = res.stdout.split(b"\n")
    assert out[-1] == b"", "output must end with a newline"
    out = out[:-1]
    assert len(out) == len(lines), "one output line per input line"
    return out


def parse_ids(line):
    return [int(x) for x in line.split()]


def compare_ids(tmp_path, hf, lines, *flags, model=EBB_MODEL):
    got = [parse_ids(x) for x in ebb_file(tmp_path, lines, *flags, model=model)]
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    bad = [(s, g, w) for s, g, w in zip(lines, got, want) if g != w]
    detail = "\n".join(f"{s!r}\n  ebb {g}\n  hf  {w}" for s, g, w in bad[:5])
    assert not bad, f"{len(bad)} of {len(lines)} lines differ:\n{detail}"
    return len(lines)


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------

def test_ids_match_hf_smollm(tmp_path, vocab, corpus):
    hf = build_hf(vocab, smollm_pre())
    n = compare_ids(tmp_path, hf, corpus)
    print(f"{n} lines: ebb ids == HF ids")


def test_ids_match_hf_without_special_parsing(tmp_path, vocab, corpus):
    hf = build_hf(vocab, smollm_pre(), with_specials=False)
    compare_ids(tmp_path, hf, corpus, "--no-special")


def test_roundtrip(tmp_path, corpus):
    out = ebb_file(tmp_path, corpus, "--roundtrip")
    bad = [(s, o) for s, o in zip(corpus, out) if o != s.encode("utf-8")]
    assert not bad, f"{len(bad)} lines do not survive encode+decode, e.g. {bad[:3]!r}"


def gpt2_byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode: printable bytes stand for
    themselves, the other 68 were moved to U+0100 onwards in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
            + list(range(0xAE, 0x100)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


PIECE_RE = re.compile(rb'(\d+):"((?:[^"\\]|\\.)*)"')


def unescape_piece(s):
    out, i = bytearray(), 0
    simple = {ord("n"): b"\n", ord("t"): b"\t", ord("r"): b"\r", ord("\\"): b"\\", ord('"'): b'"'}
    while i < len(s):
        if s[i] == ord("\\"):
            if s[i + 1] == ord("x"):
                out.append(int(s[i + 2:i + 4], 16))
                i += 4
            else:
                out += simple[s[i + 1]]
                i += 2
        else:
            out.append(s[i])
            i += 1
    return bytes(out)


def parse_pieces(line):
    items, pos = [], 0
    while pos < len(line):
        m = PIECE_RE.match(line, pos)
        assert m, f"bad --pieces output at {pos}: {line[pos:pos + 40]!r}"
        items.append((int(m.group(1)), unescape_piece(m.group(2))))
        pos = m.end()
        if pos < len(line):
            assert line[pos:pos + 1] == b" "
            pos += 1
    return items


def test_pieces(tmp_path, vocab, corpus):
    # Each token's piece is the bytes its vocabulary text stands for under the
    # byte-level alphabet (control tokens: their text), and a line's pieces
    # concatenate back to the line.
    table = gpt2_byte_decoder()
    lines = corpus[:1500] + corpus[-800:]
    out = ebb_file(tmp_path, lines, "--pieces")
    checked = set()
    for s, line in zip(lines, out):
        items = parse_pieces(line)
        assert b"".join(p for _, p in items) == s.encode("utf-8")
        for tid, piece in items:
            text = vocab["tokens"][tid]
            if vocab["types"][tid] in (CONTROL, USER_DEFINED):
                want = text.encode("utf-8")
            else:
                want = bytes(table[c] for c in text)
            assert piece == want, (tid, text, piece)
            checked.add(tid)
    assert len(checked) > 3000


@pytest.mark.parametrize("pre,pattern", [("gpt2", GPT2_PATTERN), ("llama3", LLAMA3_PATTERN),
                                         ("llama-bpe", LLAMA3_PATTERN), ("qwen2", QWEN2_PATTERN)])
def test_other_pre_tokenizers(tmp_path, vocab, corpus, pre, pattern):
    # Same vocabulary and merges, another pre-tokenizer: isolates the split.
    model = tmp_path / f"tok-{pre}.gguf"
    write_tokenizer_gguf(model, vocab, pre=pre)
    if pre == "gpt2":
        hf_pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf_pre = split_pre(pattern)
    hf = build_hf(vocab, hf_pre)
    compare_ids(tmp_path, hf, corpus, model=str(model))


def write_tokenizer_gguf(path, v, pre="smollm", model="gpt2", merges=None):
    """A GGUF holding only tokenizer metadata (ebb tokenize reads no weights)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"] if merges is None else merges)
    w.add_bos_token_id(v["bos"])
    w.add_eos_token_id(v["eos"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_special_tokens(vocab):
    text = "<|im_start|>user\nhi<|im_end|>"
    hf = build_hf(vocab, smollm_pre())
    res = run_ebb([text])
    assert res.returncode == 0, res.stderr
    ids = parse_ids(res.stdout)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    im_start, im_end = vocab["tokens"].index("<|im_start|>"), vocab["tokens"].index("<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end

    res = run_ebb(["--no-special", text])
    assert res.returncode == 0, res.stderr
    plain = parse_ids(res.stdout)
    assert plain == build_hf(vocab, smollm_pre(), False).encode(text, add_special_tokens=False).ids
    assert im_start not in plain and im_end not in plain

    # <reponame> and <repo_name> are both tokens; the longest match wins.
    res = run_ebb(["x<repo_name><reponame>y"])
    assert parse_ids(res.stdout) == hf.encode("x<repo_name><reponame>y", add_special_tokens=False).ids


def test_invalid_utf8_is_an_error(tmp_path):
    for bad in [b"abc\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\xf4\x90\x80\x80"]:
        res = run_ebb([bad])
        assert res.returncode != 0
        assert b"UTF-8" in res.stderr, res.stderr
        assert res.stdout == b""
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nstill fine\nbroken \xe2\x82\n")
    res = run_ebb(["--file", str(path)])
    assert res.returncode != 0
    assert b"line 3" in res.stderr and b"UTF-8" in res.stderr, res.stderr


def test_unsupported_metadata_is_a_clear_error(tmp_path, vocab):
    path = tmp_path / "odd-pre.gguf"
    write_tokenizer_gguf(path, vocab, pre="mystery-pre")
    res = run_ebb(["hello"], model=str(path))
    assert res.returncode != 0
    assert b"mystery-pre" in res.stderr, res.stderr

    path = tmp_path / "spm.gguf"
    write_tokenizer_gguf(path, vocab, model="llama")
    res = run_ebb(["hello"], model=str(path))
    assert res.returncode != 0
    assert b"llama" in res.stderr and b"gpt2" in res.stderr, res.stderr

    path = tmp_path / "bad-merge.gguf"
    write_tokenizer_gguf(path, vocab, merges=vocab["merges"] + ["notatoken alsonot"])
    res = run_ebb(["hello"], model=str(path))
    assert res.returncode != 0
    assert b"merge" in res.stderr, res.stderr


def test_cli_usage_errors():
    res = subprocess.run([EBB_BIN, "tokenize", "--help"], capture_output=True, timeout=60)
    assert res.returncode == 0 and b"--file" in res.stdout
    res = subprocess.run([EBB_BIN, "tokenize", "hello"], capture_output=True, timeout=60)
    assert res.returncode != 0 and b"-m" in res.stderr
    res = run_ebb(["--bogus", "x"])
    assert res.returncode != 0 and b"--bogus" in res.stderr
    res = subprocess.run([EBB_BIN, "tokenize", "-m", "/nonexistent.gguf", "x"], capture_output=True,
                         timeout=60)
    assert res.returncode != 0 and b"/nonexistent.gguf" in res.stderr
