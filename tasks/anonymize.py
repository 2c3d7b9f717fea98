"""Tasks that create a de-identified or modified copy of a resource inside Orthanc."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefect_orthanc.orthanc_client import Level, ModifyResult
from prefect_orthanc.tasks.credentials import OrthancCredentials
from prefect_orthanc.tasks.policy import orthanc_task, short_id

__all__ = ["anonymize_resource", "modify_resource"]


def _run_name(action: str) -> Any:
    return lambda p: f"{action}-{Level(p['level']).value.lower()}-{short_id(p['resource_id'])}"


@orthanc_task(name="anonymize_resource", run_name=_run_name("anonymize"))
def anonymize_resource(credentials: OrthancCredentials, level: Level | str, resource_id: str, *,
                       replace: Mapping[str, Any] | None = None, keep: Sequence[str] = (),
                       remove: Sequence[str] = (), force: bool = False,
                       keep_private_tags: bool = False, keep_source: bool = True,
                       dicom_version: str | None = None,
                       job_timeout: float | None = None) -> ModifyResult:
    """Anonymize a patient/study/series as an Orthanc job; returns the new resource.

    Orthanc applies the DICOM Basic Profile; ``replace`` sets tags (``force=True`` is needed
    for PatientID and UIDs). The source is kept unless ``keep_source=False``.

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        level: ``"Patient"``, ``"Study"`` or ``"Series"`` (a ``Level``).
        resource_id: Orthanc ID of the resource.
        replace: Tags to set in the copy, DICOM keyword to value (``force=True`` for PatientID
            and UIDs).
        keep: Tags to keep unchanged, by DICOM keyword.
        remove: Tags to remove, by DICOM keyword.
        force: Allow replacing PatientID and UIDs.
        keep_private_tags: Keep private tags (removed by default).
        keep_source: Keep the source resource; False deletes it once the copy exists.
        dicom_version: Orthanc's ``DicomVersion`` (which edition of the Basic Profile); default
            Orthanc's own.
        job_timeout: Seconds to wait for the Orthanc job; default the client's long timeout
            (``ORTHANC_LONG_TIMEOUT``, 600 s).

    Returns:
        The new resource (``ModifyResult``), with its Orthanc ID, level and the job that
        made it.

    Raises:
        OrthancUsageError: ``level`` is ``"Instance"`` (Orthanc answers with a file, not a
            resource).
        OrthancNotFound: No such resource.
        OrthancJobFailed: Orthanc could not do it (not retried).
        OrthancJobTimeout: The job did not finish within ``job_timeout``; it keeps running in
            Orthanc.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        new = anonymize_resource(creds, "Study", study_id,
                                 replace={"PatientID": "P-7f3a", "PatientName": "P-7f3a"},
                                 force=True)
        print(new.id)
        ```
    """
    with credentials.get_client() as orthanc:
        job_id = orthanc.anonymize(level, resource_id, replace=replace, keep=keep, remove=remove,
                                   force=force, keep_private_tags=keep_private_tags,
                                   keep_source=keep_source, dicom_version=dicom_version)
        return orthanc.modified_resource(orthanc.wait_for_job(str(job_id), timeout=job_timeout))


@orthanc_task(name="modify_resource", run_name=_run_name("modify"))
def modify_resource(credentials: OrthancCredentials, level: Level | str, resource_id: str, *,
                    replace: Mapping[str, Any] | None = None, keep: Sequence[str] = (),
                    remove: Sequence[str] = (), force: bool = False,
                    keep_source: bool = True, job_timeout: float | None = None
                    ) -> ModifyResult:
    """Modify tags of a patient/study/series as an Orthanc job; returns the new resource.

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        level: ``"Patient"``, ``"Study"`` or ``"Series"`` (a ``Level``).
        resource_id: Orthanc ID of the resource.
        replace: Tags to set in the copy, DICOM keyword to value (``force=True`` for PatientID
            and UIDs).
        keep: Tags to keep unchanged, by DICOM keyword.
        remove: Tags to remove, by DICOM keyword.
        force: Allow replacing PatientID and UIDs.
        keep_source: Keep the source resource; False deletes it once the copy exists.
        job_timeout: Seconds to wait for the Orthanc job; default the client's long timeout
            (``ORTHANC_LONG_TIMEOUT``, 600 s).

    Returns:
        The new resource (``ModifyResult``), with its Orthanc ID, level and the job that
        made it.

    Raises:
        OrthancUsageError: ``level`` is ``"Instance"`` (Orthanc answers with a file, not a
            resource).
        OrthancNotFound: No such resource.
        OrthancJobFailed: Orthanc could not do it (not retried).
        OrthancJobTimeout: The job did not finish within ``job_timeout``; it keeps running in
            Orthanc.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        new = modify_resource(creds, "Study", study_id,
                              replace={"InstitutionName": "Research"})
        ```
    """
    with credentials.get_client() as orthanc:
        job_id = orthanc.modify(level, resource_id, replace=replace, keep=keep, remove=remove,
                                force=force, keep_source=keep_source)
        return orthanc.modified_resource(orthanc.wait_for_job(str(job_id), timeout=job_timeout))
