"""The process pool that verifies packages off the flow's threads (``run_in_pool``).

A sharing run works on several studies at once, in threads, next to the two Orthanc servers
on the same cores; the package scan and the source identifiers are pure Python and would
hold the GIL that the threads' HTTP calls need. They run in worker processes instead: a
``spawn`` pool (fresh interpreters, never a fork of the flow's threads), one worker per
core, made on first use and kept for the process's later runs. What crosses to a worker is
bytes and paths; what comes back is a PHI-free ``ScanReport``. Workers die with the run's
process (a killed run leaves none behind). A pool that cannot start, or breaks (a worker
killed), is dropped and the call runs in the calling thread: the same function, the same
result.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

__all__ = ["run_in_pool", "start_pool"]

R = TypeVar("R")
_lock = threading.Lock()
_pool: Executor | None = None
_logger = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """In a worker: exit as soon as the run's process is gone (the worker is then adopted
    by another process), so a killed run leaves no worker behind holding its pipes. Polled:
    ``PR_SET_PDEATHSIG`` would fire when the *thread* that started the worker ends."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def start_pool() -> Executor | None:
    """The pool, started when first asked for (None where processes cannot be started)."""
    global _pool
    with _lock:
        if _pool is None:
            try:
                context = multiprocessing.get_context("spawn")
                _pool = ProcessPoolExecutor(_workers(), mp_context=context,
                                            initializer=_die_with_parent)
                _pool.submit(int).result(timeout=60)  # started and answering
            except Exception as error:  # no processes here: the callers' threads do it
                _logger.warning("no process pool for the package scans (%s): scanning in "
                                "the flow's threads", type(error).__name__)
                _pool = None
        return _pool


def run_in_pool(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)`` in a worker process (``fn`` importable, arguments and result
    picklable), or in this thread when there is no pool or it broke."""
    global _pool
    pool = start_pool()
    if pool is not None:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool:
            with _lock:
                if _pool is pool:
                    _pool = None
            _logger.warning("the package scan's process pool broke: scanning in this thread")
    return fn(*args)
