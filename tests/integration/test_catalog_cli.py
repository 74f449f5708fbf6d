"""`ebb models` against a real catalog file: add, list, rm, refusals, and
the catalog surviving concurrent writers and processes killed mid-write.

The catalog is inspected independently with Python's sqlite3 module
(integrity_check, the rows themselves), and the model facts the catalog
records (architecture, parameter count, size) are checked against the gguf
package's own reader, not against ebb's.
"""
import json
import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import run_ebb

SCHEMA_VERSION = 3   # storage/catalog.h CATALOG_SCHEMA_VERSION


@pytest.fixture(scope="module")
def model_facts(model_path):
    """Architecture and parameter count according to the gguf package."""
    from gguf import GGUFReader

    reader = GGUFReader(model_path)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    params = sum(int(t.n_elements) for t in reader.tensors)
    return {"architecture": arch, "params": params, "bytes": os.path.getsize(model_path)}


@pytest.fixture
def catalog(tmp_path):
    return str(tmp_path / "state" / "catalog.db")


def models(ebb_bin, catalog, *args, env=None):
    return subprocess.run([ebb_bin, "models", "--catalog", catalog, *args], capture_output=True,
                          timeout=120, env=env)


def ok(proc):
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def failed(proc, *needles, status=1):
    err = proc.stderr.decode()
    assert proc.returncode == status, f"exit {proc.returncode}, stderr: {err}"
    assert err.strip(), "no message on stderr"
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    assert "AddressSanitizer" not in err and "runtime error" not in err, err
    return err


def integrity(catalog):
    db = sqlite3.connect(catalog, timeout=30)
    try:
        result = db.execute("PRAGMA integrity_check").fetchall()
        fk = db.execute("PRAGMA foreign_key_check").fetchall()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        rows = db.execute("SELECT name, architecture, source_path, source_bytes, params, created_at "
                          "FROM models").fetchall()
    finally:
        db.close()
    assert result == [("ok",)], result
    assert fk == [], fk
    return version, rows


def test_help_and_usage(ebb_bin):
    proc = run_ebb(ebb_bin, "models", "--help")
    assert proc.returncode == 0 and b"usage: ebb models" in proc.stdout
    failed(run_ebb(ebb_bin, "models"), "list, add or rm", status=2)
    failed(run_ebb(ebb_bin, "models", "frobnicate"), "frobnicate", status=2)
    failed(run_ebb(ebb_bin, "models", "add"), "PATH", status=2)
    failed(run_ebb(ebb_bin, "models", "rm"), "NAME", status=2)
    failed(run_ebb(ebb_bin, "models", "list", "extra"), status=2)
    failed(run_ebb(ebb_bin, "models", "list", "--bogus"), "--bogus", status=2)
    failed(run_ebb(ebb_bin, "models", "list", "--catalog"), "--catalog", status=2)
    failed(run_ebb(ebb_bin, "models", "rm", "x", "--name", "y"), "--name", status=2)


