"""Prefect Variables written safely by concurrent runs.

Prefect's ``Variable.set(..., overwrite=True)`` reads the variable, then creates it when it is
missing: two runs creating the same variable at once both read "missing", and the second
create fails with ``ObjectAlreadyExists`` (HTTP 409). That happens here whenever two flow runs
share a cursor (two watcher deployments of one server, a scheduled and an ad-hoc run) or two
retrievals of one study start together. ``put_variable`` is the one way this package writes a
Variable: an upsert that treats "someone else just created it" as "now update it", in one
request when the variable is new (create) or two when it exists (create refused, update),
never Prefect's read first. ``delete_variable`` removes one. Both ask again at once after a
write conflict on a SQLite-backed server (``tasks.server_writes``).
"""

from __future__ import annotations

from typing import Any

import httpx

from prefect_orthanc.tasks.server_writes import write

__all__ = ["delete_variable", "put_variable"]


def put_variable(name: str, value: Any, *, tags: list[str] | None = None) -> bool:
    """Create or overwrite the Prefect Variable ``name`` (JSON-serialisable ``value``);
    True when it was created, False when one of that name was there and is overwritten.

    Example:
        ```python
        put_variable("orthanc_changes_events_research", 1234)
        ```
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            write(client, "POST", "/variables/",
                  json={"name": name, "value": value, "tags": tags or []})
            return True
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 409:  # 409: it exists: update it
                raise
            update: dict[str, Any] = {"value": value}
            if tags is not None:
                update["tags"] = tags
            write(client, "PATCH", "/variables/name/{name}", path_params={"name": name},
                  json=update)
            return False


def delete_variable(name: str) -> None:
    """Delete the Prefect Variable ``name``; nothing when it does not exist.

    Example:
        ```python
        delete_variable("orthanc_retrieving_0123456789ab")
        ```
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            write(client, "DELETE", "/variables/name/{name}", path_params={"name": name})
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 404:
                raise
