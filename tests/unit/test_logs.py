"""A Failed state a flow returns is logged by its own one-line message, not by a traceback of
Prefect's ``FailedRun``; exceptions a flow raises keep their traceback."""

from __future__ import annotations

import logging
import sys

import flows  # noqa: F401 - installs the filter
from flows.logs import ReturnedFailureFilter


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                             "Engine execution exited with unexpected exception", None, info)


def test_returned_failed_states_lose_the_traceback_and_raised_errors_keep_it():
    from prefect.exceptions import FailedRun

    installed = [f for f in logging.getLogger("prefect.flow_runs").filters
                 if isinstance(f, ReturnedFailureFilter)]
    assert len(installed) == 1
    (check,) = installed
    assert not check.filter(_record(FailedRun("collection not started: cohort file not found")))
    assert check.filter(_record(ValueError("a real bug")))
    plain = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                              "collection not started: ...", None, None)
    assert check.filter(plain)
