"""Tasks for DICOM networking through Orthanc: C-ECHO, C-FIND, C-MOVE, C-STORE.

Every operation against a modality first checks that Orthanc knows the modality
(``require_modality``: one function for every entry point that takes a modality name, tasks
and flows alike), then holds that modality's concurrency slot (see ``limits``) for its whole
life, Orthanc job included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefect_orthanc.orthanc_client import (
    JobInfo,
    Level,
    Orthanc,
    OrthancJobFailed,
    QueryResult,
    RetrieveResult,
    SafeMessageError,
)
from prefect_orthanc.orthanc_client.errors import store_failure
from prefect_orthanc.tasks.credentials import OrthancCredentials
from prefect_orthanc.tasks.limits import modality_slot
from prefect_orthanc.tasks.origin import end_retrieval, mark_retrieved, register_retrieval
from prefect_orthanc.tasks.policy import orthanc_task, uid_key

__all__ = [
    "UnknownModality",
    "echo_modality",
    "query_modality",
    "require_modality",
    "retrieve_study",
    "store_to_modality",
    "store_to_peer",
]


class UnknownModality(SafeMessageError, ValueError):
    """Orthanc has no DICOM modality of that name. The message lists the names it has
    (configuration, not patient data) and how to register one."""

    reason_code = "unknown_modality"

    def __init__(self, modality: str, known: list[str]) -> None:
        names = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"Orthanc has no DICOM modality named {modality!r} (it knows: {names}): use one "
            f"of those names, or register it in Orthanc's configuration (\"DicomModalities\": "
            f"{{\"{modality}\": [\"AET\", \"host\", 104]}}, then restart Orthanc) or with "
            f"`PUT /modalities/{modality}` with the body {{\"AET\": \"AET\", \"Host\": \"host\", "
            f"\"Port\": 104}}, then give it a "
            f"concurrency limit: `prefect-orthanc-limits {modality}=2`")
        self.modality, self.known = modality, sorted(known)

    def __reduce__(self) -> tuple[object, ...]:
        return (UnknownModality, (self.modality, self.known))


def require_modality(orthanc: Orthanc, modality: str) -> None:
    """Raise ``UnknownModality`` unless Orthanc's own list (``GET /modalities``) has
    ``modality`` (names are case-sensitive, as in Orthanc). Call it before anything else
    about a modality (its concurrency limit, a C-FIND), so a typo is reported as a typo.

    Example:
        ```python
        with creds.get_client() as orthanc:
            require_modality(orthanc, "pacs")
        ```
    """
    known = [str(name) for name in orthanc.modalities()]
    if modality not in known:
        raise UnknownModality(modality, known)


@orthanc_task(name="echo_modality", run_name=lambda p: f"echo-{p['modality']}")
def echo_modality(credentials: OrthancCredentials, modality: str) -> bool:
    """C-ECHO a modality from Orthanc; raises ``OrthancDimseError`` if it does not answer.

    Example:
        ```python
        echo_modality(OrthancCredentials.load("research"), "pacs")
        ```
    """
    with credentials.get_client() as orthanc:
        require_modality(orthanc, modality)
        orthanc.echo(modality)
    return True


@orthanc_task(name="query_modality",
              run_name=lambda p: f"query-{p['modality']}-{Level(p['level']).value.lower()}")
def query_modality(credentials: OrthancCredentials, modality: str, level: Level | str,
                   query: Mapping[str, str], *, slot_timeout: float | None = None
                   ) -> QueryResult:
    """C-FIND on a modality at patient/study/series/instance level; returns every answer.

    Answers hold DICOM values: this task never caches or persists its result.

    Example:
        ```python
        result = query_modality(creds, "pacs", "Study",
                                {"StudyDate": "20240101-20240131", "ModalitiesInStudy": "CT",
                                 "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""})
        print(len(result.answers))
        ```
    """
    with credentials.get_client() as orthanc:
        require_modality(orthanc, modality)
        with modality_slot(modality, timeout=slot_timeout):
            return orthanc.query(modality, level, query)


@orthanc_task(name="retrieve_study",
              run_name=lambda p: f"retrieve-{p['modality']}-{uid_key(p['study_uid'])}")
def retrieve_study(credentials: OrthancCredentials, modality: str, study_uid: str, *,
                   job_timeout: float | None = None, refetch_rounds: int = 2,
                   slot_timeout: float | None = None) -> RetrieveResult:
    """Bring one study from a modality into this Orthanc, verified complete.

    C-FIND the expected instance count, move only if something is missing (C-MOVE job, bounded
    wait), recount, re-fetch incomplete series up to ``refetch_rounds`` times. Returns the
    honest outcome (already_present / complete / partial / failed / not_found) with counts and
    Orthanc IDs. Transient errors (PACS unreachable) are retried by Prefect; a re-run moves
    only what is still missing. What arrived is marked as retrieved (``tasks.origin``), so
    the new-study flow does not take it for a new study.

    Example:
        ```python
        result = retrieve_study(creds, "pacs", study_uid)
        assert result.complete, (result.expected_instances, result.received_instances)
        ```
    """
    with credentials.get_client() as orthanc:
        require_modality(orthanc, modality)
        with modality_slot(modality, timeout=slot_timeout):
            register_retrieval(study_uid, modality)  # before the move: see tasks.origin
            result = orthanc.retrieve_study(modality, study_uid, job_timeout=job_timeout,
                                     refetch_rounds=refetch_rounds)
            if result.moved:
                mark_retrieved(orthanc, result.study_ids, modality)
            end_retrieval(study_uid)
            return result


@orthanc_task(name="store_to_modality",
              run_name=lambda p: f"store-{p['modality']}-{len(p['resource_ids'])}")
def store_to_modality(credentials: OrthancCredentials, modality: str,
                      resource_ids: Sequence[str], *, job_timeout: float | None = None,
                      slot_timeout: float | None = None) -> JobInfo:
    """C-STORE Orthanc resources (any level) to a modality as a job and wait for it.

    A destination that is down or refuses the association fails the task with a transient
    error: Prefect retries it with backoff (bounded by the task's ``retries``).

    Example:
        ```python
        job = store_to_modality(creds, "pacs", [study_id])
        print(job.content.get("InstancesCount"))
        ```
    """
    with credentials.get_client() as orthanc:
        require_modality(orthanc, modality)
        with modality_slot(modality, timeout=slot_timeout):
            job_id = orthanc.store(modality, list(resource_ids))
            assert job_id is not None
            return _wait_for_send(orthanc, job_id, job_timeout, "C-STORE")


@orthanc_task(name="store_to_peer",
              run_name=lambda p: f"store-peer-{p['peer']}-{len(p['resource_ids'])}")
def store_to_peer(credentials: OrthancCredentials, peer: str, resource_ids: Sequence[str], *,
                  job_timeout: float | None = None) -> JobInfo:
    """Send Orthanc resources to an Orthanc peer (HTTP) as a job and wait for it.

    Example:
        ```python
        store_to_peer(creds, "partner-site", [study_id])
        ```
    """
    with credentials.get_client() as orthanc:
        job_id = orthanc.store_peer(peer, list(resource_ids))
        assert job_id is not None
        return _wait_for_send(orthanc, job_id, job_timeout, "peer store")


def _wait_for_send(orthanc: Orthanc, job_id: str, timeout: float | None,
                   operation: str) -> JobInfo:
    """Wait for a C-STORE/peer-store job. A job that failed because the destination could not
    be reached raises a transient error, so Prefect retries the task (bounded, with backoff):
    sending again is harmless."""
    try:
        return orthanc.wait_for_job(job_id, timeout=timeout).redacted()
    except OrthancJobFailed as error:
        raise store_failure(error, operation=operation) from None
