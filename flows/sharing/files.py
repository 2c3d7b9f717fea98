"""Durable writes for the records that follow a delivery: an exclusive lock across threads
and processes, fsynced appends, fsynced directories."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive", "fsync_dir", "append_durably"]


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (``flock``: across threads and processes) for the
    ledger, linkage and manifest updates that follow one delivery."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_durably(path: Path, text: str, mode: int | None = None) -> None:
    """Append ``text`` to ``path`` and fsync it before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if mode is not None:
        os.chmod(path, mode)
