"""Purposeful Failed/Cancelled states: their data is a ``RunIncomplete`` whose message is the
state's one line and whose report never leaves the process (no pickle, no repr in logs); the
engine's traceback for them is filtered, a raised bug keeps its traceback."""

from __future__ import annotations

import logging
import pickle
import sys

import prefect_orthanc.flows  # noqa: F401 - installs the filter
from prefect_orthanc.flows.states import (
    PurposefulFailureFilter,
    RunIncomplete,
    cancel_run,
    fail_run,
    report_of,
)


class _Report:
    """Stands for a report holding values that must stay in the process."""

    def __repr__(self) -> str:
        return "Report(source_id='a1b2', pseudonym='PXYZ')"


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                             "Engine execution exited with unexpected exception", None, info)


def test_failed_and_cancelled_carry_the_report_in_memory_only():
    report = _Report()
    for make, kind in ((fail_run, "FAILED"), (cancel_run, "CANCELLED")):
        state = make("2/3 studies complete", report)
        assert state.type.value == kind and state.message == "2/3 studies complete"
        assert report_of(state) is report
        data = state.data
        assert isinstance(data, RunIncomplete) and str(data) == "2/3 studies complete"
        assert "source_id" not in repr(data) and "PXYZ" not in str(data)
        restored = pickle.loads(pickle.dumps(data))
        assert str(restored) == "2/3 studies complete" and restored.report is None
        assert b"PXYZ" not in pickle.dumps(data)


def test_the_engine_traceback_of_a_purposeful_failure_is_dropped_and_a_bug_keeps_it():
    installed = [f for f in logging.getLogger("prefect.flow_runs").filters
                 if isinstance(f, PurposefulFailureFilter)]
    assert len(installed) == 1
    (check,) = installed
    assert not check.filter(_record(RunIncomplete("collection not started: no cohort file")))
    assert check.filter(_record(ValueError("a real bug")))
    plain = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                              "collection not started: ...", None, None)
    assert check.filter(plain)
