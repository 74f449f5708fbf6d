#!/usr/bin/env python3
"""Evaluation of ebb's context-compression stage (engine/compress.h): what compressing a long
prompt's KV cache costs in retrieval and in perplexity, against how many bytes it saves.

What it measures
  passkey  A 5-digit pass key (seeded RNG) hidden in a haystack at a depth (0..100% of the
           haystack before it), then a question; correct = the key's digits appear in the greedy
           output of `ebb generate -n 8 --temp 0`. Haystacks: `filler` (the grass is green ...
           repeated), `natural` (held-out English, ~/.cache/ebb/heldout.txt, an offset per seed),
           `multikey` (filler with three labelled keys, red/green/blue door; the blue one is asked
           for and sits at the depth, the other two at seeded random depths). Configurations: the
           full 4-bit cache (`off`), and `demote` / `drop` at budgets 0.5 / 0.25 / 0.1, each
           question-agnostic (the context is prefilled and compressed before the question is read:
           `-p CONTEXT --then QUESTION`, kvpress's protocol) and question-aware (the question ends
           the prompt, so it is in SnapKV's observation window). Compressed configurations run only
           at lengths where the full cache finds >= 90% (--min-full) of the canonical (filler,
           single-key) keys; the harder haystacks run there too, their own full-cache score beside.
  ppl      `ebb ppl` on the held-out text: each window's first half is prefilled and compressed,
           the second half scored. Full cache vs each mode and budget: PPL, its change in %, top-1
           agreement with the full cache (argmax per scored token, --top1-out), KV bytes ratio.
  ablate   At about equal KV bytes (--target, default 25% of the full 4-bit cache's body bytes):
           SnapKV drop, SnapKV demote with a low-tier budget (keep share + demoted share, the rest
           dropped), uniform 2-bit (demote, budget 0, --compress-keys 2: everything but the sinks and
           recent window at 2 bits; it cannot reach 25%, its real ratio is reported), the same with
           the default 4-bit demoted keys (uniform-k4v2), random selection drop and StreamingLLM
           (`recent` selection, drop). Budgets are chosen by calibration runs (a kept position costs
           ~4.5 bits/value, a demoted one ~3.5 with 4-bit keys; the reported bytes decide), stored in
           context_calib.csv. Passkey accuracy on a small grid (question-agnostic, and question-aware
           for the selecting methods; budgets calibrated at the agnostic compression point), and PPL.
  ruler    RULER-style tasks at 1k and 2k tokens, 3 seeds: variable tracking (a value passed along a
           chain of 4 variables in filler, with a decoy chain; score = share of the chain named) and
           common words (a numbered list where 10 words are ten times as frequent as 20 others; score =
           share of the 10 named), at 0/25/50/75/90% of the prompt compressed away, demote and drop,
           question-agnostic and aware (docs/data/context_ruler.csv).
  plot     docs/context_compression.png: passkey accuracy vs budget per mode, PPL change vs KV
           bytes ratio, passkey accuracy vs bits per value (ablation methods included).
  promptside  The issue's optional prompt-side stage, measured outside the engine: every context
           token scored by its surprisal under the served model (`ebb logits --all`), a share of
           the context kept (the most surprising tokens; whole sentences by mean surprisal; or the
           sinks and the most recent tokens), and only those prefilled (`generate --ids-file`),
           then the question: passkey question-agnostic on the passkey grid's 1k and 2k prompts,
           and perplexity of each --ctx window's last SCORE tokens after its compressed context
           (docs/data/context_promptside.csv; the prompt's KV then costs the kept share).

Bytes: ebb reports the cache's body bytes before and after compression (whole 64-position pages
before, the compact store plus the pages from the boundary on after). bits/value =
bytes_after * 8 / (positions * values per position), values per position = layers * 2 (K, V) *
KV heads * head_dim = 30 * 2 * 3 * 64 = 11520 for SmolLM2-135M (--values-per-pos).

How to run (one ebb process at a time, always -t 1; every step appends to CSVs under --out and skips
rows already there, so an interrupted run resumes):
    PY=~/.cache/ebb/venv/bin/python
    $PY tools/context_eval.py passkey            # docs/data/context_passkey.csv (--select reconstruct:
                                                 # the question-agnostic scoring's rows beside)
    $PY tools/context_eval.py ppl                # docs/data/context_ppl.csv
    $PY tools/context_eval.py ablate             # docs/data/context_ablate*.csv, context_calib.csv
    $PY tools/context_eval.py ruler              # docs/data/context_ruler.csv, a table on stdout
    $PY tools/context_eval.py plot               # docs/context_compression.png + tables on stdout
    $PY tools/context_eval.py promptside --ctx 8192:2:2048   # docs/data/context_promptside.csv + tables
    options: --ebb BIN (default $EBB or /work/main/build-dev/ebb), --model GGUF, --out DIR,
             --dry-run (list the runs and an estimate of their time, run nothing)

Protocol notes
  * Lengths are prompt tokens (context + question), approximate: the haystack is sized by a
    chars/token ratio measured once with `ebb tokenize`, then the exact count is taken.
  * Binaries before b0d805a crash (segfault in the SnapKV scoring, a window page already given
    back) when the compression point is 1..31 tokens past a multiple of 256 -- e.g. every
    `ppl --ctx 4096` (point 2049); --avoid-short-pass sizes prompts around it for such binaries.
  * Every row records the ebb binary's sha256 prefix (`binary`); rows of another binary are not
    reused, and `plot` reads only the rows of the --ebb given. Pin a copy of the binary for a run
    (a rebuild of a moving checkout under a running sweep mixes versions).
  * `demote` stores demoted positions with 4-bit keys (per position) and 2-bit values, the engine's
    default since b99cc28 (--compress-keys 4, column `keys`); ablate's uniform-2bit uses
    --compress-keys 2 (2-bit keys per channel).
  * `off` is run once per prompt (question appended); agnostic and aware share it.
  * Binaries from e37510b on score with a lookahead of 32 tokens by default (the engine's
    compress_params.lookahead; docs/benchmarks.md, "Scoring with a lookahead"); earlier ones
    with the window alone. The `binary` column tells which.
"""

import argparse
import csv
import math
import os
import random
import re
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_EBB = os.environ.get("EBB", "/work/main/build-dev/ebb")
DEFAULT_MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_HELDOUT = os.path.expanduser("~/.cache/ebb/heldout.txt")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
QUESTION = "\nWhat is the pass key? The pass key is"
QUESTION_MK = "\nWhat is the pass key for the blue door? The pass key for the blue door is"
COLORS = ("red", "green", "blue")   # multikey: blue is asked for
BUDGETS = (0.5, 0.25, 0.1)
MODES = ("demote", "drop")
BATCH = 256          # MODEL_MAX_BATCH: the prefill's batches
OBS_WINDOW = 32      # COMPRESS_WINDOW

# Passkey grid: (length, haystacks, depths, seeds, compressed?). Sized for ~30 minutes on one
# thread (a 1k prompt prefills in ~2.6 s, 2k in ~6 s, 4k in ~19 s, 7.5k in ~60 s with -t 1).
PASSKEY_GRID = [
    (1000, ("filler", "natural"), (0, 25, 50, 75), (0, 1), True),
    (1000, ("multikey",), (0, 25, 50, 75), (0,), True),
    (2000, ("filler", "natural"), (25, 50, 75), (0,), True),
    (2000, ("multikey",), (50,), (0,), True),
    (4000, ("filler",), (25, 50), (0,), True),   # natural at 4k: the full cache finds 1 of 3
    (4000, ("natural",), (50,), (0,), False),
    # Depth 100 (the needle ends the context: it is inside the recent window that compression always
    # keeps) and the longest lengths: the full cache only.
    (1000, ("filler", "natural"), (100,), (0, 1), False),
    (1000, ("multikey",), (100,), (0,), False),
    (2000, ("filler", "natural"), (0, 100), (0,), False),
    (4000, ("filler", "natural"), (0, 100), (0,), False),
    (7500, ("filler", "natural"), (50,), (0,), False),
]
ABLATE_GRID = [
    (1000, ("filler", "natural"), (25, 50, 75), (0,), True),
    (2000, ("filler", "natural"), (25, 50, 75), (0,), True),
]
EST_SECONDS = {1000: 2.7, 2000: 6.3, 4000: 19.0, 7500: 62.0}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ ebb

