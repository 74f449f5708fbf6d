"""The memory governor, end to end: a daemon serving a BitStack file follows PUT /admin/memory
live while requests stream, refuses impossible budgets, keeps its policy across a restart, and
follows the free memory in "auto".

The model is a two-layer cut of the default model packed as a stack (test_bitstack.py's cut:
real weights, packed in seconds). What is checked, and against what:
  - after every budget change the resident weights plus the KV the requests reserve fit the
    budget (GET /admin/memory), the depth falls and rises with it, and every stream that ran
    through six changes finishes without an error;
  - the stack really changes and really comes back: greedy answers at the smallest budget
    differ from those at no budget, and after a shrink/grow cycle equal those before it
    (a stale depth or a page released but still in use would show here, and in the ASan run);
  - bad budgets change nothing and say what is wrong; 409 names the least budget, which is
    then accepted;
  - the policy is one catalog setting, read back after a restart;
  - metrics count the changes in each direction, the bytes, and time the swaps.
"""
import concurrent.futures
import json
import os
import re
import sqlite3
import time

import pytest
import requests

from conftest import Server, run_ebb
from daemon import start_ready
from test_bitstack import cut_model

TOKEN = "governor-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IO = 30
LEVELS = 4
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
           "The best way to learn", "In 1969 the first", "My favourite colour is", "Bees make honey by"]


