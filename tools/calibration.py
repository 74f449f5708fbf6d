#!/usr/bin/env python3
"""The calibration text `ebb pack` learns activation statistics from: the one place it is chosen.

Source: the GNU Coreutils manual for coreutils 9.1, as Debian's package `coreutils` (9.1-1 in
Debian 12) installs it: /usr/share/info/coreutils.info.gz. coreutils is an Essential package, so
the file is on every Debian system. Licence: GNU Free Documentation License 1.3 or later, with no
Invariant Sections, no Front-Cover Texts and no Back-Cover Texts (the manual's own notice, at the
top of the file). It is English prose written by people, not for our tests.

Why this text: calibration must not see the held-out perplexity text (tools/heldout.py: the Jargon
File), or the quality numbers would flatter the packed models. The Coreutils manual is of similar
register (technical English with some examples) and long enough: about 230,000 tokens with
SmolLM2's tokenizer, of which `ebb pack` samples 64 windows of 512 tokens by default.

What we take, and why:
  - The manual's nodes from "Introduction" on. Dropped: the preamble (licence notice, directory
    entries), the "Top" node (a table of contents), the GFDL's own text, the concept index and the
    info tag table: boilerplate or lists, not prose.
  - Inside each node: the "File: ... Node: ..." navigation line and menu entries ("* name::") go;
    the text is otherwise kept as it is (indentation of examples, UTF-8 quotes). Trailing spaces are
    stripped and runs of blank lines collapsed to one.
  - The source's sha256 is pinned, and so is the output's: a different manual stops with an error
    instead of silently changing every packed model.

A one-line provenance file is written next to the text (FILE.source); `ebb pack` copies it into
the packed file's ebb.calibration key.

If the file is missing, this script fetches the .deb with `apt-get download coreutils` (no root
needed) into the cache and extracts it with dpkg-deb.

Usage:
    python3 tools/calibration.py            # ensure ~/.cache/ebb/calibration.txt exists, print its path
    python3 tools/calibration.py --info     # also print provenance and size to stderr
    python3 tools/calibration.py -o FILE    # write the text somewhere else
"""

import os
import re

from packaged_text import CACHE, PackagedText

PACKAGE = "coreutils"
SOURCE = "/usr/share/info/coreutils.info.gz"
SOURCE_SHA256 = "d3ce27482be8d64dcacf6001e74cceedf121258a00d359629c5ddd4f885b284b"  # decompressed
LICENCE = "GFDL-1.3-or-later, no invariant sections (see the notice at the top of coreutils.info)"
SKIP_NODES = {"Top", "GNU Free Documentation License", "Concept index"}
OUTPUT_SHA256 = "50d099f881a7e5554f22994b28a7b9fd9a2a27bb7a0e9d9f9f1a3e4fba3e240c"

DEFAULT_OUT = os.path.join(CACHE, "calibration.txt")
PROVENANCE = (f"GNU Coreutils 9.1 manual ({SOURCE}, Debian package {PACKAGE} 9.1-1), "
              f"licence {LICENCE}; cleaned by tools/calibration.py")

MENU_ENTRY = re.compile(r"^\* [^:]+::|^\* [^:]+: [^.]+\.")


def clean(text):
    """The manual's prose nodes, navigation and menus removed, blank runs collapsed."""
    out, blank = [], False
    for chunk in text.split("\x1f")[1:]:            # [0] is the preamble
        lines = chunk.lstrip("\n").split("\n")
        m = re.match(r"File: [^,]+,\s+Node: ([^,]+)", lines[0])
        if not m or m.group(1) in SKIP_NODES:
            continue                                # tag table, or a node we skip
        for line in lines[1:]:
            line = line.rstrip()
            if line == "* Menu:" or MENU_ENTRY.match(line):
                continue
            if not line:
                if blank or not out:
                    continue
                blank = True
            else:
                blank = False
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


TEXT = PackagedText(name="calibration", package=PACKAGE, source=SOURCE, source_sha256=SOURCE_SHA256,
                    licence=LICENCE, output_sha256=OUTPUT_SHA256, clean=clean, changes="every packed model",
                    provenance=PROVENANCE)

def ensure(out_path=DEFAULT_OUT):
    """Write the text (if not already identical); return (path, source, size, sha256)."""
    return TEXT.ensure(out_path)


if __name__ == "__main__":
    TEXT.main("write ebb's calibration text and print its path", DEFAULT_OUT)
