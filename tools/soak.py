#!/usr/bin/env python3
"""Soak: a bounded loopback load on one `ebb serve` for a long time, with
clients that hang up mid-stream, bad requests among the good ones, and the
memory budget changed every minute. It checks what a long run breaks that a
short test does not: leaks (resident memory and open file descriptors over
time), KV cache that is never given back, and errors that are not the
client's fault.

What each client does, in a loop until the time is up (seeded, so a run can
be repeated): a streamed chat, a plain completion, or a streamed completion,
with max_tokens from 1 to 160 or, one in ten, none at all (OpenAI clients'
default: up to the context, or what the budget holds for one request); a
quarter of the streams hang up after a few events (some with a TCP reset);
one request in twenty is malformed (bad JSON, wrong types, an unknown model)
and must get a 4xx; /health and /metrics now and then.

Every minute the budget moves (PUT /admin/memory) between none and budgets
that hold from a few hundred to a few thousand positions per request. A
running request whose cache no longer fits a smaller budget is evicted by
design (503 with Retry-After, or an error event in its stream): those are
counted apart. Anything else 5xx, a stream that ends without [DONE], or a
connection the daemon drops is a failure.

Every 10 s it samples the daemon's VmRSS and open descriptors; the report
gives their least-squares slope over the second half of the run (after the
allocator and caches have warmed up) per hour, and the KV cache reserved and
allocated once the load is gone, which must be zero.

    tools/soak.py --minutes 30 --clients 24            # starts its own daemon
    tools/soak.py --minutes 5 --clients 16 --binary build/ebb --kv-bits 4

Exit status 0 when there were no failures and the KV cache came back empty.
"""
import argparse
import json
import os
import pathlib
import random
import socket
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from daemon import Server  # noqa: E402

TOKEN = "soak-admin-token"
TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a garden", "trains", "a library",
          "mountains", "a storm", "bees", "a bakery", "the desert", "a violin", "rivers", "a city at night"]
