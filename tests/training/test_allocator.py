"""hff-train's malloc: jemalloc preloaded by a re-exec when installed, the system's otherwise."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from training import allocator

# What the re-executed process reports: the malloc it runs on and whether it was re-executed.
PROBE = ("import os; from training import allocator; allocator.reexec_with_jemalloc(); "
         "print(allocator.active(), os.environ.get(allocator.REEXEC_ENV, '-'))")


def _probe(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", allocator.ALLOCATOR_ENV, allocator.REEXEC_ENV)}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(REPO), **env}, timeout=60)


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc is not installed")
def test_the_command_re_executes_itself_on_jemalloc_once():
    proc = _probe()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["jemalloc", "1"]


def test_system_malloc_on_request_or_when_jemalloc_is_absent():
    proc = _probe(**{allocator.ALLOCATOR_ENV: "system"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["glibc", "-"]


def test_no_jemalloc_installed_runs_on_as_before(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    monkeypatch.delenv(allocator.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv(allocator.REEXEC_ENV, raising=False)

    def no_exec(*args):
        raise AssertionError("re-executed without jemalloc")

    monkeypatch.setattr(os, "execve", no_exec)
    allocator.reexec_with_jemalloc(["python", "-m", "training"])  # returns: nothing to preload


def test_re_exec_preloads_jemalloc_before_what_the_user_preloads(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("LD_PRELOAD", "libmine.so")
    monkeypatch.delenv(allocator.ALLOCATOR_ENV, raising=False)
    monkeypatch.delenv(allocator.REEXEC_ENV, raising=False)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    allocator.reexec_with_jemalloc(["python", "-m", "training", "--epochs", "1"])
    (path, argv, env), = calls
    assert path == sys.executable and argv == ["python", "-m", "training", "--epochs", "1"]
    assert env["LD_PRELOAD"] == "libjemalloc.so.2 libmine.so"
    assert env[allocator.REEXEC_ENV] == "1"

    calls.clear()
    monkeypatch.setenv(allocator.REEXEC_ENV, "1")  # the re-executed process never tries again
    allocator.reexec_with_jemalloc(["python"])
    assert not calls


def test_jemalloc_gets_the_training_settings_unless_the_user_set_its_own():
    env = allocator.preload_env({"PATH": "/bin"}, "libjemalloc.so.2")
    assert env["MALLOC_CONF"] == allocator.DEFAULT_MALLOC_CONF
    assert "dirty_decay_ms:-1" in env["MALLOC_CONF"]  # freed pages kept for reuse: no refaults
    mine = allocator.preload_env({"MALLOC_CONF": "dirty_decay_ms:0"}, "libjemalloc.so.2")
    assert mine["MALLOC_CONF"] == "dirty_decay_ms:0"


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="jemalloc is not installed")
def test_the_re_executed_command_runs_with_the_training_settings():
    probe = ("import os; from training import allocator; allocator.reexec_with_jemalloc(); "
             "print(os.environ.get('MALLOC_CONF', '-'))")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.ALLOCATOR_ENV,
                          allocator.REEXEC_ENV)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == allocator.DEFAULT_MALLOC_CONF


def test_active_reads_the_mapped_libraries(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.active(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.active(maps) == "glibc"
    assert allocator.active(tmp_path / "absent") == "system"


def test_unknown_choice_is_one_line_from_the_command():
    env = {**os.environ, "PYTHONPATH": str(REPO), allocator.ALLOCATOR_ENV: "tcmalloc-please"}
    proc = subprocess.run([sys.executable, "-m", "training", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("hff-train: error: HFF_ALLOCATOR='tcmalloc-please': expected "
                                   "one of jemalloc, system")