@pytest.fixture(scope="module")
def stack_file(ebb_bin, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("governor")
    src, out = d / "cut2.gguf", d / "cut2.bitstack.gguf"
    cut_model(model_path, src, 2)
    p = run_ebb(ebb_bin, "pack", "-m", str(src), "--format", "bitstack", "--base-bits", "0", "--levels", str(LEVELS),
                "--calib-seqs", "4", "--calib-len", "128", "--no-register", "--no-eval", "-o", str(out),
                timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    return out


@pytest.fixture(scope="module")
def source_file(stack_file):
    return stack_file.parent / "cut2.gguf"   # the f32 cut the stack was packed from


def start(binary, stack_file, catalog, *args):
    return start_ready(binary, "--default-model", "stack", "--verify-models", "stat", "--max-running", "8", *args,
                       catalog=catalog, model_path=str(stack_file), token=TOKEN, start_timeout=120)


@pytest.fixture(scope="module")
def srv(binary, stack_file, tmp_path_factory):
    s = start(binary, stack_file, tmp_path_factory.mktemp("governor-catalog") / "catalog.db")
    yield s
    s.stop_clean()


def memory(s):
    r = requests.get(s.url("/admin/memory"), headers=AUTH, timeout=IO)
    assert r.status_code == 200, r.text
    return r.json()


def put(s, body):
    return requests.put(s.url("/admin/memory"), json=body, headers=AUTH, timeout=IO)


def model_of(state):
    (m,) = state["models"]
    return m


def fits(state):
    """Weights resident plus KV reserved within the budget (none: always)."""
    m = model_of(state)
    return not state["memory_budget_bytes"] or m["weight_bytes"] + m["kv_reserved_bytes"] <= state["memory_budget_bytes"]


def settle(s, predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        state = memory(s)
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def put_at_least(s, budget):
    """PUT budget, or the least the models accept at that moment if it is less (the KV the
    running requests hold grows between a GET and a PUT): the budget applied."""
    for _ in range(20):
        r = put(s, {"budget": budget})
        if r.status_code == 200:
            return budget
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "memory_budget_too_small" and err["param"] == "budget", err
        budget = int(re.search(r"give at least (\d+) bytes", err["message"]).group(1))
    raise AssertionError("the minimum kept moving")


def stream(s, prompt, seed):
    r = requests.post(s.url("/v1/completions"), stream=True, timeout=300, json={
        "prompt": prompt, "max_tokens": 96, "temperature": 0.7, "seed": seed, "stream": True})
    assert r.status_code == 200, r.text
    text, finish, errors = "", None, []
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            errors.append(ev["error"])
            continue
        choice = ev["choices"][0]
        text += choice["text"]
        finish = choice["finish_reason"] or finish
    return text, finish, errors


def greedy(s, prompts):
    out = []
    for p in prompts:
        r = requests.post(s.url("/v1/completions"), timeout=120,
                          json={"prompt": p, "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["text"])
    return out


def metric(s, name, **labels):
    text = requests.get(s.url("/metrics"), timeout=IO).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(r"([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) == name and want in (m.group(2) or ""):
            return float(m.group(3))
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


def perplexity(ebb_bin, model, text, tmp_path, name):
    f = tmp_path / name
    f.write_text(text)
    p = run_ebb(ebb_bin, "ppl", "-m", str(model), "-f", str(f), "--ctx", "32", timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    return float(re.search(r"PPL = ([0-9.]+)", p.stdout.decode()).group(1))


def test_the_stack_follows_the_budget_while_streams_run(srv, ebb_bin, source_file, tmp_path):
    idle = memory(srv)
    assert idle["mode"] == "none"
    m = model_of(idle)
    st = m["weights"]["stack"]
    assert m["weights"]["kind"] == "bitstack" and st["levels"] == LEVELS
    assert st["resident_bytes"] == st["full_bytes"] and st["blocks_resident"] == st["blocks_total"]
    # The packer's checkpoints: the perplexity it measured at this prefix (the whole stack).
    assert st["perplexity"] is not None and st["perplexity"] > 1, st
    # packed with --no-eval: its checkpoints scored calibration windows, and say so
    assert st["perplexity_text"] == "calibration (in-sample), 4 windows of 128", st
    fixed = m["weight_bytes"] - st["resident_bytes"]
    assert idle["minimum_bytes"] > fixed + st["min_bytes"]   # and the smallest request's KV
    full = fixed + st["full_bytes"]
    changes = metric(srv, "ebb_weight_changes_total", direction="shrink")

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        runs = [pool.submit(stream, srv, p, i) for i, p in enumerate(PROMPTS)]
        time.sleep(0.3)
        depths, applied = [], []
        # Down to the least the running requests allow and back up, seven changes.
        for frac in (0.7, 0.3, 0.0, 0.5, 0.05, 0.9, 2.0):
            least = memory(srv)["minimum_bytes"]
            budget = put_at_least(srv, least + int(frac * (full + 8 * (least - fixed - st["min_bytes"]) - least)))
            applied.append(budget)
            state = settle(srv, fits)
            assert fits(state), state
            assert state["memory_budget_bytes"] >= budget
            s = model_of(state)["weights"]["stack"]
            assert st["min_bytes"] <= s["resident_bytes"] <= st["full_bytes"], s
            depths.append(s["depth"])
        # The last budget holds far more: the engine grows the stack at its next step
        # (the GET above may have come before it).
        state = settle(srv, lambda st_: model_of(st_)["weights"]["stack"]["depth"] > min(depths))
        depths.append(model_of(state)["weights"]["stack"]["depth"])
        results = [r.result() for r in runs]
    for text, finish, errors in results:
        assert not errors and finish in ("length", "stop"), (text, finish, errors)
    # The answers written while the depth moved under them are no worse, under the f32
    # model the stack was packed from, than answers written at a fixed depth: the least
    # budget of the run and no budget (a matrix computed from a released page or from a
    # stale depth would write noise). The cut's text is poor at any depth; the bound is
    # relative.
    moving = perplexity(ebb_bin, source_file, "\n".join(t for t, _, _ in results), tmp_path, "moving.txt")
    fixed = []
    for budget in (min(applied), 0):
        assert put(srv, {"budget": budget}).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = [r[0] for r in pool.map(lambda a: stream(srv, *a), [(p, i) for i, p in enumerate(PROMPTS)])]
        fixed.append(perplexity(ebb_bin, source_file, "\n".join(texts), tmp_path, f"fixed{budget}.txt"))
    assert moving < 2 * max(fixed), (moving, fixed)
    assert min(depths) < LEVELS and depths[-1] > min(depths), depths
    # Idle under a budget of more than everything: the whole stack again.
    state = settle(srv, lambda st_: model_of(st_)["weights"]["stack"]["resident_bytes"] == st["full_bytes"])
    assert model_of(state)["weights"]["stack"]["blocks_resident"] == st["blocks_total"], state
    assert metric(srv, "ebb_weight_changes_total", direction="shrink") > changes
    assert metric(srv, "ebb_weight_changes_total", direction="grow") > 0
    assert metric(srv, "ebb_weight_bytes_loaded_total") > 0 and metric(srv, "ebb_weight_bytes_freed_total") > 0
    assert metric(srv, "ebb_weight_swap_seconds_count") > 0
    assert metric(srv, "ebb_stack_blocks_resident") == st["blocks_total"]
    assert metric(srv, "ebb_memory_minimum_bytes") == memory(srv)["minimum_bytes"]
    assert put(srv, {"budget": 0}).status_code == 200


def test_a_shrink_grow_cycle_gives_the_same_answers_back(srv):
    prompts = PROMPTS[:3]
    assert put(srv, {"budget": 0}).status_code == 200
    full_ppl = model_of(memory(srv))["weights"]["stack"]["perplexity"]
    before = greedy(srv, prompts)
    least = memory(srv)["minimum_bytes"]
    assert put(srv, {"budget": least}).status_code == 200
    state = memory(srv)
    # One level, and (idle) the smallest request's KV in blocks of the next; what the
    # packer measured there is worse than with the whole stack.
    assert 1.0 <= model_of(state)["weights"]["stack"]["depth"] < 2.0, state
    assert model_of(state)["weights"]["stack"]["perplexity"] > full_ppl, state
    small = greedy(srv, prompts)
    assert put(srv, {"budget": 0}).status_code == 200
    assert greedy(srv, prompts) == before
    assert small != before   # one level of four is another model


def mapped_pages(pid, path):
    """The pages of a file mapped in a process, as (file offset of each present page, page
    size): the kernel's page tables (/proc/PID/pagemap, bit 63), not the process's account."""
    page = os.sysconf("SC_PAGE_SIZE")
    present = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or os.path.realpath(fields[5]) != os.path.realpath(path):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            pagemap.seek(lo // page * 8)
            entries = pagemap.read((hi - lo) // page * 8)
            for i in range(0, len(entries), 8):
                if int.from_bytes(entries[i:i + 8], "little") >> 63:
                    present.add(offset + i // 8 * page)
    return present, page


def test_blocks_outside_the_prefix_stay_out_of_memory(srv, stack_file):
    # After shrinking from the whole stack to one level in two steps, and after a grow to
    # about two levels followed by requests (their first faults near each new boundary), no page lying wholly
    # in a block outside the prefix is mapped in the daemon: each matrix's blocks are one run
    # of the file (docs/formats.md), the run past the prefix is handed back whole, and the
    # kernel's fault-around and large folios, which map cached neighbours of a faulting page,
    # stop at the released pages' own VMAs (engine/bitstack.c).
    import gguf
    import bitstack_gguf
    r = gguf.GGUFReader(str(stack_file))
    levels = bitstack_gguf.levels(r)
    order = [int(r.fields["ebb.bitstack.order"].parts[i][0]) for i in r.fields["ebb.bitstack.order"].data]
    tensors = {t.name: t for t in bitstack_gguf.block_tensors(r)}
    matrices = [tensors[f"blk.{layer}.{kind}.bs_blocks"] for layer in range(2) for kind in bitstack_gguf.KINDS]

    def strays():
        kept = model_of(memory(srv))["weights"]["stack"]["resident_bytes"]
        depth, total = [0] * len(matrices), 0
        for block in order:
            size = int(matrices[block // levels].shape[0])
            if total + size > kept:
                break
            total += size
            depth[block // levels] += 1
        assert total == kept and 1 <= min(depth) and max(depth) < levels, (total, kept, depth)
        present, page = mapped_pages(srv.proc.pid, stack_file)
        assert present, "the stack file is not mapped"
        out, outside = [], 0
        for t, d in zip(matrices, depth):
            lo = int(t.data_offset) + d * int(t.shape[0])
            hi = int(t.data_offset) + levels * int(t.shape[0])
            for at in range((lo + page - 1) // page * page, hi // page * page, page):
                outside += 1
                if at in present:
                    out.append((t.name, at - lo))
        return outside, out

    assert put(srv, {"budget": 0}).status_code == 200
    greedy(srv, PROMPTS[:2])   # every block in use
    least = memory(srv)["minimum_bytes"]
    full = model_of(memory(srv))["weights"]["stack"]["full_bytes"]
    for budget in (least + full // 4, least):   # shrinking in two steps: about two levels, then one
        assert put(srv, {"budget": budget}).status_code == 200
        greedy(srv, PROMPTS[:2])
    outside, out = strays()
    assert outside > 100 and not out, (outside, out[:10])
    assert put(srv, {"budget": least + full // 4}).status_code == 200
    greedy(srv, PROMPTS[2:5])
    outside, out = strays()
    assert outside > 20 and not out, (outside, out[:10])
    assert put(srv, {"budget": 0}).status_code == 200


def test_bad_budgets_change_nothing(srv):
    assert put(srv, {"budget": 0}).status_code == 200
    before = memory(srv)
    for body, param in (({"budget": -1}, "budget"), ({"budget": "lots"}, "budget"), ({"budget": 1.5}, "budget"),
                        ({"memory_budget_bytes": -5}, "memory_budget_bytes"), ({"budget": None}, "budget"),
                        ({"budget": 1 << 62}, "budget"),                       # more than the machine has
                        ({"budget": "auto", "reserve_bytes": -1}, "reserve_bytes"),
                        ({"budget": "auto", "reserve_bytes": "x"}, "reserve_bytes"),
                        ({"budget": "auto", "reserve_bytes": 1 << 62}, "reserve_bytes"),   # leaves nothing
                        ({"budget": 1 << 30, "reserve_bytes": 5}, "reserve_bytes"),
                        ({"budget": 1 << 30, "memory_budget_bytes": 1 << 30}, "budget"),
                        ({}, "budget")):
        r = put(srv, body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    # Below the minimum: 409 naming it, and that minimum is accepted.
    r = put(srv, {"budget": before["minimum_bytes"] - 1})
    assert r.status_code == 409, r.text
    msg = r.json()["error"]["message"]
    assert f"give at least {before['minimum_bytes']} bytes" in msg and "one level" in msg, msg
    after = memory(srv)
    assert after["memory_budget_bytes"] == before["memory_budget_bytes"] and after["mode"] == "none"
    assert put(srv, {"budget": before["minimum_bytes"]}).status_code == 200
    assert put(srv, {"budget": 0}).status_code == 200


def test_auto_follows_the_free_memory_and_refuses_a_reserve_that_leaves_too_little(srv):
    r = put(srv, {"budget": "auto", "reserve_bytes": 64 << 20})
    assert r.status_code == 200, r.text
    state = r.json()
    auto = state["auto"]
    assert state["mode"] == "auto" and auto["reserve_bytes"] == 64 << 20 and auto["free_source"] in ("cgroup", "meminfo")
    held = state["weight_bytes"] + state["kv_allocated_bytes"]
    # held + free - reserve, read a moment apart
    assert abs(state["memory_budget_bytes"] - (held + auto["free_bytes"] - (64 << 20))) < 0.05 * auto["free_bytes"]
    # A reserve that leaves less than the models need: 409, and auto stays as it was. The
    # machine's free memory moves by megabytes between two reads (other processes), so the
    # reserve is what was free and held plus 1 GiB: nothing is left even if more came free.
    r = put(srv, {"budget": "auto", "reserve_bytes": held + auto["free_bytes"] + (1 << 30)})
    assert r.status_code in (400, 409), r.text
    assert r.json()["error"]["param"] == "reserve_bytes"
    assert memory(srv)["auto"]["reserve_bytes"] == 64 << 20
    assert put(srv, {"budget": 0}).status_code == 200
    assert "auto" not in memory(srv)


def test_the_policy_survives_a_restart(binary, stack_file, tmp_path):
    catalog = tmp_path / "catalog.db"
    s = start(binary, stack_file, catalog)
    try:
        least = memory(s)["minimum_bytes"]
        assert put(s, {"budget": least + (1 << 20)}).status_code == 200
    finally:
        s.stop_clean()
    s = start(binary, stack_file, catalog)
    try:
        state = settle(s, lambda st: st["memory_budget_bytes"] == least + (1 << 20) and st["models"])
        assert state["mode"] == "fixed" and state["memory_budget_bytes"] == least + (1 << 20), state
        assert model_of(state)["weights"]["stack"]["resident_bytes"] < model_of(state)["weights"]["stack"]["full_bytes"]
        assert put(s, {"budget": "auto", "reserve_bytes": 1 << 20}).status_code == 200
    finally:
        s.stop_clean()
    s = start(binary, stack_file, catalog)
    try:
        state = settle(s, lambda st: st["mode"] == "auto")
        assert state["mode"] == "auto" and state["auto"]["reserve_bytes"] == 1 << 20, state
    finally:
        s.stop_clean()


def test_a_truncated_stack_is_refused_naming_the_file(srv, stack_file, tmp_path):
    cut = tmp_path / "truncated.bitstack.gguf"
    with open(stack_file, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(stack_file.stat().st_size * 2 // 3))
    r = requests.post(srv.url("/admin/models"), json={"path": str(cut), "name": "cut"}, headers=AUTH, timeout=120)
    assert r.status_code in (400, 422), r.text
    assert str(cut) in r.json()["error"]["message"], r.text
    assert requests.get(srv.url("/v1/models/stack"), timeout=IO).status_code == 200   # the served one is unharmed


@pytest.fixture(scope="module")
def ladder(binary, ebb_bin, source_file, model_path, tmp_path_factory):
    """The f32 cut served with variants packed from it and registered (ebb pack registers
    them): a w4a4 file and a stack, and a w4a16 file, which cannot be a rung (dequantized at
    load)."""
    d = tmp_path_factory.mktemp("ladder")
    catalog = d / "catalog.db"
    p = run_ebb(ebb_bin, "models", "--catalog", str(catalog), "add", str(source_file), "--name", "cut")
    assert p.returncode == 0, p.stderr.decode()
    packed, stack = d / "cut.w4a4.gguf", d / "cut.bitstack.gguf"
    for out, fmt, extra in ((packed, "w4a4", ()), (d / "cut.w4a16.gguf", "w4a16", ()),
                            (stack, "bitstack", ("--levels", str(LEVELS), "--checkpoints", "3",
                                                 "--checkpoint-windows", "1"))):
        p = run_ebb(ebb_bin, "pack", "-m", str(source_file), "--format", fmt, *extra, "--calib-seqs", "4",
                    "--calib-len", "128", "--no-eval", "--catalog", str(catalog), "-o", str(out), timeout=600)
        assert p.returncode == 0 and f"registered as a '{fmt}' variant" in p.stdout.decode(), p.stdout + p.stderr
    # The stack's directory is in the catalog: every block, and the checkpoints the packer
    # measured (as it printed them while packing).
    blocks = 2 * 7 * LEVELS
    assert f"with its directory of {blocks} blocks" in p.stdout.decode(), p.stdout
    printed = [(float(mb), float(ppl)) for mb, ppl in
               re.findall(r"([0-9.]+) MB: perplexity ([0-9.]+)", p.stderr.decode().replace("\r", "\n"))]
    listed = json.loads(run_ebb(ebb_bin, "models", "--catalog", str(catalog), "list", "--json").stdout)
    (entry,) = [v for v in listed[0]["variants"] if v["kind"] == "bitstack"]
    st = entry["stack"]
    assert st["blocks"] == blocks and 0 < st["bytes"] < entry["bytes"], st
    assert st["checkpoint_text"] == "calibration (in-sample), 1 window of 128", st   # --no-eval, --calib-len 128
    got = [(round(c["bytes"] / 1e6, 1), c["perplexity"]) for c in st["checkpoints"]]
    assert len(got) == len(printed) == 3 and st["checkpoints"][-1]["bytes"] == st["bytes"], (got, printed)
    for (mb, ppl), (want_mb, want_ppl) in zip(got, printed):
        assert mb == want_mb and abs(ppl - want_ppl) <= 1e-3 * want_ppl + 1e-3, (got, printed)
    # Variants that cannot be rungs, registered by hand: the source itself (not smaller), the
    # whole default model (another shape) and, newest of all, a "bitstack" that is not one (the
    # packed stack is used instead).
    db = sqlite3.connect(catalog)
    (mid,) = db.execute("SELECT id FROM models WHERE name = 'cut'").fetchone()
    for kind, path in (("w4a8", source_file), ("w4a4", model_path), ("bitstack", packed)):
        db.execute("INSERT INTO variants (model_id, kind, path, bytes, bits_per_weight, created_at) "
                   "VALUES (?, ?, ?, 1, 4.0, 0)", (mid, kind, str(path)))
    db.commit()
    db.close()
    s = Server(binary, "--default-model", "cut", "--verify-models", "stat", "--max-running", "8", catalog=catalog,
               token=TOKEN, start_timeout=120)
    try:
        s.wait_ready()
        log = s.log()
        for kind, path, why in (("w4a8", source_file, "it is not smaller than the model"),
                                ("w4a4", model_path, "its shape is not the model's"),
                                ("bitstack", packed, "it is not a bitstack file")):
            assert f'msg="variant not used" model=cut kind={kind} path={path} error="{why}"' in log, log
        assert re.search(r'msg="variant loaded" model=cut kind=w4a4 ', log), log
        assert re.search(r'msg="variant loaded" model=cut kind=bitstack ', log), log
        assert re.search(r'msg="variant not used" model=cut kind=w4a16 .*dequantized at load', log), log
    except BaseException:
        s.kill()
        raise
    yield s, packed, stack
    s.stop_clean()


def test_a_model_computes_with_the_largest_rung_of_its_ladder_that_fits(ladder):
    srv, packed, stack = ladder
    state = memory(srv)
    m = model_of(state)
    w = m["weights"]
    assert w["kind"] == "file" and w["stack"]["resident_bytes"] == 0, w
    assert [(r["kind"], r["path"]) for r in w["ladder"][1:]] == [("w4a4", str(packed)), ("bitstack", str(stack))], w
    own, packed_bytes, stack_least = (r["weight_bytes"] for r in w["ladder"])
    assert own == m["weight_bytes"] and own > packed_bytes > stack_least, w
    # Served in less than any whole file: the stack's least is the floor.
    assert state["minimum_bytes"] < packed_bytes, state
    prompts = PROMPTS[:3]
    before = greedy(srv, prompts)

    def go(kind):
        """The budget that makes the model take `kind`, applied; the state once it has."""
        if kind == "file":
            assert put(srv, {"budget": own * 4}).status_code == 200
        elif kind == "packed":   # the w4a4 file and the KV of every stream, with room to spare
            assert put(srv, {"budget": packed_bytes + (16 << 20)}).status_code == 200
        else:   # below the w4a4 file, with room for a request: on this two-layer cut (the embedding
            # is most of every file) the stack on its base is less than a megabyte below that file
            put_at_least(srv, min(memory(srv)["minimum_bytes"] + (1 << 20), packed_bytes - 1))
        # The engine changes weights at its next step (slow in the ASan build).
        return settle(srv, lambda st: fits(st) and model_of(st)["weights"]["kind"] == kind, timeout=30)

    pm = model_of(go("packed"))
    assert pm["weights"]["kind"] == "packed" and pm["weights"]["variant_kind"] == "w4a4", pm
    assert pm["weights"]["path"] == str(packed) and pm["weight_bytes"] == packed_bytes, pm
    assert pm["weights"]["stack"]["resident_bytes"] == 0, pm
    on_packed = greedy(srv, prompts)
    assert on_packed != before
    sm = model_of(go("bitstack"))
    assert sm["weights"]["kind"] == "bitstack" and sm["weights"]["path"] == str(stack), sm
    st = sm["weights"]["stack"]
    assert 0 <= st["depth"] <= LEVELS and st["min_bytes"] == 0, sm   # on a base the least keeps no level
    # ebb pack's default stack sits on a 2-bit base, resident whatever the depth
    assert st["base_bytes"] > 0 and sm["weight_bytes"] > st["base_bytes"] + st["resident_bytes"], sm
    assert greedy(srv, prompts) not in (before, on_packed)
    # Streams run through changes between every pair of rungs, both ways.
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        runs = [pool.submit(stream, srv, p, i) for i, p in enumerate(PROMPTS)]
        kinds = []
        for want in ("file", "packed", "bitstack", "file", "bitstack", "packed", "file"):
            state = go(want)
            assert fits(state), state
            kinds.append(model_of(state)["weights"]["kind"])
            time.sleep(0.2)
        results = [r.result() for r in runs]
    assert kinds == ["file", "packed", "bitstack", "file", "bitstack", "packed", "file"], kinds
    for text, finish, errors in results:
        assert not errors and finish in ("length", "stop"), (text, finish, errors)
    # Back on each whole file: the same answers as before, exactly.
    state = settle(srv, lambda st: model_of(st)["weights"]["kind"] == "file")
    assert model_of(state)["weight_bytes"] == own and model_of(state)["weights"]["stack"]["resident_bytes"] == 0
    assert greedy(srv, prompts) == before
    go("packed")
    assert greedy(srv, prompts) == on_packed
    go("file")
    assert metric(srv, "ebb_weight_changes_total", direction="shrink") >= 2
    assert metric(srv, "ebb_weight_changes_total", direction="grow") >= 2