def test_add_list_rm(ebb_bin, catalog, model_path, model_facts):
    # An empty catalog lists nothing (and is created, directories included).
    assert json.loads(ok(models(ebb_bin, catalog, "list", "--json"))) == []
    assert os.path.exists(catalog)

    out = ok(models(ebb_bin, catalog, "add", model_path))
    assert "added SmolLM2-135M-Instruct.Q4_1" in out
    ok(models(ebb_bin, catalog, "add", model_path, "--name", "smol"))

    listed = json.loads(ok(models(ebb_bin, catalog, "list", "--json")))
    assert [m["name"] for m in listed] == ["SmolLM2-135M-Instruct.Q4_1", "smol"]
    for m in listed:
        assert m["architecture"] == model_facts["architecture"] == "llama"
        assert m["params"] == model_facts["params"]
        assert m["bytes"] == model_facts["bytes"]
        assert m["path"] == os.path.realpath(model_path)
        assert m["variants"] == []
        assert abs(m["created_at"] - time.time()) < 300
    table = ok(models(ebb_bin, catalog, "list"))
    assert "smol" in table and "llama" in table and str(model_facts["params"]) in table

    # What the CLI says matches what is in the file.
    version, rows = integrity(catalog)
    assert version == SCHEMA_VERSION
    assert sorted(r[0] for r in rows) == ["SmolLM2-135M-Instruct.Q4_1", "smol"]

    # Duplicates, unknown names and bad names fail cleanly and change nothing.
    failed(models(ebb_bin, catalog, "add", model_path), "already", "SmolLM2-135M-Instruct.Q4_1")
    failed(models(ebb_bin, catalog, "add", model_path, "--name", "smol"), "'smol'", "already")
    failed(models(ebb_bin, catalog, "add", model_path, "--name", "bad name"), "invalid")
    failed(models(ebb_bin, catalog, "rm", "nope"), "no model named 'nope'")

    assert "removed smol" in ok(models(ebb_bin, catalog, "rm", "smol"))
    failed(models(ebb_bin, catalog, "rm", "smol"), "no model named 'smol'")
    listed = json.loads(ok(models(ebb_bin, catalog, "list", "--json")))
    assert [m["name"] for m in listed] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert os.path.exists(model_path), "rm must not delete the model file"


def test_variants_show_in_json_and_go_with_rm(ebb_bin, catalog, model_path):
    ok(models(ebb_bin, catalog, "add", model_path, "--name", "m"))
    db = sqlite3.connect(catalog)
    db.execute("PRAGMA foreign_keys = ON")
    (mid,) = db.execute("SELECT id FROM models WHERE name = 'm'").fetchone()
    db.execute("INSERT INTO variants (model_id, kind, path, bytes, bits_per_weight, perplexity, ppl_text, "
               "checksum, created_at, checkpoint_text) VALUES (?, 'bitstack', '/x/m.bs', 1234, 3.5, 21.25, 'wiki', "
               "NULL, 0, 'wiki, 4 windows of 512')", (mid,))
    (vid,) = db.execute("SELECT id FROM variants").fetchone()
    for ord_, ppl in ((0, None), (1, 9.5)):   # a checkpoint after the second block
        db.execute("INSERT INTO bitstack_blocks (variant_id, ord, layer, tensor, level, offset, bytes, "
                   "cumulative_bytes, ppl_at_checkpoint) VALUES (?, ?, 0, 'blk.0.attn_q', ?, ?, 10, ?, ?)",
                   (vid, ord_, ord_, 64 * ord_, 10 * (ord_ + 1), ppl))
    db.commit()
    db.close()
    (m,) = json.loads(ok(models(ebb_bin, catalog, "list", "--json")))
    assert m["variants"] == [{"kind": "bitstack", "path": "/x/m.bs", "bytes": 1234, "bits_per_weight": 3.5,
                              "perplexity": 21.25, "ppl_text": "wiki", "checksum": None, "created_at": 0,
                              "stack": {"blocks": 2, "bytes": 20, "checkpoints": [{"bytes": 20, "perplexity": 9.5}],
                                        "checkpoint_text": "wiki, 4 windows of 512"}}]
    ok(models(ebb_bin, catalog, "rm", "m"))
    db = sqlite3.connect(catalog)
    assert db.execute("SELECT count(*) FROM variants").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM bitstack_blocks").fetchone() == (0,)
    db.close()


