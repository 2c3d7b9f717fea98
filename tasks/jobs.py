"""Task that waits for an Orthanc job."""

from __future__ import annotations

from prefect_orthanc.orthanc_client import JobInfo
from prefect_orthanc.tasks.credentials import OrthancCredentials
from prefect_orthanc.tasks.policy import orthanc_task, short_id

__all__ = ["wait_for_job"]


@orthanc_task(name="wait_for_job", run_name=lambda p: f"wait-job-{short_id(p['job_id'])}")
def wait_for_job(credentials: OrthancCredentials, job_id: str, *,
                 timeout: float | None = None) -> JobInfo:
    """Wait for an Orthanc job within ``timeout`` seconds (default: the long timeout).

    Returns the finished job (content reduced to counts and IDs); raises ``OrthancJobFailed``
    (not retried), ``OrthancJobTimeout`` (the job keeps running in Orthanc) or
    ``OrthancJobLost``.

    Example:
        ```python
        job = wait_for_job(creds, job_id, timeout=3600)
        ```
    """
    with credentials.get_client() as orthanc:
        return orthanc.wait_for_job(job_id, timeout=timeout).redacted()
