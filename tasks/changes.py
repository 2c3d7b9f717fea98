"""Tasks that follow Orthanc's change log from a cursor kept in a Prefect Variable.

Read a batch, handle it, then advance the cursor: a crash between the two re-reads the batch
instead of losing it (handlers must be idempotent, which Orthanc IDs make easy).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from prefect.variables import Variable
from pydantic import BaseModel, ConfigDict

from prefect_orthanc.orthanc_client import Change, Orthanc
from prefect_orthanc.tasks.credentials import OrthancCredentials
from prefect_orthanc.tasks.policy import orthanc_task
from prefect_orthanc.tasks.variables import put_variable

__all__ = [
    "ChangesBatch",
    "advance_changes_cursor",
    "cursor_position",
    "cursor_variable",
    "read_changes",
]


class ChangesBatch(BaseModel):
    """Changes after the cursor, and the sequence number to advance the cursor to."""

    model_config = ConfigDict(frozen=True)

    changes: tuple[Change, ...]
    since: int
    next_since: int
    done: bool


def cursor_variable(cursor: str) -> str:
    """The Prefect Variable holding a cursor's position."""
    return "orthanc_changes_" + re.sub(r"[^a-z0-9_]+", "_", cursor.lower()).strip("_")


def cursor_position(orthanc: Orthanc, cursor: str, start: int | None = None) -> int:
    """Where a cursor stands; a new one is created at ``start``, or at the end of the change
    log when ``start`` is None (only future changes are seen)."""
    name = cursor_variable(cursor)
    since = Variable.get(name, default=None)
    if since is None:
        since = orthanc.changes(0, 0).last if start is None else start
        put_variable(name, int(since))
    return int(since)


@orthanc_task(name="read_changes", run_name=lambda p: f"changes-{p.get('cursor', 'default')}")
def read_changes(credentials: OrthancCredentials, cursor: str = "default", *,
                 change_types: Sequence[str] = (), limit: int = 100,
                 start: int | None = None) -> ChangesBatch:
    """Read changes after the cursor (without advancing it), optionally only some types.

    A new cursor starts at ``start``, or at the end of the log when ``start`` is None (only
    future changes are seen).

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        cursor: The cursor's name; its position is kept in the Prefect Variable
            ``orthanc_changes_<name>``.
        change_types: Orthanc change types to keep (e.g. ``"StableStudy"``); empty keeps all.
        limit: At most this many changes are read (before filtering by type).
        start: Where a new cursor starts (a change sequence number); None starts at the end of the
            log.

    Returns:
        The changes after the cursor (``ChangesBatch``), with ``changes``, the position read from
        (``since``), the one to advance to (``next_since``) and whether the log was read to its end
        (``done``).

    Raises:
        OrthancError: Orthanc did not answer or refused (e.g. ``OrthancUnavailable``, retried by
            Prefect first).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        batch = read_changes(creds, "new-studies", change_types=["StableStudy"])
        for change in batch.changes: ...
        advance_changes_cursor("new-studies", batch.next_since)
        ```
    """
    with credentials.get_client() as orthanc:
        since = cursor_position(orthanc, cursor, start)
        page = orthanc.changes(since, limit)
    wanted = [c for c in page.changes if not change_types or c.change_type in change_types]
    return ChangesBatch(changes=tuple(wanted), since=since, next_since=page.last,
                        done=page.done)


@orthanc_task(name="advance_changes_cursor", run_name=lambda p: f"advance-{p['cursor']}")
def advance_changes_cursor(cursor: str, next_since: int) -> int:
    """Move the cursor forward (never backward) once a batch has been handled.

    Args:
        cursor: The cursor's name, as given to ``read_changes``.
        next_since: The position to move to: ``ChangesBatch.next_since`` of the handled batch.

    Returns:
        The cursor's position afterwards, ``next_since`` or the current position if it was
        further.

    Raises:
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        advance_changes_cursor("new-studies", batch.next_since)
        ```
    """
    name = cursor_variable(cursor)
    current = Variable.get(name, default=0) or 0
    position = max(int(current), int(next_since))
    put_variable(name, position)
    return position