class Ebb:
    def __init__(self, args):
        self.bin, self.model, self.vpp = args.ebb, args.model, args.values_per_pos
        self.dry = args.dry_run
        self.avoid = args.avoid_short_pass
        self._tok = {}
        import hashlib
        with open(self.bin, "rb") as f:
            self.binary = hashlib.sha256(f.read()).hexdigest()[:12]   # rows of another binary are redone

    def tokens(self, text):
        if text not in self._tok:
            out = subprocess.run([self.bin, "tokenize", "-m", self.model, "--", text], capture_output=True,
                                 text=True, check=True).stdout
            self._tok[text] = len(out.split())
        return self._tok[text]

    def run(self, argv, timeout=900):
        t0 = time.time()
        p = subprocess.run([self.bin] + argv + ["-t", "1"], capture_output=True, text=True, timeout=timeout,
                           errors="replace")
        return p.returncode, p.stdout, p.stderr, time.time() - t0


RE_COMP = re.compile(r"\[compressed: kept (\d+), demoted (\d+), dropped (\d+) of (\d+) positions; "
                     r"KV (\d+) -> (\d+) bytes; ([\d.]+) ms\]")
RE_PROMPT = re.compile(r"\[prompt (\d+) tokens")
RE_PPL = re.compile(r"PPL = ([\d.]+) \+/- ([\d.]+)\s+\((\d+) tokens scored")
RE_PPL_COMP = re.compile(r"compressed (\d+) of (\d+) windows \((\w+)\): KV (\d+) -> (\d+) bytes")


def compress_args(mode, budget, low=None, select="snapkv", keys=4):
    if mode == "off":
        return ["--compress", "off"]
    a = ["--compress", mode, "--compress-budget", repr(budget), "--compress-min", "0",
         "--compress-select", select, "--compress-keys", str(keys)]
    if low is not None and low >= 0:
        a += ["--compress-low", repr(low)]
    return a


def parse_compressed(err, vpp):
    m = RE_COMP.search(err)
    if not m:
        return {}
    kept, dem, drop, n, b0, b1 = (int(x) for x in m.groups()[:6])
    return {"kept": kept, "demoted": dem, "dropped": drop, "positions": n, "bytes_before": b0,
            "bytes_after": b1, "bytes_ratio": round(b1 / b0, 5), "bits_per_value": round(b1 * 8 / (n * vpp), 4),
            "compress_ms": float(m.group(7))}


# ------------------------------------------------------------------ CSV (resumable)

