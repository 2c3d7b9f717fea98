"""Child processes started in a session of their own (``start_new_session=True``): stopping
them, and what a class that keeps one in ``_process`` says of it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["ChildProcess", "stop_group"]


class ChildProcess:
    """``pid`` and ``is_running`` of the child process a class keeps in ``_process``."""

    _process: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None


def stop_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGINT to the child's process group (it and what it started, e.g. ``serve``'s flow
    runs), as Ctrl-C would; SIGKILL if it is still there after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
