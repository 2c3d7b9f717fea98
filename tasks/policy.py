"""What every Orthanc task shares: retries, run names and patient-data safety.

``orthanc_task`` is ``prefect.task`` with this project's defaults:

* retries with exponential backoff and jitter, **only** for errors the client marks transient
  (unreachable server or PACS, 502-504); a refused move or a failed job is not retried;
* run names built from Orthanc IDs or hashes of UIDs, never from DICOM values;
* no result caching or persistence (results may hold tags; inputs may hold UIDs);
* any exception that is not a ``SafeMessageError`` (the client's errors, ``DeidError``,
  ``CohortError``, ``CohortTooBroad``, ``SiteError``, ``ModalityLimitMissing``...: messages
  built without patient data) is replaced by one that names only its type, because Prefect
  pickles a failed task's exception into its storage and shows its message in the UI.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from prefect_orthanc.orthanc_client import SafeMessageError
from prefect_orthanc.orthanc_client.retrieval import uid_key

__all__ = ["TaskFailure", "is_transient", "orthanc_task", "short_id", "uid_key"]

P = ParamSpec("P")
R = TypeVar("R")


class TaskFailure(RuntimeError):
    """An unexpected error inside a task, stripped of its message (it may hold patient data)."""

    def __init__(self, task_name: str, error_type: str) -> None:
        super().__init__(f"{task_name} failed with {error_type}; details withheld (may hold PHI)")
        self.task_name, self.error_type = task_name, error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskFailure, (self.task_name, self.error_type))


# Errors whose messages are built by this project from IDs and counts only (one base class;
# TimeoutError: the waits' own messages).
_PASS_THROUGH = (SafeMessageError, TimeoutError)


def is_transient(task: Task[..., Any], task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is transient."""
    error = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # pragma: no cover - unreadable state: do not retry blindly
            return False
    # retry_later False: the client already retried it (e.g. a rejected association, which a
    # wrong AET makes permanent); a task retry would only multiply the attempts
    return bool(getattr(error, "transient", False) and getattr(error, "retry_later", True))


def short_id(orthanc_id: str) -> str:
    """First 8 characters of an Orthanc ID: enough to find it, short enough for a run name."""
    return str(orthanc_id)[:8]


def _sanitized(fn: Callable[P, R], name: str) -> Callable[P, R]:
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return await fn(*args, **kwargs)
            except _PASS_THROUGH:
                raise
            except Exception as error:
                raise TaskFailure(name, type(error).__name__) from None
        return cast("Callable[P, R]", run_async)  # R is the coroutine run_async returns

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except Exception as error:
            raise TaskFailure(name, type(error).__name__) from None
    return run


def orthanc_task(*, name: str, run_name: Callable[[dict[str, Any]], str] | None = None,
                 retries: int = 3, retry_delay: float = 2.0,
                 **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """Decorate an Orthanc task with this project's retry, naming and PHI policy.

    ``run_name`` receives the call's parameters and must build a name from Orthanc IDs or
    hashes only (see ``short_id`` and ``uid_key``). The result is Prefect's ``Task[P, R]``: calls,
    ``.submit`` and ``.map`` are typed with the function's own parameters and result.
    """

    def decorate(fn: Callable[P, R]) -> Task[P, R]:
        task_run_name: Any = None
        if run_name is not None:
            def task_run_name(parameters: dict[str, Any]) -> str:
                return run_name(parameters)
        return task(
            name=name,
            task_run_name=task_run_name,
            retries=retries,
            retry_delay_seconds=exponential_backoff(backoff_factor=retry_delay),
            retry_jitter_factor=0.5,
            retry_condition_fn=is_transient,
            cache_policy=NO_CACHE,
            persist_result=False,
            log_prints=False,
            **options,
        )(_sanitized(fn, name))

    return decorate