class Table:
    def __init__(self, path, fields, key):
        self.path, self.fields, self.key = path, fields, key
        self.rows = []
        if os.path.exists(path):
            with open(path, newline="") as f:
                self.rows = list(csv.DictReader(f))
        self.done = {self.k(r) for r in self.rows}

    def k(self, r):
        return tuple(str(r.get(f, "")) for f in self.key)

    def has(self, r):
        return self.k(r) in self.done

    def get(self, **kw):
        want = {k: str(v) for k, v in kw.items()}
        return [r for r in self.rows if all(str(r.get(k, "")) == v for k, v in want.items())]

    def add(self, r):
        r = {f: r.get(f, "") for f in self.fields}
        new = not os.path.exists(self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow(r)
        self.rows.append({k: str(v) for k, v in r.items()})
        self.done.add(self.k(r))


# ------------------------------------------------------------------ passkey prompts

def crash_prone(n):
    """The compression point's counts that crash the current engine (see the docstring)."""
    return 1 <= n % BATCH < OBS_WINDOW


class Prompts:
    def __init__(self, ebb, heldout):
        self.ebb = ebb
        with open(heldout, encoding="utf-8") as f:
            self.heldout = f.read()
        self._ratio = {}

    def chars_per_token(self, kind):
        if kind not in self._ratio:
            sample = self.filler(20000) if kind != "natural" else self.heldout[100000:120000]
            self._ratio[kind] = len(sample) / self.ebb.tokens(sample)
        return self._ratio[kind]

    @staticmethod
    def filler(nchars):
        n = nchars // (len(FILLER) + 1) + 1
        return Prompts.cut(" ".join([FILLER] * n)[:max(0, nchars)])

    @staticmethod
    def cut(text, sentence=True):
        """text up to its last sentence end, or word end (natural text: finer steps for the sizing)."""
        i = max(text.rfind(". "), text.rfind(".\n")) if sentence else -1
        if i < len(text) // 2:
            i = max(text.rfind(" "), text.rfind("\n")) - 1
        return text[:i + 1] if i > 0 else text

    def natural(self, seed, nchars):
        rng = random.Random(1000 + seed)
        off = rng.randrange(0, len(self.heldout) - 80000)
        off = self.heldout.index("\n", off) + 1
        return self.cut(self.heldout[off:off + nchars], sentence=False)

    @staticmethod
    def boundary(text, frac):
        """The sentence or line boundary nearest frac * len(text)."""
        if frac <= 0:
            return 0
        if frac >= 1:
            return len(text)
        target = int(frac * len(text))
        cands = [m.end() for m in re.finditer(r"(?<=[.!?])[ \n]+|\n\n+", text)]
        return min(cands, key=lambda c: abs(c - target)) if cands else target

    def build(self, hay, length, depth, seed):
        """(context, question, key): about `length` prompt tokens in all."""
        rng = random.Random(f"{hay}-{length}-{depth}-{seed}")
        key = rng.randrange(10000, 100000)
        if hay == "multikey":
            keys = {"blue": key}
            for c in ("red", "green"):
                keys[c] = rng.randrange(10000, 100000)
            depths = {"blue": depth / 100}
            for c in ("red", "green"):
                while True:
                    d = rng.random()
                    if all(abs(d - x) > 0.1 for x in depths.values()):
                        depths[c] = d
                        break
            needles = [(depths[c], f"The pass key for the {c} door is {keys[c]}. Remember it. {keys[c]} is the "
                        f"pass key for the {c} door.") for c in COLORS]
            question = QUESTION_MK
        else:
            needles = [(depth / 100, f"The pass key is {key}. Remember it. {key} is the pass key.")]
            question = QUESTION
        kind = "natural" if hay == "natural" else "filler"
        fixed = self.ebb.tokens(INTRO + " ".join(n for _, n in needles) + question) + 2 * len(needles)
        nchars = int((length - fixed) * self.chars_per_token(kind))
        for _ in range(16):
            text = self.natural(seed, nchars) if kind == "natural" else self.filler(nchars)
            context = self._insert(text, needles)
            n_ctx = self.ebb.tokens(context)
            n_all = self.ebb.tokens(context + question)
            cpt = len(text) / max(1, n_all - fixed)   # this text's own ratio
            if abs(n_all - length) > 0.03 * length:
                nchars += int((length - n_all) * cpt)
                continue
            if self.ebb.avoid and (crash_prone(n_ctx) or crash_prone(n_all)):   # below the multiple of 256, both of them
                nchars -= int((n_all % BATCH + 14) * cpt)
                continue
            return context, question, key, n_ctx, n_all
        raise RuntimeError(f"could not size a {hay} prompt of {length} tokens")

    def _insert(self, text, needles):
        cuts = sorted(((self.boundary(text, d), n) for d, n in needles), key=lambda x: x[0])
        out, prev = [INTRO], 0
        for pos, needle in cuts:   # pos: the start of a sentence (after its whitespace) or the end
            seg = text[prev:pos]
            out.append(seg)
            if seg and not seg[-1].isspace():
                out.append(" ")
            out.append(needle + (" " if pos < len(text) else ""))
            prev = pos
        out.append(text[prev:])
        return "".join(out).rstrip()


PASSKEY_FIELDS = ["binary", "haystack", "length", "depth", "seed", "question", "mode", "budget", "low", "select",
                  "keys", "key",
                  "n_context", "n_prompt", "correct", "output", "kept", "demoted", "dropped", "positions",
                  "bytes_before", "bytes_after", "bytes_ratio", "bits_per_value", "compress_ms", "wall_s", "rc"]
PASSKEY_KEY = ["binary", "haystack", "length", "depth", "seed", "question", "mode", "budget", "low", "select",
               "keys"]


def passkey_run(ebb, prompts, table, hay, length, depth, seed, question, mode, budget, low=None,
                select="snapkv", keys=4):
    row = {"binary": ebb.binary, "keys": keys if mode == "demote" else "", "haystack": hay, "length": length, "depth": depth, "seed": seed, "question": question, "mode": mode,
           "budget": budget if mode != "off" else "", "low": low if low is not None else "",
           "select": select if mode != "off" else ""}
    if table.has(row):
        return None
    if ebb.dry:
        return row
    context, q, key, n_ctx, n_all = prompts.build(hay, length, depth, seed)
    argv = ["generate", "-m", ebb.model, "-n", "8", "--temp", "0", "--kv-bits", "4"]
    argv += ["-p", context, "--then", q] if question == "agnostic" else ["-p", context + q]
    argv += compress_args(mode, budget, low, select, keys)
    rc, out, err, wall = ebb.run(argv)
    m = RE_PROMPT.search(err)
    row.update(key=key, n_context=n_ctx, n_prompt=int(m.group(1)) if m else n_all, rc=rc, wall_s=round(wall, 2),
               output=out.strip().replace("\n", "\\n")[:80], correct=int(rc == 0 and str(key) in out))
    row.update(parse_compressed(err, ebb.vpp))
    if rc != 0:
        log(f"  rc={rc}: {err.strip()[-200:]}")
    table.add(row)
    return row


def grid_prompts(grid):
    for length, hays, depths, seeds, compressed in grid:
        for seed in seeds:
            for hay in hays:
                for depth in depths:
                    yield length, hay, depth, seed, compressed


def cmd_passkey(args, ebb):
    prompts = Prompts(ebb, args.heldout)
    table = Table(os.path.join(args.out, "context_passkey.csv"), PASSKEY_FIELDS, PASSKEY_KEY)
    grid = [g for g in PASSKEY_GRID if not args.lengths or g[0] in args.lengths]
    items = list(grid_prompts(grid))
    todo_s, n = 0.0, 0
    t0 = time.time()

    def run_each(runs, tag):
        """Runs (item, question, mode, budget) not yet in the table, logging each."""
        nonlocal todo_s, n
        for j, ((length, hay, depth, seed, _), q, mode, budget) in enumerate(runs):
            r = passkey_run(ebb, prompts, table, hay, length, depth, seed, q, mode, budget,
                            select=args.select if mode != "off" else "snapkv")
            if r is None:
                continue
            n += 1
            todo_s += EST_SECONDS.get(length, 10)
            if not ebb.dry:
                log(f"[{tag}{j + 1}/{len(runs)}] {hay} L={length} d={depth} s={seed} {q} {mode} {budget}: "
                    f"{'ok ' if r['correct'] else 'MISS'} {r['output']!r} ratio={r.get('bytes_ratio')} "
                    f"({r['wall_s']} s, {time.time() - t0:.0f} s in)")

    # Phase 1: the full cache everywhere.
    run_each([(it, "full", "off", None) for it in items], "full ")
    # Phase 2: compressed configurations where the full cache is good enough.
    # A length qualifies when the full cache finds the key in >= min_full of its canonical (filler,
    # single key) prompts; the harder haystacks then run at that length whatever their own score
    # (reported next to them, with the compressed runs' accuracy on the prompts the full cache got).
    def full_acc(length, hays):
        rows = [r for h in hays for r in table.get(binary=ebb.binary, haystack=h, length=length, question="full",
                                                   mode="off")]
        return (sum(int(r["correct"]) for r in rows) / len(rows) if rows else None), len(rows)
    eligible = {}
    for length in sorted({it[0] for it in items}):
        hays = sorted({it[1] for it in items if it[0] == length})
        a, n_rows = full_acc(length, ["filler"] if "filler" in hays else hays)
        eligible[length] = ebb.dry or (a is not None and a >= args.min_full)
        if not ebb.dry:
            log(f"full cache L={length}: " + ", ".join(f"{h} {full_acc(length, [h])[0]:.2f} (n={full_acc(length, [h])[1]})"
                                                       for h in hays)
                + ("" if eligible[length] else "  -> below --min-full on filler: compressed runs skipped"))
    configs = [(q, m, b) for b in BUDGETS for m in MODES for q in ("agnostic", "aware")]
    run_each([(it, q, m, b) for it in items if it[4] and eligible[it[0]] for q, m, b in configs], "")
    if ebb.dry:
        log(f"passkey: {n} runs to do, about {todo_s / 60:.1f} min")
    else:
        log(f"passkey: {n} runs in {time.time() - t0:.0f} s")


# ------------------------------------------------------------------ ppl

PPL_FIELDS = ["binary", "ctx", "chunks", "score", "method", "mode", "budget", "low", "select", "keys", "ppl", "ppl_err", "delta_pct",
              "top1_agree", "scored", "positions", "bytes_before", "bytes_after", "bytes_ratio", "bits_per_value",
              "wall_s", "rc"]
PPL_KEY = ["binary", "ctx", "chunks", "score", "mode", "budget", "low", "select", "keys"]


def read_top1(path):
    with open(path, "rb") as f:
        b = f.read()
    return struct.unpack(f"<{len(b) // 4}i", b)


def ppl_run(ebb, args, table, ctx, chunks, method, mode, budget=None, low=None, select="snapkv", keys=4, score=0):
    row = {"binary": ebb.binary, "keys": keys if mode == "demote" else "", "ctx": ctx, "chunks": chunks,
           "score": score or "", "method": method, "mode": mode,
           "budget": budget if mode != "off" else "", "low": low if low is not None else "",
           "select": select if mode != "off" else ""}
    work = args.work
    os.makedirs(work, exist_ok=True)
    at = f"{ctx}-{chunks}" + (f"-s{score}" if score else "")
    tag = f"{ebb.binary}-{at}-{mode}-{budget}-{low}-{select}-{keys}"
    top1 = os.path.join(work, f"top1-{tag}.bin")
    ref_top1 = os.path.join(work, f"top1-{ebb.binary}-{at}-off-None-None-snapkv-4.bin")
    if table.has(row) and (mode != "off" or os.path.exists(top1)):
        return None
    if ebb.dry:
        return row
    if mode != "off" and not os.path.exists(ref_top1):
        raise RuntimeError("the full-cache run (off) must come first")
    argv = ["ppl", "-m", ebb.model, "-f", args.heldout, "--ctx", str(ctx), "--chunks", str(chunks),
            "--kv-bits", "4", "--top1-out", top1] + (["--score", str(score)] if score else []) + \
        compress_args(mode, budget, low, select, keys)
    rc, out, err, wall = ebb.run(argv, timeout=3600)
    text = out + err
    m = RE_PPL.search(text)
    row.update(rc=rc, wall_s=round(wall, 1))
    if m:
        row.update(ppl=float(m.group(1)), ppl_err=float(m.group(2)), scored=int(m.group(3)))
    mc = RE_PPL_COMP.search(text)
    if mc:
        windows, b0, b1 = int(mc.group(2)), int(mc.group(4)), int(mc.group(5))
        positions = (ctx - score if score else ctx // 2 + 1) * windows   # the context compressed
        row.update(positions=positions, bytes_before=b0, bytes_after=b1, bytes_ratio=round(b1 / b0, 5),
                   bits_per_value=round(b1 * 8 / (positions * ebb.vpp), 4))
    if rc != 0:
        log(f"  rc={rc}: {err.strip()[-300:]}")
    if mode == "off":
        row.update(delta_pct=0.0, top1_agree=1.0)
        if table.has(row):
            return None   # the row was there, only the top-1 file was missing
    elif m:
        ref = table.get(binary=ebb.binary, ctx=ctx, chunks=chunks, score=score or "", mode="off")
        base = float(ref[0]["ppl"])
        a, b = read_top1(ref_top1), read_top1(top1)
        row.update(delta_pct=round(100 * (row["ppl"] / base - 1), 3),
                   top1_agree=round(sum(x == y for x, y in zip(a, b)) / min(len(a), len(b)), 5))
    table.add(row)
    log(f"  ppl ctx={ctx} {method} {mode} b={budget} low={low} {select}: ppl={row.get('ppl')} "
        f"delta={row.get('delta_pct')}% top1={row.get('top1_agree')} ratio={row.get('bytes_ratio')} "
        f"({row['wall_s']} s)")
    return row


def cmd_ppl(args, ebb):
    table = Table(os.path.join(args.out, "context_ppl.csv"), PPL_FIELDS, PPL_KEY)
    t0 = time.time()
    n = 0
    for spec in args.ctx:
        ctx, chunks, score = spec[0], spec[1], spec[2] if len(spec) > 2 else 0
        runs = [("full", "off", None)] + [(f"snapkv-{m}", m, b) for m in MODES for b in BUDGETS]
        for method, mode, budget in runs:
            n += ppl_run(ebb, args, table, ctx, chunks, method, mode, budget, score=score) is not None
    if ebb.dry:
        log(f"ppl: {n} runs to do")
    else:
        log(f"ppl: {n} runs in {time.time() - t0:.0f} s")


# ------------------------------------------------------------------ ablate

CALIB_FIELDS = ["binary", "n_prompt", "mode", "budget", "low", "select", "keys", "kept", "demoted", "dropped", "positions",
                "bytes_before", "bytes_after", "bytes_ratio", "bits_per_value"]
CALIB_KEY = ["binary", "n_prompt", "mode", "budget", "low", "keys"]
# bits/value: a kept position (4-bit codes + a (d, m) pair per 64), a demoted one with 4-bit keys (the
# default) and 2-bit values, and one with 2-bit keys (--compress-keys 2).
KEPT_BITS, LOW_BITS = 4.5, {4: 3.5, 2: 2.5}


def calib_ratio(ebb, prompts, calib, n_prompt, mode, budget, low=None):
    """The bytes ratio of a configuration for an n_prompt-token prompt (filler; bytes do not depend on
    the text), measured once and kept in context_calib.csv."""
    row = {"binary": ebb.binary, "n_prompt": n_prompt, "mode": mode, "budget": budget,
           "low": low if low is not None else "", "keys": 4 if mode == "demote" else ""}
    got = calib.get(**row)
    if got:
        return float(got[0]["bytes_ratio"])
    if ebb.dry:
        return None
    cpt = prompts.chars_per_token("filler")
    text = prompts.filler(int(n_prompt * cpt))
    while ebb.tokens(text) > n_prompt:
        text = text[:-3]
    while ebb.tokens(text) < n_prompt:
        text += " a"
    if ebb.tokens(text) != n_prompt:
        log(f"  calibration prompt has {ebb.tokens(text)} tokens, not {n_prompt}")
    rc, out, err, wall = ebb.run(["generate", "-m", ebb.model, "-p", text, "-n", "1", "--temp", "0", "--kv-bits",
                                  "4"] + compress_args(mode, budget, low))
    c = parse_compressed(err, ebb.vpp)
    if rc != 0 or not c:
        raise RuntimeError(f"calibration run failed (rc {rc}): {err[-300:]}")
    row.update(c, select="snapkv")
    calib.add(row)
    log(f"  calib N={n_prompt} {mode} b={budget} low={low}: ratio {c['bytes_ratio']} "
        f"({c['bits_per_value']} bits/value)")
    return c["bytes_ratio"]


def solve_budgets(ebb, prompts, calib, n_prompt, target):
    """(drop budget, (keep, low) for demote+low) whose bytes ratio is within 0.01 of target: a formula's
    guess, then secant steps on measured ratios."""
    def solve(f, x0, slope):
        x, r = x0, f(x0)
        if r is None:
            return x0
        for _ in range(3):
            if abs(r - target) <= 0.01:
                break
            x1 = round(min(max(x + (target - r) / slope, 0.0), 1.0), 4)
            r1 = f(x1)
            if x1 != x:
                slope = (r1 - r) / (x1 - x) if r1 != r else slope
            x, r = x1, r1
        return x
    # A kept position costs as much as in the full cache (4.5 bits/value); the sinks and recent window
    # (and page granularity) cost the rest, so start a little below target.
    kd = solve(lambda b: calib_ratio(ebb, prompts, calib, n_prompt, "drop", round(b, 4)), round(target - 0.03, 4),
               1.0)
    keep = round(kd / 2, 4)
    low0 = round((kd - keep) * KEPT_BITS / LOW_BITS[4], 4)
    low = solve(lambda l: calib_ratio(ebb, prompts, calib, n_prompt, "demote", keep, round(l, 4)), low0,
                LOW_BITS[4] / KEPT_BITS)
    return kd, keep, low


def ablate_methods(kd, keep, low):
    """(name, mode, budget, low, select, demoted keys' bits)."""
    return [("snapkv-drop", "drop", kd, None, "snapkv", 4),
            ("snapkv-demote+low", "demote", keep, low, "snapkv", 4),
            ("uniform-2bit", "demote", 0.0, None, "snapkv", 2),
            ("uniform-k4v2", "demote", 0.0, None, "snapkv", 4),
            ("random-drop", "drop", kd, None, "random", 4),
            ("streamingllm", "drop", kd, None, "recent", 4)]


def cmd_ablate(args, ebb):
    prompts = Prompts(ebb, args.heldout)
    calib = Table(os.path.join(args.out, "context_calib.csv"), CALIB_FIELDS, CALIB_KEY)
    pk = Table(os.path.join(args.out, "context_ablate_passkey.csv"), ["method"] + PASSKEY_FIELDS,
               PASSKEY_KEY)
    full = Table(os.path.join(args.out, "context_passkey.csv"), PASSKEY_FIELDS, PASSKEY_KEY)
    pp = Table(os.path.join(args.out, "context_ppl.csv"), PPL_FIELDS, PPL_KEY)
    t0 = time.time()
    n = 0
    # Passkey, question-agnostic, at each length's nominal compression point.
    grid = [g for g in ABLATE_GRID if not args.lengths or g[0] in args.lengths]
    for length in sorted({g[0] for g in grid}):
        n_point = length - prompts.ebb.tokens(QUESTION)
        kd, keep, low = solve_budgets(ebb, prompts, calib, n_point, args.target)
        log(f"ablate L={length}: drop budget {kd}, demote keep {keep} + low {low}")
        items = [it for it in grid_prompts(g for g in grid if g[0] == length)]
        for length_, hay, depth, seed, _ in items:
            passkey_run(ebb, prompts, full, hay, length_, depth, seed, "full", "off", None)
            # Question-aware too for the methods that select (uniform ones do not read the question).
            runs = [(q, m) for q in ("agnostic", "aware") for m in ablate_methods(kd, keep, low)
                    if q == "agnostic" or not m[0].startswith("uniform")]
            for q, (method, mode, budget, lo, sel, kb) in runs:
                row = passkey_run(ebb, prompts, _Tagged(pk, method), hay, length_, depth, seed, q, mode,
                                  budget, lo, sel, kb)
                if row is not None:
                    n += 1
                    if not ebb.dry:
                        log(f"  {method} {q} {hay} L={length_} d={depth}: {'ok ' if row['correct'] else 'MISS'} "
                            f"{row['output']!r} bits/value={row.get('bits_per_value')} ({time.time() - t0:.0f} s in)")
    # Perplexity at the ppl step's windows (the compression point is ctx/2 + 1).
    for ctx, chunks, *_ in args.ctx[:1]:
        n_point = ctx // 2 + 1
        kd, keep, low = solve_budgets(ebb, prompts, calib, n_point, args.target)
        log(f"ablate ppl ctx={ctx}: drop budget {kd}, demote keep {keep} + low {low}")
        ppl_run(ebb, args, pp, ctx, chunks, "full", "off")
        for method, mode, budget, lo, sel, kb in ablate_methods(kd, keep, low):
            n += ppl_run(ebb, args, pp, ctx, chunks, method, mode, budget, lo, sel, kb) is not None
    log(f"ablate: {n} runs {'to do' if ebb.dry else f'in {time.time() - t0:.0f} s'}")


class _Tagged:
    """A Table whose added rows carry the ablation method's name."""
    def __init__(self, table, method):
        self.t, self.method = table, method

    def has(self, r):
        return self.t.has(r)

    def add(self, r):
        self.t.add(dict(r, method=self.method))


# ------------------------------------------------------------------ plot and tables

def load(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def acc(rows):
    return sum(int(r["correct"]) for r in rows) / len(rows) if rows else float("nan")


MARKERS = {"snapkv-drop": "s", "snapkv-demote+low": "D", "uniform-2bit": "^", "uniform-k4v2": "<",
           "random-drop": "x", "streamingllm": "v"}


def cmd_plot(args, ebb):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allpk = load(os.path.join(args.out, "context_passkey.csv"))
    binary = ebb.binary
    if allpk and not any(r["binary"] == binary for r in allpk):   # the CSVs' own binary, the commonest
        binary = max(set(r["binary"] for r in allpk), key=[r["binary"] for r in allpk].count)
        log(f"no rows of {ebb.bin} ({ebb.binary}): plotting those of binary {binary}")
    mine = lambda r: r["rc"] == "0" and r["binary"] == binary
    pk = [r for r in load(os.path.join(args.out, "context_passkey.csv")) if mine(r)]
    pp = [r for r in load(os.path.join(args.out, "context_ppl.csv")) if mine(r)]
    ab = [r for r in load(os.path.join(args.out, "context_ablate_passkey.csv")) if mine(r)]
    full = {(r["haystack"], r["length"], r["depth"], r["seed"]): int(r["correct"]) for r in pk if r["mode"] == "off"}
    comp_cells = {(r["haystack"], r["length"], r["depth"], r["seed"]) for r in pk if r["mode"] != "off"}

    # Tables (markdown) on stdout.
    lengths = sorted({int(r["length"]) for r in pk})
    pid = lambda r: (r["haystack"], r["length"], r["depth"], r["seed"])
    print("### Passkey, full 4-bit cache (correct/prompts)")
    for L in lengths:
        cells = sorted({r["haystack"] for r in pk if int(r["length"]) == L})
        print(f"- L={L}: " + ", ".join(
            f"{h} {sum(v for k, v in full.items() if k[0] == h and int(k[1]) == L)}/"
            f"{sum(1 for k in full if k[0] == h and int(k[1]) == L)}" for h in cells))
    cols = [(m, b, q) for m in MODES for b in BUDGETS for q in ("agnostic", "aware")]
    head = "| " + " | ".join(f"{m} {int(b * 100)}% {q[:2]}" for m, b, q in cols) + " |"

    def table(title, groups):
        print(f"\n### {title}: accuracy (retained = among prompts the full cache gets)")
        print("| cell | n | full | " + head[2:])
        print("|---" * (3 + len(cols)) + "|")
        for name, sel in groups:
            keys = {pid(r) for r in sel if r["mode"] != "off"}
            if not keys:
                continue
            fa_ = acc([r for r in sel if r["mode"] == "off" and pid(r) in keys])
            out = []
            for m, b, q in cols:
                rr = [r for r in sel if r["mode"] == m and float(r["budget"]) == b and r["question"] == q]
                ok = [r for r in rr if full.get(pid(r))]
                out.append(f"{acc(rr):.2f} ({acc(ok):.2f})")
            print(f"| {name} | {len(keys)} | {fa_:.2f} | " + " | ".join(out) + " |")

    table("Passkey by length (haystacks pooled)", [(f"L={L}", [r for r in pk if int(r["length"]) == L])
                                                   for L in lengths])
    table("Passkey by haystack (lengths pooled)", [(h, [r for r in pk if r["haystack"] == h])
                                                   for h in ("filler", "natural", "multikey")])
    print("\n### Perplexity")
    print("| ctx | method | ppl | delta % | top-1 agree | KV ratio | bits/value |")
    print("|---|---|---|---|---|---|---|")
    for r in pp:
        name = r["method"] + (f" b={r['budget']}" if r["budget"] else "") + (f" low={r['low']}" if r["low"] else "")
        print(f"| {r['ctx']} | {name} | {float(r['ppl']):.3f} | {float(r['delta_pct']):+.2f} | "
              f"{float(r['top1_agree']):.3f} | {r['bytes_ratio'] or '1'} | {r['bits_per_value'] or '4.5'} |")
    if ab:
        print("\n### Ablation at ~equal KV bytes: passkey (correct/prompts), KV ratio, bits/value")
        ids = {pid(r) for r in ab}
        fr = [r for r in pk if r["mode"] == "off" and pid(r) in ids]
        print(f"full cache on these prompts: {sum(int(r['correct']) for r in fr)}/{len(fr)}")
        print("| method | budget (low) | agnostic | aware | KV ratio | bits/value | PPL delta % (ctx 4096) |")
        print("|---|---|---|---|---|---|---|")
        for m in dict.fromkeys(r["method"] for r in ab):
            rr = [r for r in ab if r["method"] == m]
            ag = [r for r in rr if r["question"] == "agnostic"]
            aw = [r for r in rr if r["question"] == "aware"]
            ratio = sum(float(r["bytes_ratio"]) for r in ag) / len(ag)
            bpv = sum(float(r["bits_per_value"]) for r in ag) / len(ag)
            budgets = sorted({(r["budget"], r["low"]) for r in rr})
            # (the ppl step names its SnapKV rows the same way: take the ablation's budget, not 0.5/0.25/0.1)
            p = [r for r in pp if r["method"] == m and not (r["budget"] and float(r["budget"]) in BUDGETS)]
            print(f"| {m} | {', '.join(f'{b}' + (f' ({l})' if l else '') for b, l in budgets)} | "
                  f"{sum(int(r['correct']) for r in ag)}/{len(ag)} | "
                  + (f"{sum(int(r['correct']) for r in aw)}/{len(aw)}" if aw else "-") +
                  f" | {ratio:.3f} | {bpv:.2f} | "
                  + (f"{float(p[0]['delta_pct']):+.2f} (ratio {float(p[0]['bytes_ratio']):.3f}, top-1 "
                     f"{float(p[0]['top1_agree']):.3f})" if p else "-") + " |")

    # Figure.
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8))
    ax = axes[0]
    styles = {("demote", "agnostic"): ("tab:blue", "-"), ("demote", "aware"): ("tab:blue", "--"),
              ("drop", "agnostic"): ("tab:red", "-"), ("drop", "aware"): ("tab:red", "--")}
    keys_all = comp_cells
    fa = acc([r for r in pk if r["mode"] == "off" and (r["haystack"], r["length"], r["depth"], r["seed"]) in keys_all])
    for (m, q), (c, ls) in styles.items():
        xs, ys = [], []
        for b in sorted(BUDGETS):
            rr = [r for r in pk if r["mode"] == m and r["question"] == q and float(r["budget"]) == b]
            if rr:
                xs.append(b)
                ys.append(acc(rr))
        if xs:
            ax.plot(xs + [1.0], ys + [fa], color=c, ls=ls, marker="o", label=f"{m}, question-{q}")
    ax.set_xlabel("budget (share of prompt kept at 4 bits)")
    ax.set_ylabel("passkey accuracy")
    comp_lengths = sorted({int(k[1]) for k in comp_cells})
    ax.set_title(f"Passkey, lengths {', '.join(str(L) for L in comp_lengths)}, all haystacks (n={len(comp_cells)})",
                 fontsize=10)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xscale("log")
    ax.set_xticks([0.1, 0.25, 0.5, 1.0])
    ax.set_xticklabels(["0.1", "0.25", "0.5", "full"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1]
    for ctx in sorted({r["ctx"] for r in pp}, key=int):
        for m, c in (("demote", "tab:blue"), ("drop", "tab:red")):
            rr = sorted([r for r in pp if r["ctx"] == ctx and r["method"] == f"snapkv-{m}"],
                        key=lambda r: float(r["bytes_ratio"]))
            if rr:
                ax.plot([float(r["bytes_ratio"]) for r in rr], [float(r["delta_pct"]) for r in rr], color=c,
                        marker="o", ls="-" if ctx == "4096" else ":", label=f"SnapKV {m} (ctx {ctx})")
                for r in rr:
                    ax.annotate(r["budget"], (float(r["bytes_ratio"]), float(r["delta_pct"])), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        markers = MARKERS
        for meth, mk in markers.items():
            rr = [r for r in pp if r["ctx"] == ctx and r["method"] == meth
                  and not (r["budget"] and float(r["budget"]) in BUDGETS)]   # not the ppl step's own
            for r in rr:
                ax.scatter(float(r["bytes_ratio"]), float(r["delta_pct"]), marker=mk, s=50, color="k",
                           label=f"{meth} (ablation)")
    ax.set_xlabel("KV bytes after / full 4-bit cache")
    ax.set_ylabel("PPL change vs full cache (%)")
    ax.set_title("Perplexity of the second half (held-out text)")
    ax.grid(alpha=0.3)
    h, l = ax.get_legend_handles_labels()
    u = dict(zip(l, h))
    ax.legend(u.values(), u.keys(), fontsize=7)

    ax = axes[2]
    for (m, q), (c, ls) in styles.items():
        pts = []
        for b in sorted(BUDGETS):
            rr = [r for r in pk if r["mode"] == m and r["question"] == q and float(r["budget"]) == b]
            if rr:
                pts.append((sum(float(r["bits_per_value"]) for r in rr) / len(rr), acc(rr)))
        if pts:
            ax.plot(*zip(*pts), color=c, ls=ls, marker="o", label=f"SnapKV {m}, {q}")
    markers = MARKERS
    for meth, mk in markers.items():
        for q, fc in (("agnostic", "k"), ("aware", "none")):
            rr = [r for r in ab if r["method"] == meth and r["question"] == q]
            if rr:
                style = {"c": "k" if q == "agnostic" else "gray"} if mk == "x" else {"facecolors": fc,
                                                                                      "edgecolors": "k"}
                ax.scatter(sum(float(r["bits_per_value"]) for r in rr) / len(rr), acc(rr), marker=mk, s=60,
                           zorder=3, label=f"{meth} (ablation, {q})", **style)
    ax.axhline(fa, color="gray", ls=":", label="full 4-bit cache (4.5 bits/value)")
    ax.set_xlabel("bits per value (KV bytes * 8 / positions / values)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title("Passkey vs bits per value (ablation: 1k/2k, filler+natural)", fontsize=10)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("ebb context compression, SmolLM2-135M Q4_1, 4-bit KV cache", fontsize=11)
    fig.tight_layout()
    out = os.path.join(ROOT, "docs", "context_compression.png")
    fig.savefig(out, dpi=110)
    log(f"wrote {out}")


# ------------------------------------------------------------------ main


# ------------------------------------------------------------------ RULER-style tasks

RULER_FIELDS = ["binary", "task", "length", "seed", "question", "mode", "budget", "select", "keys", "n_prompt",
                "score", "want", "output", "kept", "demoted", "dropped", "positions", "bytes_before", "bytes_after",
                "bytes_ratio", "bits_per_value", "wall_s", "rc"]
RULER_KEY = ["binary", "task", "length", "seed", "question", "mode", "budget", "select", "keys"]
RULER_RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)    # share of the prompt compressed away (kept budget = 1 - ratio)
RULER_LENGTHS = (1000, 2000)
RULER_SEEDS = (0, 1, 2)
WORDS = ("apple", "river", "candle", "pencil", "garden", "window", "silver", "basket", "thunder", "meadow", "lantern",
         "pillow", "harbor", "violin", "marble", "feather", "blanket", "orchard", "compass", "saddle", "kettle",
         "ladder", "mirror", "puzzle", "rocket", "tunnel", "walnut", "wizard", "yogurt", "zipper")


def ruler_vt(rng, n_chars):
    """Variable tracking: one value passed along a chain of 4 variables, hidden in filler with decoy
    chains; the answer is every variable of the chain."""
    def name():
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
    value = rng.randrange(10000, 100000)
    chain = [name() for _ in range(4)]
    lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, 4)]
    decoy = [name() for _ in range(4)]
    dv = rng.randrange(10000, 100000)
    lines += [f"VAR {decoy[0]} = {dv}."] + [f"VAR {decoy[i]} = VAR {decoy[i - 1]}." for i in range(1, 4)]
    n_fill = max(8, n_chars // len(FILLER))
    slots = sorted(rng.sample(range(n_fill), len(lines)))
    order = lines[:4]
    order2 = lines[4:]
    merged, i, j = [], 0, 0
    for k in range(len(lines)):   # keep each chain in order, interleave the two
        if j >= len(order2) or (i < len(order) and rng.random() < 0.5):
            merged.append(order[i]); i += 1
        else:
            merged.append(order2[j]); j += 1
    text, at = [], 0
    for k in range(n_fill):
        if at < len(slots) and slots[at] == k:
            text.append(merged[at]); at += 1
        text.append(FILLER)
    context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n" +
               " ".join(text))
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} "
                "variables are assigned the value " + str(value) + ", they are:")
    return context, question, chain


