"""Stopping child processes started in a session of their own (``start_new_session=True``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["stop_group"]


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
