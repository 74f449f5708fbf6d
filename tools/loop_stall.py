#!/usr/bin/env python3
"""How long the daemon's event loop stalls while it takes one big prompt.

Starts `ebb serve` (BINARY, a private catalog, the default model, a body limit that
takes the prompt), sends one completion whose prompt is SIZE bytes of a repeated unit
(default: one single-letter word, the worst case for the tokenizer), and meanwhile
probes GET /health on another keep-alive connection every 20 ms. Prints the request's
time and the probes' count, median and maximum latency: the maximum is how long the
loop was unavailable.

    tools/loop_stall.py build/ebb [--size BYTES] [--unit TEXT] [--model PATH]
"""
import argparse
import pathlib
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from daemon import ROOT, Server  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--size", type=int, default=8 << 20, help="prompt bytes (default 8 MiB)")
    ap.add_argument("--unit", default="a", help="text repeated to make the prompt (default 'a')")
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    prompt = (args.unit * (args.size // len(args.unit) + 1))[: args.size]
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(args.binary, "--max-body-bytes", str(args.size + (1 << 20)), catalog=f"{tmp}/c.db",
                     model_path=args.model, start_timeout=300)
        try:
            srv.wait_ready(300)
            result = {}

            def big():
                t0 = time.monotonic()
                r = requests.post(srv.url("/v1/completions"), json={"prompt": prompt, "max_tokens": 1}, timeout=600)
                result["seconds"], result["status"] = time.monotonic() - t0, r.status_code

            th = threading.Thread(target=big)
            th.start()
            lat = []
            with requests.Session() as health:
                while th.is_alive():
                    t0 = time.monotonic()
                    health.get(srv.url("/health"), timeout=600)
                    lat.append(time.monotonic() - t0)
                    time.sleep(0.02)
            th.join()
            lat.sort()
            print(f"{args.binary}: {args.size} bytes of {args.unit!r}: request {result['seconds']:.2f} s "
                  f"(status {result['status']}); /health probes {len(lat)}, median {lat[len(lat) // 2] * 1e3:.1f} ms, "
                  f"max {lat[-1] * 1e3:.0f} ms")
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