def ruler_cwe(rng, n_chars):
    """Common words: a numbered list in which 10 words are ten times as frequent as the other 20
    (the list cut to the length wanted); the answer is the 10."""
    words = list(WORDS)
    rng.shuffle(words)
    common, rare = words[:10], words[10:]
    bag = []
    while len(bag) * 10 < n_chars:   # ~10 characters an item
        part = [w for w in common for _ in range(30)] + [w for w in rare for _ in range(3)]
        rng.shuffle(part)
        bag += part
    items, size = [], 0
    for i, w in enumerate(bag):
        item = f"{i + 1}. {w}"
        if size + len(item) + 1 > n_chars:
            break
        items.append(item)
        size += len(item) + 1
    context = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.\n" + " ".join(items))
    question = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words "
                "that appear most often in the list are:")
    return context, question, common


def ruler_prompt(ebb, task, length, seed):
    """(context, question, answers, tokens) of about `length` tokens, sized by measuring."""
    make = ruler_vt if task == "vt" else ruler_cwe
    n_chars = length * 4
    for _ in range(12):
        context, question, want = make(random.Random(f"{task}-{length}-{seed}"), n_chars)
        n = ebb.tokens(context + question)
        if abs(n - length) <= 0.05 * length:
            break
        n_chars = int(n_chars * length / max(n, 1))
    return context, question, want, n


