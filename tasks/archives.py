"""Tasks that write ZIP archives of Orthanc resources to disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prefect_orthanc.orthanc_client import ArchiveResult
from prefect_orthanc.tasks.credentials import OrthancCredentials
from prefect_orthanc.tasks.policy import orthanc_task

__all__ = ["download_archive"]


@orthanc_task(name="download_archive",
              run_name=lambda p: f"archive-{len(p['resource_ids'])}-resources")
def download_archive(credentials: OrthancCredentials, resource_ids: Sequence[str],
                     dest: Path | str, *, media: bool = False,
                     job_timeout: float | None = None) -> ArchiveResult:
    """ZIP resources of any level (an Orthanc archive job, so big sets hit no HTTP timeout),
    streamed to ``dest`` with flat memory; returns path, byte count and SHA-256.

    The file appears only when complete; ``media=True`` adds a DICOMDIR.

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        resource_ids: Orthanc IDs of patients, studies, series or instances, in one ZIP.
        dest: Path of the ZIP to write; missing folders are created.
        media: Add a DICOMDIR (Orthanc's ``/tools/create-media``).
        job_timeout: Seconds to wait for the Orthanc job; default the client's long timeout
            (``ORTHANC_LONG_TIMEOUT``, 600 s).

    Returns:
        Where the ZIP is, its size in bytes and its SHA-256 (``ArchiveResult``).

    Raises:
        OrthancNotFound: A resource does not exist.
        OrthancJobFailed: Orthanc could not do it (not retried).
        OrthancJobTimeout: The job did not finish within ``job_timeout``; it keeps running in
            Orthanc.
        OrthancArchiveError: The download ended short or was refused; no partial file is left.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        result = download_archive(creds, [study_id], "/data/out/share-001.zip")
        print(result.size, result.sha256)
        ```
    """
    with credentials.get_client() as orthanc:
        return orthanc.download_archive(list(resource_ids), Path(dest), media=media,
                                        timeout=job_timeout)
