"""Where the time goes: exclusive (self) time per category, per thread, by wrapping functions.

``Timers.wrap("package.module:Class.method", category)`` replaces the attribute with a timed
wrapper; time spent in a wrapped call nested inside another is counted once, for the inner
category. ``totals()`` gives thread-seconds by category (with 4 threads on 2 cores their sum
exceeds the wall time) and ``counts()`` the number of calls. ``restore()`` puts everything
back. For benchmarks only: it slows each wrapped call by a few microseconds.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

__all__ = ["Timers"]


class Timers:
    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._patched: list[tuple[Any, str, Any]] = []

    def _stack(self) -> list[list[Any]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def add(self, category: str, seconds: float, calls: int = 1) -> None:
        with self._lock:
            self._totals[category] += seconds
            self._counts[category] += calls

    def timed(self, category: str | Callable[..., str], fn: Callable[..., Any]
              ) -> Callable[..., Any]:
        timers = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = category(*args, **kwargs) if callable(category) else category
            stack = timers._stack()
            frame: list[Any] = [name, time.perf_counter(), 0.0]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                elapsed = time.perf_counter() - frame[1]
                timers.add(name, elapsed - frame[2])
                if stack:
                    stack[-1][2] += elapsed

        return wrapper

    def timed_async(self, category: str | Callable[..., str], fn: Callable[..., Any]
                    ) -> Callable[..., Any]:
        """Wall time of each awaited call (not exclusive: it overlaps the other threads)."""
        timers = self

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = category(*args, **kwargs) if callable(category) else category
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                timers.add(name, time.perf_counter() - started)

        return wrapper

    def wrap(self, target: str, category: str | Callable[..., str], *,
             is_async: bool = False) -> bool:
        """Time ``module:attr`` or ``module:Class.attr``; False when it does not exist."""
        module_name, _, attr_path = target.partition(":")
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            return False
        *parents, attr = attr_path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
            if owner is None:
                return False
        original = owner.__dict__.get(attr) if isinstance(owner, type) else \
            getattr(owner, attr, None)
        if original is None:
            return False
        fn = original.__func__ if isinstance(original, staticmethod) else original
        wrapped = (self.timed_async if is_async else self.timed)(category, fn)
        if isinstance(original, staticmethod):
            wrapped = staticmethod(wrapped)
        setattr(owner, attr, wrapped)
        self._patched.append((owner, attr, original))
        return True

    def restore(self) -> None:
        while self._patched:
            owner, attr, original = self._patched.pop()
            setattr(owner, attr, original)

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._totals.clear()
            self._counts.clear()
