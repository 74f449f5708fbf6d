#!/usr/bin/env python3
"""The daemon's memory at the peak of a few concurrent streams: what weights and KV account
for, and what they do not (scratch, allocator, buffers).

    tools/stream_peak.py MODEL.gguf [--ebb build/ebb] [--streams 4] [--max-tokens 200]

Starts one `ebb serve --kv-bits 4` on MODEL.gguf (its own catalog in a temporary
directory), warms it with one short request, then runs --streams streamed greedy requests
at once, each a ~300-token prompt of its own, while sampling the daemon's RSS every 50 ms.
At each new peak it reads GET /admin/memory's resident bytes (weights, KV and
`scratch_and_other`: RSS less both) and the largest mappings in /proc/PID/smaps. Prints
the peak, its breakdown and those mappings, and the RSS a second after the streams end.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from daemon import Server  # noqa: E402
from governor_cycle import PROMPT, rss, timed_stream  # noqa: E402

TOKEN = "stream-peak"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def largest_mappings(pid, n=6):
    """(resident MiB, name) of the n largest mappings."""
    out, name = [], ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                name = parts[5] if len(parts) > 5 else "[anonymous]"
            elif line.startswith("Rss:"):
                out.append((int(parts[1]) / 1024, name))
    return sorted(out, reverse=True)[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--ebb", default=str(pathlib.Path(__file__).resolve().parent.parent / "build" / "ebb"))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = Server(a.ebb, "--default-model", "m", "--verify-models", "stat", "--kv-bits", "4",
                   catalog=os.path.join(tmp, "catalog.db"), model_path=os.path.abspath(a.model), token=TOKEN,
                   start_timeout=300)
        try:
            s.wait_ready(600)
            timed_stream(s, "Hello", 4)
            print(f"idle RSS {rss(s.proc.pid) / 1e6:.1f} MB")
            peak = {"rss": 0}
            done = threading.Event()

            def sample():
                while not done.is_set():
                    now = rss(s.proc.pid)
                    if now > peak["rss"]:
                        peak["rss"], peak["maps"] = now, largest_mappings(s.proc.pid)
                        try:
                            peak["resident"] = requests.get(s.url("/admin/memory"), headers=AUTH,
                                                            timeout=5).json()["resident"]
                        except requests.RequestException:
                            pass
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            streams = [threading.Thread(target=timed_stream, args=(s, f"{PROMPT} ({i})", a.max_tokens))
                       for i in range(a.streams)]
            for t in streams:
                t.start()
            for t in streams:
                t.join()
            done.set()
            sampler.join()
            res = peak.get("resident", {})
            print(f"peak RSS {peak['rss'] / 1e6:.1f} MB: weights {res.get('weights', 0) / 1e6:.1f}, "
                  f"KV {res.get('kv', 0) / 1e6:.1f}, outside both {res.get('scratch_and_other', 0) / 1e6:.1f}")
            for mib, name in peak.get("maps", []):
                print(f"  {mib:8.1f} MiB  {name}")
            time.sleep(1)
            print(f"RSS a second later {rss(s.proc.pid) / 1e6:.1f} MB")
        finally:
            s.stop()


if __name__ == "__main__":
    main()
