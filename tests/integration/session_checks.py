"""Checks of what the whole session left behind, run when a test session (or an xdist
worker's session) ends, against that session's own Prefect server and Prefect home:

- ``server_log_problems``: the server logged no traceback from its own services (a scheduler
  or trigger service failing on every loop, as Prefect 3.8.8's scheduler did with SQLAlchemy
  2.1, shows up here even when no test waits for that service);
- ``phi_hits``: no patient identifier, accession number or password reached Prefect's
  database, result storage or logs.

They run at the end of the session rather than as "last" tests because the suite runs in
parallel workers (pytest-xdist), each with a server of its own: a test named to run last only
sees its own worker, and only up to the moment it runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

#: where a log record starts ("HH:MM:SS.mmm | LEVEL | ..."); text between two starts belongs
#: to the first (a traceback printed outside any record stays in the segment before it)
_RECORD_START = re.compile(r"^(?=\d\d:\d\d:\d\d\.\d+ \| )", re.MULTILINE)
#: contention, not a broken service: SQLite's single writer lock lost by a write (e.g. a
#: worker's heartbeat) on a busy 2-core machine; the next write succeeds. Must stay rare.
_SQLITE_CONTENTION = "(sqlite3.OperationalError) database is locked"
MAX_CONTENTION_RECORDS = 5
#: a race inside Prefect 3.9.1's server, not a broken service: ``evaluate_proactive_triggers``
#: (prefect/server/events/triggers.py) loops over a snapshot of the loaded triggers and awaits
#: between them; an automation with a proactive trigger (``setup``'s zombie-run automation)
#: deleted or replaced meanwhile (the suite's ``setup``, ``serve --replace`` and deployment
#: teardowns do that) is garbage collected, and the loop's next ``trigger.automation`` (a
#: weak reference) asserts. The loop runs again 5 s later on the current triggers. Seen once
#: in about ten suite runs; must stay rare.
_PROACTIVE_TRIGGER_RACE = "AssertionError: Trigger._automation has been garbage collected"
MAX_TRIGGER_RACE_RECORDS = 2


def _final_exception(segment: str) -> str:
    """The last exception line of a log segment (the end of a chain of tracebacks)."""
    lines = [m.group(0) for m in re.finditer(r"^[A-Za-z_][\w.]*: .*$", segment, re.MULTILINE)]
    return lines[-1] if lines else ""


def server_log_problems(log_path: Path) -> str | None:
    """What is wrong with a Prefect server's log, or None: a missing banner, an error record
    with a traceback (other than rare SQLite contention and rare occurrences of Prefect's
    proactive-trigger race), or the 3.8.8 ``bulk_dml`` failure."""
    text = log_path.read_text(errors="replace")
    if "View the API reference documentation" not in text:
        return f"the server log {log_path} lacks its banner"
    failing = [r for r in _RECORD_START.split(text) if "Traceback (most recent call last)" in r]
    contention = [r for r in failing if _SQLITE_CONTENTION in _final_exception(r)]
    race = [r for r in failing if "evaluate_proactive_triggers" in r
            and _final_exception(r) == _PROACTIVE_TRIGGER_RACE]
    broken = [r for r in failing if r not in contention and r not in race]
    if broken:
        excerpts = "\n---\n".join(r[:2500] for r in broken[:3])
        return f"{len(broken)} error record(s) with a traceback in {log_path}:\n{excerpts}"
    if len(contention) > MAX_CONTENTION_RECORDS:
        return (f"{len(contention)} SQLite contention records in {log_path} (at most "
                f"{MAX_CONTENTION_RECORDS} expected): "
                + "; ".join(r.splitlines()[0][:140] for r in contention))
    if len(race) > MAX_TRIGGER_RACE_RECORDS:
        return (f"{len(race)} records of Prefect's proactive-trigger race in {log_path} (at "
                f"most {MAX_TRIGGER_RACE_RECORDS} expected)")
    if "bulk_dml" in text:
        return f"the scheduler's bulk_dml failure is in {log_path}"
    return None


def prefect_files() -> list[Path]:
    """Every file of this process's Prefect home and of its server's database directory."""
    import prefect.settings as settings

    db_url = settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    db = Path(db_url.split(":///", 1)[1]) if db_url and ":///" in db_url else None
    assert db is not None and db.exists(), "the test server's database was not found"
    roots = [Path(settings.PREFECT_HOME.value()), db.parent]
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def phi_hits(needles: Iterable[str], console: str = "") -> list[tuple[str, str]]:
    """``(where, needle)`` for each needle found in Prefect's files or the console text."""
    wanted = [n for n in set(needles) if n]
    hits = []
    for path in prefect_files():
        data = path.read_bytes()
        hits += [(str(path), n) for n in wanted if n.encode() in data]
    return hits + [("console", n) for n in wanted if n in console]
