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

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        modality: Orthanc's name for the modality (as listed by ``GET /modalities``;
            case-sensitive).

    Returns:
        True when the modality answered the C-ECHO.

    Raises:
        UnknownModality: Orthanc knows no modality of that name; the message lists those it knows.
        OrthancDimseError: The modality did not answer or refused the association (subclasses such
            as ``PacsUnreachable`` and ``AssociationRejected`` say which).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

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

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        modality: Orthanc's name for the modality (as listed by ``GET /modalities``;
            case-sensitive).
        level: ``"Patient"``, ``"Study"``, ``"Series"`` or ``"Instance"`` (a ``Level``).
        query: DICOM keyword to matching value (exact, wildcard, or a date range such as
            ``"20240101-20240131"``); a key sent empty is returned in the answers.
        slot_timeout: Seconds to wait for a slot of the modality's concurrency limit;
            default ``PREFECT_ORTHANC_SLOT_WAIT_SECONDS`` (1 h).

    Returns:
        Orthanc's query ID (to retrieve from) and every answer, DICOM keyword to value
        (``QueryResult``).

    Raises:
        UnknownModality: Orthanc knows no modality of that name; the message lists those it knows.
        ModalityLimitMissing: No ``orthanc-modality-<name>`` concurrency limit exists (create it
            with ``prefect-orthanc-limits <name>=2``).
        SlotWaitExceeded: No slot became free within ``slot_timeout``.
        OrthancDimseError: The modality did not answer, rejected the association, refused the query
            or is busy (``PacsUnreachable``, ``AssociationRejected``, ``QueryRefused``,
            ``PacsBusy``); transient ones are retried by Prefect first.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

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

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        modality: Orthanc's name for the modality (as listed by ``GET /modalities``;
            case-sensitive).
        study_uid: StudyInstanceUID of the study (run names show only a hash of it).
        job_timeout: Seconds to wait for each C-MOVE job; default the client's long timeout
            (``ORTHANC_LONG_TIMEOUT``, 600 s).
        refetch_rounds: How many times what is still missing after the move is fetched again.
        slot_timeout: Seconds to wait for a slot of the modality's concurrency limit;
            default ``PREFECT_ORTHANC_SLOT_WAIT_SECONDS`` (1 h).

    Returns:
        What happened (``RetrieveResult``), with the ``outcome`` (``already_present``, ``complete``,
        ``partial``, ``failed``, ``not_found``, ``unverified``, ``several_patients``), the expected
        and received instance counts, where the count came from (``count_source``), the study's
        Orthanc IDs, and a ``reason`` code when a move failed. A move the PACS refuses is an
        outcome, not an error.

    Raises:
        UnknownModality: Orthanc knows no modality of that name; the message lists those it knows.
        ModalityLimitMissing: No ``orthanc-modality-<name>`` concurrency limit exists (create it
            with ``prefect-orthanc-limits <name>=2``).
        SlotWaitExceeded: No slot became free within ``slot_timeout``.
        OrthancDimseError: The C-FIND that finds and counts the study failed (PACS unreachable,
            association rejected, query refused, busy); transient ones are retried by Prefect first.
        OrthancJobTimeout: A C-MOVE job did not finish within ``job_timeout`` (it keeps running in
            Orthanc; a re-run moves only what is missing).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        result = retrieve_study(creds, "pacs", study_uid)
        assert result.complete, (result.expected_instances, result.received_instances)
        ```
    """
    with credentials.get_client() as orthanc:
        require_modality(orthanc, modality)
        with modality_slot(modality, timeout=slot_timeout):
            # before the move: see tasks.origin. A record already there is a retrieval of
            # this study that did not end: its C-MOVE job may still be running in Orthanc
            # (its run died; the job and its association outlive it), so it is waited for
            # under this slot rather than the study moved a second time beside it
            first = register_retrieval(study_uid, modality)
            result = orthanc.retrieve_study(modality, study_uid, job_timeout=job_timeout,
                                            refetch_rounds=refetch_rounds,
                                            adopt_moves=not first)
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

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        modality: Orthanc's name for the modality (as listed by ``GET /modalities``;
            case-sensitive).
        resource_ids: Orthanc IDs of patients, studies, series or instances to send.
        job_timeout: Seconds to wait for the Orthanc job; default the client's long timeout
            (``ORTHANC_LONG_TIMEOUT``, 600 s).
        slot_timeout: Seconds to wait for a slot of the modality's concurrency limit;
            default ``PREFECT_ORTHANC_SLOT_WAIT_SECONDS`` (1 h).

    Returns:
        The finished C-STORE job (``JobInfo``), its content reduced to counts and Orthanc IDs.

    Raises:
        UnknownModality: Orthanc knows no modality of that name; the message lists those it knows.
        ModalityLimitMissing: No ``orthanc-modality-<name>`` concurrency limit exists (create it
            with ``prefect-orthanc-limits <name>=2``).
        SlotWaitExceeded: No slot became free within ``slot_timeout``.
        OrthancDimseError: The destination refused the association or the instances
            (``AssociationRejected``, ``StoreRefused``: permanent).
        OrthancJobFailed: The job failed; marked transient, and retried by Prefect, when the
            destination could not be reached.
        OrthancJobTimeout: The job did not finish within ``job_timeout``; it keeps running in
            Orthanc.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

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

    Args:
        credentials: The Orthanc server to use (``OrthancCredentials`` block).
        peer: Orthanc's name for the peer (its ``OrthancPeers`` configuration).
        resource_ids: Orthanc IDs of patients, studies, series or instances to send.
        job_timeout: Seconds to wait for the Orthanc job; default the client's long timeout
            (``ORTHANC_LONG_TIMEOUT``, 600 s).

    Returns:
        The finished peer-store job (``JobInfo``), its content reduced to counts and Orthanc IDs.

    Raises:
        OrthancError: Orthanc did not answer or refused the request.
        OrthancJobFailed: The job failed; marked transient, and retried by Prefect, when the peer
            could not be reached.
        OrthancJobTimeout: The job did not finish within ``job_timeout``; it keeps running in
            Orthanc.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

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
