"""Final states for runs that end Failed or Cancelled on purpose, with their report.

A flow that returns ``Failed(data=report)`` or ``Cancelled(data=report)`` makes Prefect 3.9's
engine try to raise the report as an exception: it logs "Unexpected result for failed state:
<the report's repr>" with a 40-line traceback, in the run's logs (stored by Prefect) and in the
worker's output. The repr would carry whatever the report holds (a sharing report pairs source
IDs with pseudonyms). So a purposeful failure's data is a ``RunIncomplete``: an exception whose
message is the state's one-line, identifier-free message, and which carries the report only in
memory (it is never pickled with it, so Prefect's result storage gets the message alone).

The engine still logs "Engine execution exited with unexpected exception" with a traceback of
its own code for such a state, in the run's logs and the worker's output, although the run's
"Finished in state Failed('...')" line already says everything: ``PurposefulFailureFilter``
(installed on ``prefect.flow_runs`` and ``prefect.task_runs`` when this module is imported,
which every flow module does) drops exactly those records, and keeps only the one-line
message of a task that stopped on purpose (``flows.window.OutsideWindow``: the window
closed before its next PACS exchange).
An exception a flow raises is not a ``RunIncomplete`` and keeps its traceback.

    state = collect_cohort(cohort_file="cohort.csv", return_state=True)
    if not state.is_completed():
        report = report_of(state)       # CollectionReport, or None if the run did not start
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import State
from prefect.states import Cancelled, Failed

from prefect_orthanc.orthanc_client import SafeMessageError

__all__ = [
    "PurposefulFailureFilter",
    "RunIncomplete",
    "cancel_run",
    "fail_run",
    "install_log_filter",
    "report_of",
    "stop_run",
]


class RunIncomplete(SafeMessageError):
    """A run ended Failed or Cancelled on purpose; ``str()`` is its PHI-free message and
    ``report`` its report in this process (``None`` once pickled)."""

    #: recognised by the log filter even when Prefect loads a flow file a second time under
    #: another module name (deployment entrypoints are loaded by path), which makes a second,
    #: distinct RunIncomplete class
    purposeful_failure = True

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self) -> tuple[type[RunIncomplete], tuple[str]]:
        return (type(self), (str(self),))  # the report stays out of pickles (result storage)


def fail_run(message: str, report: Any = None) -> State[Any]:
    """A Failed state with ``message`` (identifier-free) and ``report`` kept in memory."""
    return Failed(message=message, data=RunIncomplete(message, report))


def cancel_run(message: str, report: Any = None) -> State[Any]:
    """A Cancelled state with ``message`` (identifier-free) and ``report`` kept in memory."""
    return Cancelled(message=message, data=RunIncomplete(message, report))


def stop_run(stage: str, error: SafeMessageError) -> State[Any]:
    """A Failed state for an operational error that stopped a flow's work (a PACS slot wait
    past its bound, a server that does not answer...): its PHI-free message, which says what
    to fix, in one line of the run's log, and no traceback.

    Example:
        ```python
        try:
            ...
        except SafeMessageError as error:
            return stop_run("collection stopped", error)
        ```
    """
    from prefect import get_run_logger

    message = f"{stage}: {error}"
    get_run_logger().error(message)
    return fail_run(message)


def report_of(state: State[Any]) -> Any:
    """The report of a finished run, whatever its final state (``None`` if it has none)."""
    result = state.result(raise_on_failure=False)
    return result.report if isinstance(result, RunIncomplete) else result


class PurposefulFailureFilter(logging.Filter):
    """For log records whose exception is purposeful (a ``RunIncomplete``, or any exception
    with ``purposeful_failure = True`` such as ``flows.window.OutsideWindow``): on
    ``prefect.flow_runs`` drop the record (the engine's second report of a state the run
    already logged in one line); on ``prefect.task_runs`` keep its one-line message and drop
    the traceback (a task refused on purpose is not a crash)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not getattr(exc, "purposeful_failure", False):
            return True
        if record.name == "prefect.flow_runs":
            return False
        record.exc_info, record.exc_text = None, None
        return True


#: the Prefect loggers the filter is installed on
_FILTERED = ("prefect.flow_runs", "prefect.task_runs")


def install_log_filter() -> None:
    """Add ``PurposefulFailureFilter`` to Prefect's flow-run and task-run loggers once
    (idempotent, also when this module is loaded twice under two names)."""
    for name in _FILTERED:
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == "PurposefulFailureFilter" for f in logger.filters):
            logger.addFilter(PurposefulFailureFilter())


install_log_filter()  # every flow module imports this one, whatever the entrypoint loads
