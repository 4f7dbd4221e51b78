"""Which malloc a training process runs on: jemalloc when the system has it, glibc's otherwise.

A CPU training step allocates and frees tens of MiB of activations per block. glibc's heap keeps
what is freed and fragments, so the resident set climbs well above the live tensors, by an
amount that changes from run to run; jemalloc, with the settings below, holds less and steadier
and trains faster (docs/fashion-mnist.md, "Page faults"). A malloc has to be chosen before the
process starts, so `hff-train` re-executes itself once with jemalloc preloaded (`LD_PRELOAD`) when
it is installed (`apt-get install libjemalloc2`) and not loaded yet; without it, or with
HFF_ALLOCATOR=system, training runs on the system's malloc as before.

jemalloc runs with DEFAULT_MALLOC_CONF unless MALLOC_CONF is set (then the user's settings win):
- `dirty_decay_ms:-1`: keep freed pages for reuse instead of returning them over 10 s. A
  training step frees and re-allocates the same few tens of MiB every step; with jemalloc's
  decay (which counts only new dirty pages, so a steady cycle looks idle to it) about 40 MiB a
  step went back to the kernel and was faulted in again: 7,000-14,000 minor page faults a step
  on fmnist-vgg at batch 128, with glibc's malloc as with jemalloc's defaults, and none with
  this setting; the step ran 1.2-1.5x faster for both objectives (docs/fashion-mnist.md).
- `oversize_threshold:0`: no separate arena for allocations of 8 MiB and more, so the large
  maps of a network's first block (and of the evaluation batches) reuse the pages the smaller
  ones freed, and the other way round: one pool, not two that each keep their own high-water
  mark (at batch 256: 114 instead of 144 MiB of training memory for HFF, at the same speed).
The resident set then stays at the step's high-water mark for the whole run, which is what a
training process holds at every step anyway. Returning every freed page at once
(`MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0`) lowers it further but costs a third of the
step's speed in page faults here.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

ALLOCATOR_ENV = "HFF_ALLOCATOR"  # "jemalloc" (the default: used when installed) or "system"
CHOICES = ("jemalloc", "system")
# jemalloc's settings for training (module docstring): reuse freed pages, one pool for all sizes.
DEFAULT_MALLOC_CONF = "dirty_decay_ms:-1,oversize_threshold:0"
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
    """`env` with `library` first in LD_PRELOAD and jemalloc's training settings
    (DEFAULT_MALLOC_CONF) unless MALLOC_CONF is set, marked so the re-executed process does not
    try again."""
    preload = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return {"MALLOC_CONF": DEFAULT_MALLOC_CONF, **env, "LD_PRELOAD": preload, REEXEC_ENV: "1"}


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
