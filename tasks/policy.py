"""What every Orthanc task and flow shares: retries, run names and patient-data safety.

``orthanc_task`` is ``prefect.task`` with this project's defaults:

* retries with exponential backoff and jitter, **only** for failures that no lower layer
  already retried (``is_transient``): a remote peer's or a job's transient failure (a PACS
  that does not answer, a C-STORE job that could not reach its destination). A blip of
  Orthanc itself on a safe request is the client's to retry (``OrthancSettings.retries``),
  and what it retried comes back with ``retry_later = False``: one layer per failure, never
  both multiplied. A refused move, a failed query or an unknown outcome is not retried;
* run names built from Orthanc IDs or hashes of UIDs, never from DICOM values;
* no result caching or persistence (results may hold tags; inputs may hold UIDs);
* errors are shown by ``shown_error``: a ``SafeMessageError`` (the client's errors,
  ``DeidError``, ``CohortError``, ``CohortTooBroad``, ``SiteError``, ``ModalityLimitMissing``...:
  messages built without patient data) keeps its message, also when pydantic wrapped it in a
  ``ValidationError``, but loses its chained causes (they may hold anything); every other
  exception is replaced by a ``TaskFailure`` that names only its type, because Prefect
  pickles a failed run's exception into its storage and shows its message in the UI.

``orthanc_flow`` is ``prefect.flow`` with the same error policy, for the code a flow runs
outside its tasks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from prefect import Flow, State, Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import file_hash
from pydantic import ValidationError

from prefect_orthanc.orthanc_client import SafeMessageError
from prefect_orthanc.orthanc_client.retrieval import uid_key

__all__ = [
    "TaskFailure",
    "is_transient",
    "orthanc_flow",
    "orthanc_task",
    "short_id",
    "shown_error",
    "uid_key",
]

P = ParamSpec("P")
R = TypeVar("R")


class TaskFailure(SafeMessageError, RuntimeError):
    """An unexpected error inside a task or flow run, stripped of its message (it may hold
    patient data): only the run's name and the error's type are kept. Its own message is
    PHI-free, so an enclosing flow shows it as is."""

    def __init__(self, task_name: str, error_type: str) -> None:
        super().__init__(f"{task_name} failed with {error_type}; details withheld (may hold PHI)")
        self.task_name, self.error_type = task_name, error_type

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskFailure, (self.task_name, self.error_type))


# Errors whose messages are built by this project from IDs and counts only (one base class;
# TimeoutError: the waits' own messages).
_PASS_THROUGH = (SafeMessageError, TimeoutError)


def _safe(error: BaseException) -> BaseException | None:
    if isinstance(error, _PASS_THROUGH):
        return error
    if isinstance(error, ValidationError):
        # a SafeMessageError raised in a validator arrives wrapped; the wrapper's own text
        # holds the input values, so only the wrapped messages are kept (never ``loc``:
        # a dict's keys may be identifiers)
        inner = [item.get("ctx", {}).get("error") for item in error.errors()]
        if inner and all(isinstance(e, SafeMessageError) for e in inner):
            if len(inner) == 1:
                return inner[0]
            return SafeMessageError("; ".join(dict.fromkeys(str(e) for e in inner)))
    return None


def shown_error(name: str, error: BaseException) -> BaseException:
    """The exception a run named ``name`` raises in place of ``error``: a ``SafeMessageError``
    (also one pydantic wrapped in a ``ValidationError``) with its message but without the
    causes chained to it (``raise Safe(...)`` inside an ``except`` chains the original, and
    Prefect logs the whole chain with the traceback); anything else as a ``TaskFailure``
    naming only its type.

    >>> str(shown_error("find", KeyError("PAT-0042")))
    'find failed with KeyError; details withheld (may hold PHI)'
    """
    safe = _safe(error)
    if safe is None:
        return TaskFailure(name, type(error).__name__)
    safe.__cause__ = safe.__context__ = None
    safe.__suppress_context__ = True
    return safe


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
            except Exception as error:
                raise shown_error(name, error) from None
        return cast("Callable[P, R]", run_async)  # R is the coroutine run_async returns

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            raise shown_error(name, error) from None
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


T = TypeVar("T")


class FlowDecorator(Protocol):
    """What ``orthanc_flow(...)`` returns. A flow function that ends by returning a
    ``State[T]`` (to set its final state: ``flows.states.fail_run``, ``Completed(data=...)``)
    gives a ``Flow[P, T]``: calling the flow returns the state's data, as Prefect does."""

    @overload
    def __call__(self, fn: Callable[P, State[T]]) -> Flow[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Flow[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Flow[P, Any]: ...


def orthanc_flow(*, name: str, **options: Any) -> FlowDecorator:
    """``prefect.flow`` with this project's error policy (``shown_error``) on the code the flow
    runs itself: a failed flow run shows a ``SafeMessageError``'s message, or only the type
    of any other exception. ``options`` are ``prefect.flow``'s.

    Example:
        ```python
        @orthanc_flow(name="pull-study", flow_run_name="pull-{study_key}")
        def pull_study(study_key: str) -> None:
            ...
        ```
    """

    def decorate(fn: Callable[P, Any]) -> Flow[P, Any]:
        run = _sanitized(fn, name)
        # Prefect resolves string annotations (``from __future__ import annotations``) in the
        # module of the function it is given, here this one: hand it the flow's own, resolved
        run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
        source = inspect.getsourcefile(fn)
        if source and "version" not in options:  # Prefect's default: a hash of the flow's file
            options["version"] = file_hash(source)
        return Flow(run, name=name, **options)

    return decorate
