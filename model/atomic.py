"""Atomic file writes: write a temp file beside the target, fsync, then rename over it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once: mkstemp creates 0600 files, we want the usual mode


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `target` in one rename."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_with(target: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Atomically create `target` with `writer(tmp_path)`."""
    with atomic_path(target) as tmp:
        writer(tmp)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_with(target, lambda p: p.write_text(text))


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2) + "\n")
