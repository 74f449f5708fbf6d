#!/usr/bin/env python3
"""The held-out English text that ebb's perplexity numbers are measured on: the one place it is chosen.

Source: The Jargon File, version 4.4.7 (Eric S. Raymond, ed.), as Debian's package `jargon-text`
(4.4.7-4.1 in Debian 12) installs it: /usr/share/doc/jargon-text/jargon.txt.gz. Licence: the
document is in the public domain ("to be freely used, shared, and modified"; see
/usr/share/doc/jargon-text/copyright). It is real English prose written by people, not for our
tests, shipped by a package registry and frozen since 2003, so numbers stay comparable over time.

What we take, and why:
  - Only the Lexicon (the glossary entries, from ":(TM):" on). The front matter (title, table of
    contents, editorial notes) is boilerplate and the appendices hold ASCII-art tables.
  - Entries from the start of the Lexicon until the text reaches TARGET_CHARS characters, cut at an
    entry boundary: 137,859 tokens with SmolLM2's tokenizer. Enough for a stable perplexity
    (269 windows of 512 tokens) while a full llama.cpp or ebb run stays at minutes on 2 cores.
  - Cleaning is mechanical and deterministic: drop the 3-space page indent, strip trailing
    spaces, collapse runs of blank lines to one. Characters are kept as they are (UTF-8 curly
    quotes, the middle dots of pronunciations): it is plain text, not ASCII.
  - The source's sha256 is pinned; a different file stops with an error instead of silently
    changing every perplexity number. The output's sha256 is pinned too.

If the file is missing (package not installed, or an image that drops /usr/share/doc), this
script fetches the .deb with `apt-get download jargon-text` (no root needed) into the cache and
extracts it with dpkg-deb. Setup should simply `apt-get install jargon-text`.

Usage:
    python tools/heldout.py              # ensure ~/.cache/ebb/heldout.txt exists, print its path
    python tools/heldout.py --info       # also print provenance and size to stderr
    python tools/heldout.py -o FILE      # write the text somewhere else
"""

import argparse
import glob
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile

PACKAGE = "jargon-text"
SOURCE = "/usr/share/doc/jargon-text/jargon.txt.gz"
SOURCE_SHA256 = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97"  # decompressed
LICENCE = "public domain (The Jargon File 4.4.7, see /usr/share/doc/jargon-text/copyright)"
FIRST_ENTRY = ":(TM):"
TARGET_CHARS = 500_000
OUTPUT_SHA256 = "4c7dde64011ace9e90082c21ec169ed5e6a690094821e3aa53b9a23602ae8e95"

CACHE = os.environ.get("EBB_CACHE", os.path.expanduser("~/.cache/ebb"))
DEFAULT_OUT = os.path.join(CACHE, "heldout.txt")


def die(msg):
    print(f"heldout: {msg}", file=sys.stderr)
    sys.exit(1)


def fetch_deb_into_cache():
    """Return a path to jargon.txt.gz extracted from the package's .deb into the cache."""
    dest = os.path.join(CACHE, "debs", PACKAGE)
    extracted = dest + SOURCE
    if os.path.exists(extracted):
        return extracted
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp,
                           capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, PACKAGE + "_*.deb"))
        if r.returncode != 0 or not debs:
            die(f"{SOURCE} is missing and 'apt-get download {PACKAGE}' failed: "
                f"{r.stderr.strip()}\ninstall it with: apt-get install {PACKAGE}")
        r = subprocess.run(["dpkg-deb", "-x", debs[0], dest], capture_output=True, text=True)
        if r.returncode != 0:
            die(f"dpkg-deb -x {debs[0]} failed: {r.stderr.strip()}")
    if not os.path.exists(extracted):
        die(f"{debs[0]} does not contain {SOURCE}")
    return extracted


def read_source():
    path = SOURCE if os.path.exists(SOURCE) else fetch_deb_into_cache()
    with gzip.open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        die(f"{path}: sha256 {digest} differs from the pinned {SOURCE_SHA256}; "
            "a different Jargon File would change every perplexity number")
    return path, raw.decode("utf-8")


def clean(text):
    """The Lexicon, de-indented, cut at an entry boundary after TARGET_CHARS characters."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(FIRST_ENTRY)]
    if not starts:
        die(f"cannot find the first Lexicon entry {FIRST_ENTRY!r}")
    out, size, blank = [], 0, False
    for line in lines[starts[0]:]:
        line = line.rstrip()
        if line.startswith("   "):
            line = line[3:]
        if line.startswith(":") and size >= TARGET_CHARS:
            break                                   # the next entry would pass the target
        if not line:
            if blank or not out:
                continue
            blank = True
        else:
            blank = False
        out.append(line)
        size += len(line) + 1
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def ensure(out_path=DEFAULT_OUT):
    """Write the held-out text to out_path (if not already identical) and return the path."""
    src, text = read_source()
    body = clean(text).encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    if OUTPUT_SHA256 is not None and digest != OUTPUT_SHA256:
        die(f"cleaned text sha256 {digest} differs from the pinned {OUTPUT_SHA256}")
    try:
        with open(out_path, "rb") as f:
            if f.read() == body:
                return out_path, src, len(body), digest
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".part"
    with open(tmp, "wb") as f:
        f.write(body)
    os.replace(tmp, out_path)
    return out_path, src, len(body), digest


def main():
    ap = argparse.ArgumentParser(description="write ebb's held-out perplexity text and print its path")
    ap.add_argument("-o", "--output", default=DEFAULT_OUT)
    ap.add_argument("--info", action="store_true", help="print provenance to stderr")
    args = ap.parse_args()
    path, src, size, digest = ensure(args.output)
    if args.info:
        print(f"source: {src} (Debian package {PACKAGE}); licence: {LICENCE}\n"
              f"text: {path}, {size} bytes, sha256 {digest}", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
