#!/usr/bin/env python3
"""The memory governor measured on a served BitStack file: resident memory and speed at a
series of budgets, and RSS through a shrink/grow cycle under load.

    tools/governor_cycle.py STACK.gguf [--ebb build/ebb] [--points 8] [--cycle-seconds 20]

Starts one `ebb serve` (its own catalog in a temporary directory) serving STACK.gguf, then

  1. for each of --points budgets from the least the model accepts to the whole stack, and
     no budget: PUT /admin/memory, one warm-up request (the prefix's pages are read), then
     one streamed greedy request with a ~300-token prompt: prefill tokens/s (prompt tokens
     over the time to the first token) and decode tokens/s (tokens after the first over the
     time after it); the daemon's RSS (VmRSS) and GET /admin/memory's numbers afterwards;
  2. a cycle: four streams run while the budget steps down to near the minimum and back up
     every second; RSS is sampled every 50 ms and compared with each step's budget.

Prints markdown tables (docs/benchmarks.md) and, with --csv, writes the cycle's samples.
Speed on a shared machine: take ratios within one run, and say how loaded it was.
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from daemon import Server, stream_events  # noqa: E402

TOKEN = "governor-cycle"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = ("The history of the printing press begins long before Gutenberg. " * 30).strip()


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mapped_rss(pid, suffix=".gguf"):
    """Resident bytes of the process's mappings of model files."""
    total, current = 0, ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                current = parts[5] if len(parts) > 5 else ""
            elif line.startswith("Rss:") and current.endswith(suffix):
                total += int(parts[1]) * 1024
    return total


def memory(s):
    return requests.get(s.url("/admin/memory"), headers=AUTH, timeout=30).json()


def put(s, budget):
    r = requests.put(s.url("/admin/memory"), json={"budget": budget}, headers=AUTH, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"PUT {budget}: {r.status_code} {r.text}")
    return r.json()


