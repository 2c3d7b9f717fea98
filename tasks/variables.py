"""Prefect Variables written safely by concurrent runs.

Prefect's ``Variable.set(..., overwrite=True)`` reads the variable, then creates it when it is
missing: two runs creating the same variable at once both read "missing", and the second
create fails with ``ObjectAlreadyExists`` (HTTP 409). That happens here whenever two flow runs
share a cursor (two watcher deployments of one server, a scheduled and an ad-hoc run) or two
retrievals of one study start together. ``put_variable`` is the one way this package writes a
Variable: an upsert that treats "someone else just created it" as "now update it".
"""

from __future__ import annotations

from typing import Any

from prefect.exceptions import ObjectAlreadyExists
from prefect.variables import Variable

__all__ = ["put_variable"]


def put_variable(name: str, value: Any, *, tags: list[str] | None = None) -> None:
    """Create or overwrite the Prefect Variable ``name`` (JSON-serialisable ``value``).

    Example:
        ```python
        put_variable("orthanc_changes_events_research", 1234)
        ```
    """
    try:
        Variable.set(name, value, tags=tags, overwrite=True)
    except ObjectAlreadyExists:  # a concurrent writer created it between our read and create
        Variable.set(name, value, tags=tags, overwrite=True)