def cmd_ruler(args, ebb):
    table = Table(os.path.join(args.out, "context_ruler.csv"), RULER_FIELDS, RULER_KEY)
    t0 = time.time()
    for length in RULER_LENGTHS:
        for seed in RULER_SEEDS:
            for task in ("vt", "cwe"):
                context, question, want, n_all = ruler_prompt(ebb, task, length, seed)
                for ratio in RULER_RATIOS:
                    for mode in (("off",) if ratio == 0 else MODES):
                        for q in (("full",) if ratio == 0 else ("agnostic", "aware")):
                            row = {"binary": ebb.binary, "task": task, "length": length, "seed": seed, "question": q,
                                   "mode": mode, "budget": "" if mode == "off" else round(1 - ratio, 2),
                                   "select": "" if mode == "off" else "snapkv", "keys": 4 if mode == "demote" else ""}
                            if table.has(row) or ebb.dry:
                                continue
                            argv = ["generate", "-m", ebb.model, "-n", "40", "--temp", "0", "--kv-bits", "4"]
                            argv += ["-p", context, "--then", question] if q == "agnostic" else ["-p", context + question]
                            argv += compress_args(mode, 1 - ratio) if mode != "off" else ["--compress", "off"]
                            rc, out, err, wall = ebb.run(argv)
                            got = sum(w.lower() in out.lower() for w in want)
                            row.update(n_prompt=n_all, score=round(got / len(want), 3), want=" ".join(want),
                                       output=out.strip().replace("\n", "\\n")[:120], rc=rc, wall_s=round(wall, 2))
                            row.update(parse_compressed(err, ebb.vpp))
                            table.add(row)
                            log(f"[ruler] {task} L={length} s={seed} {q} {mode} ratio={ratio}: score {row['score']} "
                                f"({wall:.1f} s, {time.time() - t0:.0f} s in)")
    rows = table.get(binary=ebb.binary)
    for task in ("vt", "cwe"):
        for length in RULER_LENGTHS:
            full = [float(r["score"]) for r in rows if r["task"] == task and r["length"] == str(length)
                    and r["mode"] == "off"]
            print(f"{task} L={length}: whole cache {sum(full) / max(1, len(full)):.2f} (n={len(full)})")
            for mode in MODES:
                for q in ("agnostic", "aware"):
                    cells = []
                    for ratio in RULER_RATIOS[1:]:
                        sc = [float(r["score"]) for r in rows if r["task"] == task and r["length"] == str(length)
                              and r["mode"] == mode and r["question"] == q and r["budget"] == str(round(1 - ratio, 2))]
                        cells.append(f"{sum(sc) / max(1, len(sc)):.2f}")
                    print(f"  {mode:6s} {q:8s} at {', '.join(str(int(x * 100)) for x in RULER_RATIOS[1:])}% "
                          f"compressed: {' '.join(cells)}")


