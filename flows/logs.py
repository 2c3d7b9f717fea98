"""Failed runs that say why in one line, without a traceback of Prefect's internals.

A flow of this project that fails *on purpose* returns a ``Failed`` state whose message says
what to fix (``collection not started: cohort file not found: ...``), and logs that line. In a
deployment run Prefect's engine then asks the state for its result, gets ``FailedRun`` back
and logs "Engine execution exited with unexpected exception" with a 40-line traceback of its
own code, in the run's logs and the worker's output. ``FailedRun`` only arises from a state a
flow returned (an exception the flow raised is re-raised as itself and keeps its traceback),
so that record carries nothing the "Finished in state Failed(...)" line does not: this filter
drops it. Installed on Prefect's flow-run logger when ``flows`` is imported.
"""

from __future__ import annotations

import logging

__all__ = ["ReturnedFailureFilter", "install"]


class ReturnedFailureFilter(logging.Filter):
    """Drop log records whose exception is Prefect's ``FailedRun`` (a returned Failed state)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from prefect.exceptions import FailedRun

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, FailedRun)


def install() -> None:
    """Add the filter to ``prefect.flow_runs`` once (idempotent)."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, ReturnedFailureFilter) for f in logger.filters):
        logger.addFilter(ReturnedFailureFilter())