def timed_stream(s, prompt, max_tokens):
    """(prompt tokens, generated tokens, seconds to the first token, seconds after it)."""
    t0 = time.monotonic()
    r = requests.post(s.url("/v1/completions"), stream=True, timeout=600, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    r.raise_for_status()
    first = last = None
    usage = None
    for ev in stream_events(r):
        if ev.get("usage"):
            usage = ev["usage"]
        if ev.get("choices"):
            now = time.monotonic()
            first = first or now
            last = now
    return usage["prompt_tokens"], usage["completion_tokens"], first - t0, last - first


def sweep(s, points):
    idle = memory(s)
    (m,) = idle["models"]
    st = m["weights"]["stack"]
    fixed = m["weight_bytes"] - st["resident_bytes"]
    least, most = idle["minimum_bytes"], fixed + st["full_bytes"] + (idle["minimum_bytes"] - fixed - st["min_bytes"])
    # The least budget holds the smallest request; raise it until the measured request's
    # context (prompt and 64 tokens) fits beside one level.
    while True:
        put(s, least)
        r = requests.post(s.url("/v1/completions"), timeout=600,
                          json={"prompt": PROMPT, "max_tokens": 64, "temperature": 0})
        if r.status_code == 200:
            break
        least += (most - least) // 50 + 1
    most += least - idle["minimum_bytes"]
    budgets = [least + (most - least) * i // (points - 1) for i in range(points)] + [0]
    rows = []
    for b in budgets:
        put(s, b)
        timed_stream(s, "Hello", 8)   # warm: the prefix's pages come in
        n_prompt, n_gen, ttft, rest = timed_stream(s, PROMPT, 64)
        state = memory(s)
        (mm,) = state["models"]
        rows.append({"budget": b, "stack_bytes": mm["weights"]["stack"]["resident_bytes"],
                     "depth": mm["weights"]["stack"]["depth"], "bpw": mm["weights"]["stack"]["bits_per_weight"],
                     "weights": mm["weight_bytes"], "rss": rss(s.proc.pid), "mapped": mapped_rss(s.proc.pid),
                     "prefill": n_prompt / ttft, "decode": (n_gen - 1) / rest if n_gen > 1 else 0})
    # bits a weight of the layer matrices as computed: a base's too, when the stack has one
    print("| budget (MB) | stack resident (MB) | depth | bits/weight (base + stack) | weights (MB) | file pages resident (MB) "
          "| RSS (MB) | prefill tok/s | decode tok/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['budget'] / 1e6:.1f} | {r['stack_bytes'] / 1e6:.1f} | {r['depth']:.2f} | {r['bpw']:.2f} "
              f"| {r['weights'] / 1e6:.1f} | {r['mapped'] / 1e6:.1f} | {r['rss'] / 1e6:.1f} | {r['prefill']:.1f} "
              f"| {r['decode']:.1f} |")
    return least, most


def cycle(s, most, seconds, csv):
    """Four streams run while the budget steps between the least the running requests
    allow and the whole stack, once a second."""
    put(s, 0)
    fracs = [1.0, 0.5, 0.0, 0.5, 1.0, 0.1, 0.7, 0.0, 1.0]
    samples, stop = [], threading.Event()
    budget_now = [0]

    def sample():
        while not stop.is_set():
            state = memory(s)
            samples.append((time.monotonic(), budget_now[0], rss(s.proc.pid), mapped_rss(s.proc.pid),
                            state["weight_bytes"] + state["kv_allocated_bytes"]))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    changes = 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(timed_stream, s, PROMPT, 400) for _ in range(4)]
        t_end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < t_end and not all(r.done() for r in runs):
            least = memory(s)["minimum_bytes"] + (1 << 20)   # a page or two of growth between GET and PUT
            b = least + int(fracs[i % len(fracs)] * max(0, most - least))
            try:
                put(s, b)
                budget_now[0] = b
                changes += 1
            except SystemExit as e:
                print(f"  (refused: {e})", file=sys.stderr)
            i += 1
            time.sleep(1.0)
        for r in runs:
            r.result()
    stop.set()
    sampler.join()
    print(f"\n{changes} budget changes under 4 streams; per budget step:\n")
    print("| budget (MB) | samples | weights + KV max (MB) | file pages max (MB) | RSS max (MB) | RSS max − budget (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    by = {}
    for _, b, r, mapped, governed in samples:
        by.setdefault(b, []).append((r, mapped, governed))
    for b in sorted(by):
        if not b:
            continue
        v = by[b]
        print(f"| {b / 1e6:.1f} | {len(v)} | {max(x[2] for x in v) / 1e6:.1f} | {max(x[1] for x in v) / 1e6:.1f} "
              f"| {max(x[0] for x in v) / 1e6:.1f} | {(max(x[0] for x in v) - b) / 1e6:+.1f} |")
    state = memory(s)
    print(f"\nafter the cycle: {json.dumps({k: state[k] for k in ('memory_budget_bytes', 'resident')})}")
    if csv:
        with open(csv, "w") as f:
            f.write("t,budget,rss,file_rss,weights_kv\n")
            t0 = samples[0][0] if samples else 0
            for t, b, r, mapped, governed in samples:
                f.write(f"{t - t0:.3f},{b},{r},{mapped},{governed}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stack")
    ap.add_argument("--ebb", default=str(pathlib.Path(__file__).resolve().parent.parent / "build" / "ebb"))
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--cycle-seconds", type=float, default=20)
    ap.add_argument("--csv")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--kv-bits", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = Server(a.ebb, "--default-model", "stack", "--verify-models", "stat", "--threads", str(a.threads), "--kv-bits", str(a.kv_bits),
                   catalog=os.path.join(tmp, "catalog.db"), model_path=os.path.abspath(a.stack), token=TOKEN,
                   start_timeout=300)
        try:
            s.wait_ready(600)
            print(f"load average {os.getloadavg()[0]:.1f}\n")
            _, most = sweep(s, a.points)
            cycle(s, most, a.cycle_seconds, a.csv)
            print(f"\nload average {os.getloadavg()[0]:.1f}")
        finally:
            s.stop()


if __name__ == "__main__":
    main()