# ------------------------------------------------------------------ main

# ------------------------------------------------------------------ prompt side (issue 14's optional stage)

PS_FIELDS = ["binary", "task", "haystack", "length", "depth", "seed", "window", "unit", "budget", "key", "n_context",
             "n_kept", "correct", "output", "ppl", "full_ppl", "delta_pct", "top1_agree", "wall_s"]
PS_KEY = ["binary", "task", "haystack", "length", "depth", "seed", "window", "unit", "budget"]
PS_SINKS, PS_RECENT = 4, 64   # kept whatever their score, as the KV stage keeps its sinks and window


class PromptSide:
    """Prompt-side compression measured outside the engine: score every context token by its
    surprisal under the served model (one pass, `ebb logits --all`), keep a share of the context,
    and prefill only that (token ids, `ebb generate --ids-file`), then the question. Units: `token`
    (the most surprising tokens, as LLMLingua's token stage), `sentence` (whole sentences by mean
    surprisal, its coarse stage) and `recent` (the sinks and the last tokens: the baseline)."""

    def __init__(self, ebb, work):
        import numpy as np
        import gguf
        self.np, self.ebb, self.work = np, ebb, work
        os.makedirs(work, exist_ok=True)
        f = gguf.GGUFReader(ebb.model).fields["tokenizer.ggml.tokens"]
        self.vocab = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]

    def ids(self, text):
        out = subprocess.run([self.ebb.bin, "tokenize", "-m", self.ebb.model, "--", text], capture_output=True,
                             text=True, check=True).stdout
        return [int(x) for x in out.split()]

    def _ids_file(self, ids):
        path = os.path.join(self.work, "ids.txt")
        with open(path, "w") as f:
            f.write(" ".join(map(str, ids)))
        return path

    def logits(self, ids):
        out = os.path.join(self.work, "logits.f32")
        subprocess.run([self.ebb.bin, "logits", "-m", self.ebb.model, "--ids-file", self._ids_file(ids), "-o", out,
                        "--all", "-t", "1"], check=True, capture_output=True)
        lg = self.np.fromfile(out, dtype=self.np.float32).reshape(len(ids), -1)
        os.unlink(out)
        return lg

    def nll(self, lg, rows, targets):
        """Negative log-likelihood of targets at logits rows, and each row's argmax."""
        np = self.np
        x = lg[rows]
        mx = x.max(1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(x - mx).sum(1))
        return lse - x[np.arange(len(rows)), targets], x.argmax(1)

    def surprisal(self, ids, lg=None):
        np = self.np
        lg = self.logits(ids) if lg is None else lg
        s = np.full(len(ids), np.inf)   # nothing predicts the first token: always kept
        s[1:], _ = self.nll(lg, np.arange(len(ids) - 1), np.array(ids[1:]))
        return s

    def sentences(self, ids):
        """Token spans ending at a token that ends a sentence or a line."""
        spans, start = [], 0
        for i, t in enumerate(ids):
            piece = self.vocab[t]
            if piece.endswith((".", "!", "?", ":", ";")) or "\u010a" in piece:   # U+010A: a newline byte
                spans.append((start, i + 1))
                start = i + 1
        if start < len(ids):
            spans.append((start, len(ids)))
        return spans

    def keep(self, ids, s, unit, budget):
        np, n = self.np, len(ids)
        k = max(int(round(budget * n)), PS_SINKS + PS_RECENT)
        fixed = set(range(PS_SINKS)) | set(range(n - PS_RECENT, n))
        if unit == "recent":
            return sorted(set(range(PS_SINKS)) | set(range(n - (k - PS_SINKS), n)))
        if unit == "token":
            score = np.where(np.isfinite(s), s, 1e30)
            score[list(fixed)] = 1e30
            return sorted(np.argsort(-score, kind="stable")[:k].tolist())
        kept = set(fixed)
        spans = self.sentences(ids)
        def mean(a, b):
            v = s[a:b][np.isfinite(s[a:b])]
            return float(v.mean()) if len(v) else 0.0
        for a, b in sorted(spans, key=lambda ab: -mean(*ab)):   # whole sentences while they fit
            add = set(range(a, b)) - kept
            if len(kept) + len(add) <= k:
                kept |= add
        return sorted(kept)

    def generate(self, ids):
        p = subprocess.run([self.ebb.bin, "generate", "-m", self.ebb.model, "--ids-file", self._ids_file(ids), "-n",
                            "8", "--temp", "0", "--kv-bits", "4", "-t", "1"], capture_output=True, text=True,
                           errors="replace")
        return p.stdout.strip()


