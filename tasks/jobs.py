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

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        job_id: The Orthanc job's ID.
        timeout: Seconds to wait; default the client's long timeout (``ORTHANC_LONG_TIMEOUT``,
            600 s).

    Returns:
        The finished job (``JobInfo``), its content reduced to counts and Orthanc IDs.

    Raises:
        OrthancJobFailed: The job ended in Failure (not retried).
        OrthancJobTimeout: The job did not finish within ``timeout``; it keeps running in
            Orthanc.
        OrthancJobLost: Orthanc no longer knows the job (finished jobs beyond its
            ``JobsHistorySize`` are forgotten).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        job = wait_for_job(creds, job_id, timeout=3600)
        ```
    """
    with credentials.get_client() as orthanc:
        return orthanc.wait_for_job(job_id, timeout=timeout).redacted()
