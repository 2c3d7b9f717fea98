"""Tasks over resources stored in Orthanc: find, delete, metadata, labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect_orthanc.orthanc_client import Level
from prefect_orthanc.tasks.credentials import OrthancCredentials
from prefect_orthanc.tasks.labels import attach_labels, labels_of
from prefect_orthanc.tasks.policy import orthanc_task, short_id

__all__ = ["add_labels", "delete_resources", "find_resource_ids", "set_metadata"]


@orthanc_task(name="find_resource_ids",
              run_name=lambda p: f"find-{Level(p['level']).value.lower()}")
def find_resource_ids(credentials: OrthancCredentials, level: Level | str,
                      query: Mapping[str, str] | None = None, *, labels: Sequence[str] = (),
                      limit: int | None = None) -> list[str]:
    """Orthanc IDs of stored resources matching a DICOM query (all pages, none lost): the
    client's ``Orthanc.find`` as a task. IDs only, never tags (a task's result may be stored
    by Prefect); read summaries with ``Orthanc.find_resources`` inside your own task.

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        level: ``"Patient"``, ``"Study"``, ``"Series"`` or ``"Instance"`` (a ``Level``).
        query: DICOM keyword to matching value (exact, wildcard or range), as in Orthanc's
            ``/tools/find``; None or empty matches everything.
        labels: Only resources with all these labels (Orthanc 1.12 or later).
        limit: At most this many IDs; None for all of them.

    Returns:
        Orthanc IDs of the matching resources, in Orthanc's order.

    Raises:
        OrthancUnsupported: ``labels`` given to a server older than Orthanc 1.12.
        OrthancError: Orthanc did not answer or refused the query.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        study_ids = find_resource_ids(creds, "Study", {"ModalitiesInStudy": "CT"})
        ```
    """
    with credentials.get_client() as orthanc:
        return orthanc.find(level, query or {}, labels=labels, limit=limit)


@orthanc_task(name="delete_resources", run_name=lambda p: f"delete-{len(p['resource_ids'])}")
def delete_resources(credentials: OrthancCredentials, resource_ids: Sequence[str]) -> int:
    """Delete resources of any level (and everything below them) in one call.

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        resource_ids: Orthanc IDs of patients, studies, series or instances; unknown IDs are
            ignored by Orthanc.

    Returns:
        How many IDs were sent for deletion (``len(resource_ids)``).

    Raises:
        OrthancError: Orthanc did not answer or refused the deletion.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        delete_resources(creds, [anonymized_study_id])
        ```
    """
    with credentials.get_client() as orthanc:
        return orthanc.delete_many(list(resource_ids))


@orthanc_task(name="set_metadata",
              run_name=lambda p: f"metadata-{p['name']}-{short_id(p['resource_id'])}")
def set_metadata(credentials: OrthancCredentials, level: Level | str, resource_id: str,
                 name: str, value: str) -> None:
    """Set a metadata value on a resource (on Orthanc < 1.12 the name must be declared in
    Orthanc's ``UserMetadata`` configuration).

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        level: ``"Patient"``, ``"Study"``, ``"Series"`` or ``"Instance"`` (a ``Level``).
        resource_id: Orthanc ID of the resource.
        name: The metadata name (declared in Orthanc's ``UserMetadata`` before 1.12).
        value: The value to store; an existing value is overwritten.

    Returns:
        None.

    Raises:
        OrthancNotFound: No such resource, or (before Orthanc 1.12) a name not declared in
            ``UserMetadata``.
        OrthancConflict: The value kept changing under concurrent writers.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        set_metadata(creds, "Study", study_id, "PrefectOrthancCollected", "cohort-7")
        ```
    """
    with credentials.get_client() as orthanc:
        orthanc.set_metadata(level, resource_id, name, value)


@orthanc_task(name="add_labels", run_name=lambda p: f"label-{short_id(p['resource_id'])}")
def add_labels(credentials: OrthancCredentials, level: Level | str, resource_id: str,
               labels: Sequence[str]) -> list[str]:
    """Attach labels to a resource, on any Orthanc version (labels from 1.12, the
    ``PrefectOrthancLabels`` metadata set before: see ``tasks.labels``); returns its labels,
    sorted.

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        level: ``"Patient"``, ``"Study"``, ``"Series"`` or ``"Instance"`` (a ``Level``).
        resource_id: Orthanc ID of the resource.
        labels: Labels to attach: 1-64 letters, digits, ``-`` or ``_`` each.

    Returns:
        Every label of the resource afterwards, sorted.

    Raises:
        OrthancUsageError: A label is not 1-64 letters, digits, ``-`` or ``_``.
        OrthancNotFound: No such resource.
        OrthancConflict: The label set kept changing under concurrent writers.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        add_labels(creds, "Study", study_id, ["cohort-7"])
        ```
    """
    with credentials.get_client() as orthanc:
        attach_labels(orthanc, level, resource_id, labels)
        return sorted(labels_of(orthanc, level, resource_id))