PS_UNITS = ("recent", "token", "sentence")


def cmd_promptside(args, ebb):
    """Passkey (question-agnostic: the question is never scored) and perplexity (each window's
    context compressed on the prompt side, its last SCORE predictions scored) with prompt-side
    compression; docs/data/context_promptside.csv."""
    ps = PromptSide(ebb, args.work)
    np = ps.np
    prompts = Prompts(ebb, args.heldout)
    table = Table(os.path.join(args.out, "context_promptside.csv"), PS_FIELDS, PS_KEY)
    items = [it for it in grid_prompts(PASSKEY_GRID) if it[4] and it[0] in (args.lengths or (1000, 2000))]
    for length, hay, depth, seed, _ in items:
        base = {"binary": ebb.binary, "task": "passkey", "haystack": hay, "length": length, "depth": depth,
                "seed": seed, "window": ""}
        todo = [(u, b) for u in ("full",) + PS_UNITS for b in ((1.0,) if u == "full" else BUDGETS)
                if not table.has({**base, "unit": u, "budget": b})]
        if not todo:
            continue
        context, question, key, _, _ = prompts.build(hay, length, depth, seed)
        cids, qids = ps.ids(context), ps.ids(question)
        s = ps.surprisal(cids)
        for unit, budget in todo:
            t0 = time.time()
            kept = list(range(len(cids))) if unit == "full" else ps.keep(cids, s, unit, budget)
            out = ps.generate([cids[i] for i in kept] + qids)
            row = {**base, "unit": unit, "budget": budget, "key": key, "n_context": len(cids), "n_kept": len(kept),
                   "correct": int(str(key) in out), "output": out.replace("\n", "\\n")[:60],
                   "wall_s": round(time.time() - t0, 2)}
            table.add(row)
            log(f"{hay} L={length} d={depth} s={seed} {unit} {budget}: {'ok ' if row['correct'] else 'MISS'} "
                f"{row['output']!r} kept {len(kept)}/{len(cids)}")
    with open(args.heldout, encoding="utf-8") as f:
        text = f.read()
    for n_ctx, chunks, n_score in (c + (2048,) if len(c) == 2 else c for c in args.ctx):
        toks = ps.ids(text[:int(n_ctx * chunks * 4.5)])   # under the argument limit; ebb ppl's windows
        for w in range(chunks):
            base = {"binary": ebb.binary, "task": "ppl", "haystack": "heldout", "length": n_ctx, "depth": n_score,
                    "seed": "", "window": w}
            todo = [(u, b) for u in PS_UNITS for b in BUDGETS if not table.has({**base, "unit": u, "budget": b})]
            if not todo:
                continue
            win = toks[w * n_ctx:(w + 1) * n_ctx]
            ctx, scored = win[:n_ctx - n_score], np.array(win[n_ctx - n_score:])
            lg = ps.logits(win)
            full_nll, full_top = ps.nll(lg, np.arange(len(ctx) - 1, n_ctx - 1), scored)
            s = ps.surprisal(ctx, lg[:len(ctx)])
            del lg
            for unit, budget in todo:
                t0 = time.time()
                kept = ps.keep(ctx, s, unit, budget)
                lg = ps.logits([ctx[i] for i in kept] + scored.tolist())
                nll, top = ps.nll(lg, np.arange(len(kept) - 1, len(kept) - 1 + n_score), scored)
                del lg
                p, pf = float(np.exp(nll.mean())), float(np.exp(full_nll.mean()))
                row = {**base, "unit": unit, "budget": budget, "n_context": len(ctx), "n_kept": len(kept),
                       "ppl": round(p, 4), "full_ppl": round(pf, 4), "delta_pct": round(100 * (p / pf - 1), 3),
                       "top1_agree": round(float((top == full_top).mean()), 4), "wall_s": round(time.time() - t0, 2),
                       "output": f"nll_sum={float(nll.sum()):.4f} full_nll_sum={float(full_nll.sum()):.4f}"}
                table.add(row)
                log(f"ppl window {w} {unit} {budget}: {p:.3f} against {pf:.3f} ({row['delta_pct']:+.2f}%)")
    # The tables: passkey on the prompts the whole context answered; perplexity over all windows.
    rows = table.get(binary=ebb.binary, task="passkey")
    good = {(r["haystack"], r["length"], r["depth"], r["seed"]) for r in rows
            if r["unit"] == "full" and r["correct"] == "1"}
    print("| haystack, length | whole context | " + " | ".join(f"{u} {b}" for u in PS_UNITS for b in BUDGETS) + " |")
    for hay, length in sorted({(r["haystack"], r["length"]) for r in rows}, key=lambda x: (int(x[1]), x[0])):
        sel = [r for r in rows if r["haystack"] == hay and r["length"] == length]
        full = [r for r in sel if r["unit"] == "full"]
        cells = [f"{sum(r['correct'] == '1' for r in full)}/{len(full)}"]
        for u in PS_UNITS:
            for b in BUDGETS:
                got = [r for r in sel if r["unit"] == u and float(r["budget"]) == b
                       and (r["haystack"], r["length"], r["depth"], r["seed"]) in good]
                cells.append(f"{sum(r['correct'] == '1' for r in got)}/{len(got)}")
        print(f"| {hay} {length} | " + " | ".join(cells) + " |")
    prow = table.get(binary=ebb.binary, task="ppl")
    for u in PS_UNITS:
        for b in BUDGETS:
            sel = [r for r in prow if r["unit"] == u and float(r["budget"]) == b]
            if not sel:
                continue
            nll = sum(float(r["output"].split()[0].split("=")[1]) for r in sel)
            fnll = sum(float(r["output"].split()[1].split("=")[1]) for r in sel)
            n = sum(int(r["depth"]) for r in sel)
            p, pf = math.exp(nll / n), math.exp(fnll / n)
            top = sum(float(r["top1_agree"]) for r in sel) / len(sel)
            print(f"| ppl {sel[0]['length']}:{len(sel)}:{sel[0]['depth']} | {u} {b} | {p:.3f} | {100 * (p / pf - 1):+.2f}% "
                  f"| {top:.3f} | whole context {pf:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["passkey", "ppl", "ablate", "ruler", "plot", "promptside"])
    ap.add_argument("--ebb", default=DEFAULT_EBB)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--heldout", default=DEFAULT_HELDOUT)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "data"))
    ap.add_argument("--work", default="/tmp/ebb_context_eval", help="top-1 files of the ppl runs")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="only these grid lengths (passkey, ablate)")
    ap.add_argument("--ctx", type=lambda s: [tuple(int(y) for y in x.split(":")) for x in s.split(",")],
                    default=[(4096, 2)], help="ppl windows CTX:CHUNKS[:SCORE],... (default 4096:2; SCORE: the last "
                    "SCORE predictions of each window are scored, the rest is the context compressed; the held-out "
                    "text holds 16 windows of 8192, and its first 2 are the hardest for a compressed cache: "
                    "8192:16:2048 measures the issue's goal, 4096:2 compares with the recorded rows)")
    ap.add_argument("--min-full", type=float, default=0.9)
    ap.add_argument("--select", default="snapkv", choices=["snapkv", "snapkv_head", "reconstruct"],
                    help="passkey: the compressed runs' scoring (reconstruct: question-agnostic, ~0.4x a prefill more)")
    ap.add_argument("--target", type=float, default=0.25, help="ablate: KV bytes ratio")
    ap.add_argument("--values-per-pos", type=int, default=30 * 2 * 3 * 64)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--avoid-short-pass", action="store_true",
                    help="size prompts so the compression point is not 1..31 past a multiple of 256 (binaries "
                         "before b0d805a crash there)")
    args = ap.parse_args()
    ebb = Ebb(args)
    {"passkey": cmd_passkey, "ppl": cmd_ppl, "ablate": cmd_ablate, "ruler": cmd_ruler,
     "plot": cmd_plot, "promptside": cmd_promptside}[args.command](args, ebb)


if __name__ == "__main__":
    main()
