"""The Prefect server the whole session ran against logged no traceback from its own services.

Named to run last among the integration tests: by then every flow, deployment, schedule,
trigger and worker of the session has gone through this server. A scheduler or trigger service
failing on every loop (as Prefect 3.8.8's scheduler did with SQLAlchemy 2.1) shows up here even
when no test waits for that service.

One kind of error record is contention, not a broken service: SQLite's "database is locked"
when a write (e.g. a worker's heartbeat) loses the race for the single writer lock on a busy
2-core machine; the next write succeeds. Those are counted and printed, and must stay rare;
every other error record with a traceback fails the test.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

#: where a log record starts ("HH:MM:SS.mmm | LEVEL | ..."); text between two starts belongs
#: to the first (a traceback printed outside any record stays in the segment before it)
_RECORD_START = re.compile(r"^(?=\d\d:\d\d:\d\d\.\d+ \| )", re.MULTILINE)
_SQLITE_CONTENTION = "(sqlite3.OperationalError) database is locked"
MAX_CONTENTION_RECORDS = 5


def _final_exception(segment: str) -> str:
    """The last exception line of a log segment (the end of a chain of tracebacks)."""
    lines = [m.group(0) for m in re.finditer(r"^[A-Za-z_][\w.]*: .*$", segment, re.MULTILINE)]
    return lines[-1] if lines else ""


def test_the_server_log_has_no_traceback(prefect_server):
    text = prefect_server.log_path.read_text(errors="replace")
    assert "View the API reference documentation" in text, "the server log lacks its banner"
    segments = _RECORD_START.split(text)
    failing = [r for r in segments if "Traceback (most recent call last)" in r]
    contention = [r for r in failing if _SQLITE_CONTENTION in _final_exception(r)]
    broken = [r for r in failing if r not in contention]
    if contention:
        print(f"{len(contention)} SQLite contention record(s): "
              + "; ".join(r.splitlines()[0][:140] for r in contention))
    excerpts = "\n---\n".join(r[:2500] for r in broken[:3])
    assert not broken, f"{len(broken)} error record(s) with a traceback in " \
                       f"{prefect_server.log_path}:\n{excerpts}"
    assert len(contention) <= MAX_CONTENTION_RECORDS, "SQLite contention is not rare here"
    assert "bulk_dml" not in text
