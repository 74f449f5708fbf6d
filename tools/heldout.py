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

import os

from packaged_text import CACHE, PackagedText

PACKAGE = "jargon-text"
SOURCE = "/usr/share/doc/jargon-text/jargon.txt.gz"
SOURCE_SHA256 = "40dfb4b98191a670a09a183d5798d50f243d23fdbd1495dcc0aca2ce5895ba97"  # decompressed
LICENCE = "public domain (The Jargon File 4.4.7, see /usr/share/doc/jargon-text/copyright)"
FIRST_ENTRY = ":(TM):"
TARGET_CHARS = 500_000
OUTPUT_SHA256 = "4c7dde64011ace9e90082c21ec169ed5e6a690094821e3aa53b9a23602ae8e95"

DEFAULT_OUT = os.path.join(CACHE, "heldout.txt")


def clean(text):
    """The Lexicon, de-indented, cut at an entry boundary after TARGET_CHARS characters."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(FIRST_ENTRY)]
    if not starts:
        TEXT.die(f"cannot find the first Lexicon entry {FIRST_ENTRY!r}")
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


TEXT = PackagedText(name="heldout", package=PACKAGE, source=SOURCE, source_sha256=SOURCE_SHA256, licence=LICENCE,
                    output_sha256=OUTPUT_SHA256, clean=clean, changes="every perplexity number")

def ensure(out_path=DEFAULT_OUT):
    """Write the text (if not already identical); return (path, source, size, sha256)."""
    return TEXT.ensure(out_path)


if __name__ == "__main__":
    TEXT.main("write ebb's held-out perplexity text and print its path", DEFAULT_OUT)
