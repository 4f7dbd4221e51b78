"""Which malloc a training process runs on: jemalloc when the system has it, glibc's otherwise.

A CPU training step allocates and frees tens of MiB of activations per block. glibc's heap keeps
what is freed and fragments, so the resident set climbs well above the live tensors, by an
amount that changes from run to run; jemalloc (its defaults: allocations of 8 MiB and more in
their own arena, returned at once) holds less and steadier, at glibc's speed or better (README,
"Training memory"). A malloc has to be chosen before the process starts, so `hff-train`
re-executes itself once with jemalloc preloaded (`LD_PRELOAD`) when it is installed
(`apt-get install libjemalloc2`) and not loaded yet; without it, or with HFF_ALLOCATOR=system,
training runs on the system's malloc as before. MALLOC_CONF, when set, still tunes jemalloc
(returning every freed page at once, `dirty_decay_ms:0,muzzy_decay_ms:0`, lowers the resident
set further but costs a third of the step's speed in page faults here).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ALLOCATOR_ENV = "HFF_ALLOCATOR"  # "jemalloc" (the default: used when installed) or "system"
CHOICES = ("jemalloc", "system")
REEXEC_ENV = "HFF_ALLOCATOR_REEXEC"  # set in the re-executed process: never a second time
# Malloc libraries told apart by the shared object mapped into the process.
KNOWN = {"libjemalloc": "jemalloc", "libtcmalloc": "tcmalloc", "libmimalloc": "mimalloc"}


class AllocatorError(ValueError):
    """HFF_ALLOCATOR holds a value this module does not know."""


def requested(env: Mapping[str, str] = os.environ) -> str:
    choice = env.get(ALLOCATOR_ENV, "jemalloc").strip().lower() or "jemalloc"
    if choice not in CHOICES:
        raise AllocatorError(f"{ALLOCATOR_ENV}={env[ALLOCATOR_ENV]!r}: expected one of "
                             f"{', '.join(CHOICES)}")
    return choice


def find_jemalloc() -> str | None:
    """The jemalloc shared library's name as the dynamic loader finds it, or None."""
    return ctypes.util.find_library("jemalloc")


def active(maps: Path = Path("/proc/self/maps")) -> str:
    """The malloc this process runs on: "jemalloc", "tcmalloc", ... or "glibc" (the default)."""
    try:
        text = maps.read_text()
    except OSError:  # not Linux: whatever the platform's malloc is
        return "system"
    return next((name for lib, name in KNOWN.items() if lib in text), "glibc")


def preload_env(env: Mapping[str, str], library: str) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD, marked so the re-executed process does not
    try again."""
    preload = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, REEXEC_ENV: "1"}


def reexec_with_jemalloc(argv: list[str] | None = None) -> None:
    """Replace this process by the same command with jemalloc preloaded, when it is wanted,
    installed and not loaded yet; return (and run on the system's malloc) otherwise."""
    env = os.environ
    if (sys.platform != "linux" or requested(env) != "jemalloc" or active() == "jemalloc"
            or env.get(REEXEC_ENV)):
        return
    library = find_jemalloc()
    if library is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, preload_env(env, library))