def test_corrupt_and_missing_files_refused(ebb_bin, catalog, model_path, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(40)))
    failed(models(ebb_bin, catalog, "add", str(junk)), "junk.gguf")
    truncated = tmp_path / "truncated.gguf"
    with open(model_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    failed(models(ebb_bin, catalog, "add", str(truncated)), "truncated.gguf")
    failed(models(ebb_bin, catalog, "add", str(tmp_path / "absent.gguf")), "absent.gguf")
    _, rows = integrity(catalog)
    assert rows == []


def test_catalog_location(ebb_bin, model_path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBB_") and k != "XDG_DATA_HOME"}
    env["HOME"] = str(tmp_path / "home")

    def run(*args, **extra):
        return subprocess.run([ebb_bin, "models", *args], capture_output=True, timeout=120, env={**env, **extra})

    # Default: $HOME/.local/share/ebb/catalog.db, then $XDG_DATA_HOME/ebb/catalog.db.
    ok(run("add", model_path, "--name", "home"))
    assert os.path.exists(tmp_path / "home/.local/share/ebb/catalog.db")
    ok(run("add", model_path, "--name", "xdg", XDG_DATA_HOME=str(tmp_path / "xdg")))
    assert os.path.exists(tmp_path / "xdg/ebb/catalog.db")
    # The config file's "catalog", then EBB_CATALOG over it, then --catalog over both.
    conf = tmp_path / "ebb.json"
    conf.write_text(json.dumps({"catalog": str(tmp_path / "conf.db")}))
    ok(run("--config", str(conf), "add", model_path, "--name", "conf"))
    ok(run("add", model_path, "--name", "viaenv", EBB_CONFIG=str(conf)))
    ok(run("--config", str(conf), "add", model_path, "--name", "env", EBB_CATALOG=str(tmp_path / "env.db")))
    ok(run("--config", str(conf), "--catalog", str(tmp_path / "flag.db"), "add", model_path, "--name", "flag",
           EBB_CATALOG=str(tmp_path / "env.db")))
    expect = {"home/.local/share/ebb/catalog.db": ["home"], "xdg/ebb/catalog.db": ["xdg"],
              "conf.db": ["conf", "viaenv"], "env.db": ["env"], "flag.db": ["flag"]}
    for rel, names in expect.items():
        _, rows = integrity(str(tmp_path / rel))
        assert sorted(r[0] for r in rows) == names, rel
    # A broken config file is reported, not ignored.
    conf.write_text('{"catalog": 5}')
    failed(run("--config", str(conf), "list"), "'catalog'", "string")


def test_refuses_future_and_foreign_catalogs(ebb_bin, catalog, model_path, tmp_path):
    ok(models(ebb_bin, catalog, "add", model_path, "--name", "m"))
    db = sqlite3.connect(catalog)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    failed(models(ebb_bin, catalog, "list"), "newer")
    failed(models(ebb_bin, catalog, "add", model_path, "--name", "n"), "newer")
    db = sqlite3.connect(catalog)
    assert db.execute("PRAGMA user_version").fetchone() == (99,)  # never downgraded
    db.close()

    other = str(tmp_path / "other.db")
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (text)")
    db.commit()
    db.close()
    failed(models(ebb_bin, other, "list"), "not an ebb catalog")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    failed(models(ebb_bin, str(garbage), "list"), "garbage.db")


def test_concurrent_adds(ebb_bin, catalog, model_path):
    """Many processes at once, on a catalog that does not exist yet: distinct
    names all succeed; for a contested name exactly one wins and the others
    fail with a clear message."""
    n_distinct, n_same = 24, 8
    procs = [subprocess.Popen([ebb_bin, "models", "--catalog", catalog, "add", model_path, "--name", f"m{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n_distinct)]
    procs += [subprocess.Popen([ebb_bin, "models", "--catalog", catalog, "add", model_path, "--name", "same"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n_same)]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for status, err in results[:n_distinct]:
        assert status == 0, err
    same = results[n_distinct:]
    assert sum(1 for s, _ in same if s == 0) == 1, same
    for status, err in same:
        assert status == 0 or (status == 1 and "already" in err), (status, err)
    version, rows = integrity(catalog)
    assert version == SCHEMA_VERSION
    assert sorted(r[0] for r in rows) == sorted([f"m{i}" for i in range(n_distinct)] + ["same"])


def ebb_in_group(shell_pid):
    """Whether the shell loop's child is an ebb process right now (read from
    /proc/PID/task/*/children: quick, so the answer is still fresh when the
    kill follows)."""
    try:
        children = []
        for task in os.listdir(f"/proc/{shell_pid}/task"):
            with open(f"/proc/{shell_pid}/task/{task}/children") as f:
                children += f.read().split()
        for child in children:
            with open(f"/proc/{child}/stat") as f:
                stat = f.read()
            if stat[stat.index("(") + 1:stat.rindex(")")] == "ebb" and stat[stat.rindex(")") + 2] != "Z":
                return True
    except OSError:
        pass
    return False


def wait_group_gone(pgid, timeout=10):
    """SIGKILL takes effect when a process leaves the kernel: a write or fsync
    in flight still completes. Wait until no live process of the group is
    left, so the checks below see the final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.01)
    raise AssertionError(f"process group {pgid} still alive {timeout} s after SIGKILL")


def check_rows_whole(rows, model_path, model_facts):
    for name, arch, path, size, params, created in rows:
        assert arch == model_facts["architecture"]
        assert path == os.path.realpath(model_path)
        assert size == model_facts["bytes"] and params == model_facts["params"]
        assert created > 0 and name


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-catalog", "existing-catalog"])
def test_kill9_during_writes(ebb_bin, catalog, model_path, model_facts, fresh, tmp_path):
    """A shell loop of adds and removes, killed with SIGKILL (the whole process
    group, so the ebb child dies mid-operation) at random moments. After every
    kill the catalog must be intact, openable and hold only whole rows."""
    rng = random.Random(1234 + fresh)
    script = (f'i=0; while true; do i=$((i+1)); '
              f'"$EBB" models --catalog "$CAT" add "$MODEL" --name "k$i" >/dev/null 2>&1; '
              f'if [ $((i % 3)) = 0 ]; then "$EBB" models --catalog "$CAT" rm "k$((i-1))" >/dev/null 2>&1; fi; '
              f'done')
    env = {**os.environ, "EBB": ebb_bin, "CAT": catalog, "MODEL": model_path}
    kills = hits = 0
    for round_ in range(8):
        if fresh:  # kill during creation and migration too
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(catalog + suffix):
                    os.remove(catalog + suffix)
        proc = subprocess.Popen(["bash", "-c", script], env=env, start_new_session=True)
        time.sleep(rng.uniform(0.0, 0.02) if fresh else rng.uniform(0.05, 0.6))
        # Aim at a live ebb: wait (briefly) until one is running, then kill.
        deadline = time.monotonic() + 2
        while not ebb_in_group(proc.pid) and time.monotonic() < deadline:
            pass
        hits += ebb_in_group(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_group_gone(proc.pid)
        kills += 1
        if not os.path.exists(catalog):
            continue  # killed before the file existed: nothing to check
        # The next user (here the CLI) opens it and finishes any migration.
        listed = json.loads(ok(models(ebb_bin, catalog, "list", "--json")))
        version, rows = integrity(catalog)
        assert version == SCHEMA_VERSION
        check_rows_whole(rows, model_path, model_facts)
        assert sorted(m["name"] for m in listed) == sorted(r[0] for r in rows)
        # And it still takes writes.
        ok(models(ebb_bin, catalog, "add", model_path, "--name", f"after{round_}"))
        ok(models(ebb_bin, catalog, "rm", f"after{round_}"))
    assert kills == 8
    # Most kills must have landed on a running ebb, or this tested nothing
    # (an ebb can still finish in the instant between the check and the kill).
    assert hits >= 6, f"only {hits} of {kills} kills hit an ebb process"


def test_asan_binary_add_list_rm(catalog, model_path):
    path = os.environ.get("EBB_BIN_ASAN")
    if not path:
        pytest.skip("EBB_BIN_ASAN not set (make test sets it)")
    ok(models(path, catalog, "add", model_path))
    assert json.loads(ok(models(path, catalog, "list", "--json")))[0]["name"] == "SmolLM2-135M-Instruct.Q4_1"
    failed(models(path, catalog, "add", model_path), "already")
    ok(models(path, catalog, "rm", "SmolLM2-135M-Instruct.Q4_1"))
