"""Shared test helpers: running the project's CLIs as real subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repo root, output captured as text."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A digits-cnn HFF checkpoint trained briefly (shared by the whole session)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    proc = run_module("training", "--dataset", "digits", "--epochs", "12", "--out", str(out),
                      "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out
