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
