"""A text taken from a file a Debian package installs: the plumbing the held-out text
(tools/heldout.py) and the calibration text (tools/calibration.py) share.

Each of those scripts says which package file it takes, how it cleans it and why; this module
finds the file (installed, or fetched with `apt-get download` and unpacked with dpkg-deb into the
cache when an image dropped it), checks the source's and the output's pinned sha256 so a
different file stops with an error instead of silently changing every number, writes the output
atomically (only when it changed), and runs the scripts' shared command line.
"""

import argparse
import glob
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional

CACHE = os.environ.get("EBB_CACHE", os.path.expanduser("~/.cache/ebb"))


@dataclass
class PackagedText:
    name: str                   # script name, for messages
    package: str                # Debian package
    source: str                 # gzip file it installs
    source_sha256: str          # of the decompressed source
    licence: str
    output_sha256: Optional[str]
    clean: Callable[[str], str]
    changes: str                # what a different source would change ("every perplexity number")
    provenance: Optional[str] = None   # written to OUT.source when given

    def die(self, msg):
        print(f"{self.name}: {msg}", file=sys.stderr)
        sys.exit(1)

    def fetch_deb_into_cache(self):
        """A path to the source extracted from the package's .deb into the cache."""
        dest = os.path.join(CACHE, "debs", self.package)
        extracted = dest + self.source
        if os.path.exists(extracted):
            return extracted
        os.makedirs(dest, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(["apt-get", "download", self.package], cwd=tmp, capture_output=True, text=True)
            debs = glob.glob(os.path.join(tmp, self.package + "_*.deb"))
            if r.returncode != 0 or not debs:
                self.die(f"{self.source} is missing and 'apt-get download {self.package}' failed: "
                         f"{r.stderr.strip()}\ninstall it with: apt-get install {self.package}")
            r = subprocess.run(["dpkg-deb", "-x", debs[0], dest], capture_output=True, text=True)
            if r.returncode != 0:
                self.die(f"dpkg-deb -x {debs[0]} failed: {r.stderr.strip()}")
        if not os.path.exists(extracted):
            self.die(f"{debs[0]} does not contain {self.source}")
        return extracted

    def read_source(self):
        path = self.source if os.path.exists(self.source) else self.fetch_deb_into_cache()
        with gzip.open(path, "rb") as f:
            raw = f.read()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != self.source_sha256:
            self.die(f"{path}: sha256 {digest} differs from the pinned {self.source_sha256}; "
                     f"a different file would change {self.changes}")
        return path, raw.decode("utf-8")

    def ensure(self, out_path):
        """Writes the cleaned text (and the provenance line, if any); returns (path, source, size, sha256)."""
        src, text = self.read_source()
        body = self.clean(text).encode("utf-8")
        digest = hashlib.sha256(body).hexdigest()
        if self.output_sha256 is not None and digest != self.output_sha256:
            self.die(f"cleaned text sha256 {digest} differs from the pinned {self.output_sha256}")
        files = [(out_path, body)]
        if self.provenance is not None:
            files.append((out_path + ".source", (self.provenance + "\n").encode("utf-8")))
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        for path, data in files:
            try:
                with open(path, "rb") as f:
                    if f.read() == data:
                        continue
            except FileNotFoundError:
                pass
            tmp = path + ".part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return out_path, src, len(body), digest

    def main(self, description, default_out):
        ap = argparse.ArgumentParser(description=description)
        ap.add_argument("-o", "--output", default=default_out)
        ap.add_argument("--info", action="store_true", help="print provenance to stderr")
        args = ap.parse_args()
        path, src, size, digest = self.ensure(args.output)
        if args.info:
            print(f"source: {src} (Debian package {self.package}); licence: {self.licence}\n"
                  f"text: {path}, {size} bytes, sha256 {digest}", file=sys.stderr)
        print(path)