BAD_BODIES = [b"{not json", b'{"prompt": 5}', b'{"messages": "hi"}', b'{"model": "no-such-model", "prompt": "a"}',
              b'{"prompt": "a", "max_tokens": -3}', b'{"prompt": "a", "temperature": "hot"}', b"[]",
              b'{"prompt": "\xff\xfe"}']


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []

    def add(self, key, failure=None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if failure and len(self.failures) < 50:
                self.failures.append(f"{key}: {failure}")


def http(port, method, path, body=None, headers=None, timeout=900, hangup_after=None, rst=False):
    """One request on a fresh connection. Returns (status, headers dict,
    body bytes, hung_up). For a chunked response it reads chunk by chunk and,
    with hangup_after, closes the socket after that many chunks."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + (body or b""))
        f = s.makefile("rb")
        status_line = f.readline()
        if not status_line:
            raise ConnectionError("closed before a status line")
        status = int(status_line.split()[1])
        hdrs = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, v = line.decode("latin-1").split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
        data = b""
        if hdrs.get("transfer-encoding") == "chunked":
            chunks = 0
            while True:
                size_line = f.readline()
                if not size_line:
                    raise ConnectionError("closed inside a chunked body")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    f.readline()
                    break
                data += f.read(size)
                f.read(2)
                chunks += 1
                if hangup_after is not None and chunks >= hangup_after:
                    if rst:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return status, hdrs, data, True
        else:
            data = f.read(int(hdrs.get("content-length", "0")))
        return status, hdrs, data, False
    finally:
        s.close()


def is_eviction(status, hdrs, data):
    return status == 503 and "retry-after" in hdrs and b"no longer fits the memory budget" in data


def client(port, model, seed, stop_at, tally):
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        roll = rng.random()
        try:
            if roll < 0.05:
                body = rng.choice(BAD_BODIES)
                path = rng.choice(["/v1/completions", "/v1/chat/completions"])
                status, _, data, _ = http(port, "POST", path, body)
                ok = 400 <= status < 500
                tally.add(f"bad input {status}", None if ok else data[:200])
                continue
            if roll < 0.08:
                status, _, _, _ = http(port, "GET", rng.choice(["/health", "/metrics", "/v1/models"]))
                tally.add(f"get {status}", None if status == 200 else "not 200")
                continue
            topic = rng.choice(TOPICS)
            req = {"model": model, "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
            if rng.random() < 0.9:   # else none: up to the context (or what the budget holds)
                req["max_tokens"] = rng.randint(1, 160)
            kind = rng.choice(["chat", "completion", "stream"])
            if kind == "chat":
                req.update(messages=[{"role": "user", "content": f"Write about {topic}."}], stream=True)
                path = "/v1/chat/completions"
            else:
                req.update(prompt=f"A few words about {topic}:", stream=kind == "stream")
                path = "/v1/completions"
            streaming = req["stream"]
            hangup = rng.randint(1, 6) if streaming and rng.random() < 0.25 else None
            status, hdrs, data, hung_up = http(port, "POST", path, json.dumps(req).encode(), hangup_after=hangup,
                                               rst=rng.random() < 0.5)
            if hung_up:
                tally.add("hung up mid-stream")
            elif is_eviction(status, hdrs, data):
                tally.add("evicted 503 (budget shrank)")
            elif status == 429:
                tally.add("429 queue full")
            elif status == 400 and b"context_length_exceeded" in data:
                tally.add("400 over the budget's context")
            elif status != 200:
                tally.add(f"status {status}", data[:300])
            elif streaming:
                events = [e[6:] for e in data.decode("utf-8", "replace").split("\n\n") if e.startswith("data: ")]
                if not events or events[-1] != "[DONE]":
                    tally.add("stream without [DONE]", data[-300:])
                elif any('"error"' in e for e in events):
                    err = next(e for e in events if '"error"' in e)
                    if "no longer fits the memory budget" in err:
                        tally.add("evicted stream (budget shrank)")
                    else:
                        tally.add("stream error event", err[:300])
                else:
                    tally.add("stream ok")
            else:
                tally.add("ok")
        except (OSError, ValueError, IndexError) as e:
            tally.add("connection failure", repr(e))


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_hour(points):
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 3600 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def admin(port, method, path, body=None):
    status, _, data, _ = http(port, method, path, json.dumps(body).encode() if body is not None else None,
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    return status, json.loads(data) if data else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--budget-every", type=float, default=60, help="seconds between budget changes")
    ap.add_argument("--binary", default=str(ROOT / "build" / "ebb"))
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--kv-bits", default="32")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.minutes <= 24 * 60:
        ap.error("1..64 clients, up to a day")

    srv = Server(args.binary, "--max-running", "16", "--queue-length", "64", "--kv-bits", args.kv_bits,
                 model_path=args.model, token=TOKEN)
    srv.wait_ready()
    port = srv.port
    model = json.loads(http(port, "GET", "/v1/models")[2])["data"][0]["id"]
    _, mem = admin(port, "GET", "/admin/memory")
    weights = mem["weight_bytes"]
    per_position = 30 * 2 * 3 * 64 * {32: 4, 16: 2, 8: 1.1, 4: 0.6}[int(args.kv_bits)]
    tally = Tally()
    t0 = time.monotonic()
    stop_at = t0 + args.minutes * 60
    rng = random.Random(args.seed)
    threads = [threading.Thread(target=client, args=(port, model, args.seed * 1000 + i, stop_at, tally), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    samples, budgets = [], []
    next_budget = t0 + args.budget_every
    print(f"soak: {args.clients} clients for {args.minutes} min on port {port}, pid {srv.proc.pid}", flush=True)
    while time.monotonic() < stop_at:
        time.sleep(min(10, max(0.1, stop_at - time.monotonic())))
        now = time.monotonic()
        rss, fds = proc_sample(srv.proc.pid)
        samples.append((now - t0, rss, fds))
        if now >= next_budget:
            next_budget = now + args.budget_every
            positions = rng.choice([0, 400, 800, 1600, 3200, 6400])
            value = 0 if positions == 0 else int(weights + positions * per_position)
            status, doc = admin(port, "PUT", "/admin/memory", {"memory_budget_bytes": value})
            budgets.append((round(now - t0), value, status))
            if status != 200:
                tally.add(f"budget PUT {status}", str(doc)[:300])
        print(f"  {now - t0:7.0f} s  rss {rss / 2**20:7.1f} MiB  fds {fds:4d}  "
              f"requests {sum(tally.counts.values())}", flush=True)
    # Clients start nothing new after stop_at; what is in flight finishes
    # (every socket has a timeout, so this ends).
    for t in threads:
        t.join()
    admin(port, "PUT", "/admin/memory", {"memory_budget_bytes": 0})
    deadline = time.monotonic() + 30
    while True:
        _, mem = admin(port, "GET", "/admin/memory")
        idle = mem["kv_reserved_bytes"] == 0 and mem["kv_allocated_bytes"] == 0
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(2)
    rss_end, fds_end = proc_sample(srv.proc.pid)
    srv.stop()
    half = [s for s in samples if s[0] >= samples[-1][0] / 2] if samples else []
    rss_slope = slope_per_hour([(t, r / 2**20) for t, r, _ in half])
    fd_slope = slope_per_hour([(t, f) for t, _, f in half])
    failures = [k for k in tally.counts if k.startswith(("status 5", "stream without", "stream error",
                                                         "connection failure", "budget PUT", "get "))
                and not k.startswith("get 200")]
    failures += [k for k in tally.counts if k.startswith("bad input") and not k.startswith("bad input 4")]
    print(f"\nsoak: {args.minutes} min, {args.clients} clients, kv_bits {args.kv_bits}, seed {args.seed}")
    for k in sorted(tally.counts):
        print(f"  {tally.counts[k]:7d}  {k}")
    print(f"  budget changes: {len(budgets)} ({', '.join(str(b[1]) for b in budgets[:12])}{' ...' if len(budgets) > 12 else ''})")
    print(f"  RSS: first {samples[0][1] / 2**20:.1f} MiB, max {max(s[1] for s in samples) / 2**20:.1f}, "
          f"idle at the end {rss_end / 2**20:.1f}; slope over the second half {rss_slope:+.1f} MiB/hour")
    print(f"  open fds: first {samples[0][2]}, max {max(s[2] for s in samples)}, idle at the end {fds_end}; "
          f"slope {fd_slope:+.1f}/hour")
    print(f"  KV at the end: reserved {mem['kv_reserved_bytes']}, allocated {mem['kv_allocated_bytes']}")
    for f in tally.failures:
        print("  failure:", f)
    bad = failures or not idle
    print("soak:", "FAILED" if bad else "passed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
