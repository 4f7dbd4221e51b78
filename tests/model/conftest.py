"""Shared fixtures for the model tests: trained checkpoint dirs and their exported model dirs.

Training and export take seconds each, so they happen once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args` from the repo root, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A test-tiny network trained on digits for 3 epochs."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_module("training", "--preset", "test-tiny", "--epochs", "3", "--no-progress",
               "--out", str(out))
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """tiny_run exported through the CLI: (model dir, the finished process)."""
    out = tmp_path_factory.mktemp("models") / "tiny"
    proc = run_module("model.export", str(tiny_run), "--out", str(out))
    return out, proc


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The bundled default, trained properly (the calibration bound needs a real model)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    run_module("training", "--no-progress", "--out", str(out))
    return out


@pytest.fixture(scope="session")
def digits_export(digits_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "digits"
    run_module("model.export", str(digits_run), "--out", str(out))
    return out
