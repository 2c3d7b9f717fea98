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

    Example:
        ```python
        add_labels(creds, "Study", study_id, ["cohort-7"])
        ```
    """
    with credentials.get_client() as orthanc:
        attach_labels(orthanc, level, resource_id, labels)
        return sorted(labels_of(orthanc, level, resource_id))
