"""Shared pytest fixtures and helpers: where the ebb binary and the default model are,
and `Server`, one `ebb serve` as the integration suites run it (tools/daemon.py, shared
with tools/agreement.py).

EBB_BIN points at the binary under test (the Makefile sets it to the Release
build); EBB_MODEL at the GGUF model. Tests never build anything themselves.
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from daemon import Server, clean_env  # noqa: E402,F401  (the suites use them as conftest.*)


@pytest.fixture(scope="session")
def ebb_bin():
    path = pathlib.Path(os.environ.get("EBB_BIN", ROOT / "build" / "ebb"))
    if not path.exists():
        pytest.fail(f"ebb binary not found at {path}; build first (make build)")
    return str(path)


@pytest.fixture(scope="session")
def model_path():
    path = pathlib.Path(os.environ.get("EBB_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.exists():
        pytest.fail(f"model not found at {path}; run scripts/setup")
    return str(path)


@pytest.fixture(scope="module", params=["release", "asan"])
def binary(request, ebb_bin):
    """Each binary under test in turn: the release build, then the sanitized one
    (EBB_BIN_ASAN; skipped when unset)."""
    if request.param == "asan":
        path = os.environ.get("EBB_BIN_ASAN")
        if not path:
            pytest.skip("EBB_BIN_ASAN not set (make test sets it)")
        return path
    return ebb_bin


def run_ebb(ebb_bin, *args, input_bytes=None, timeout=600):
    """Runs ebb and returns the CompletedProcess (bytes stdout/stderr)."""
    return subprocess.run([ebb_bin, *args], input=input_bytes, capture_output=True, timeout=timeout)
