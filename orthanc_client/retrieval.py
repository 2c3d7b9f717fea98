"""Retrieve a study from a DICOM modality into this Orthanc, and prove it arrived whole.

C-MOVE answers "success" for partial transfers often enough that success means nothing until
counted, and real PACS differ in what they answer. ``retrieve_study`` therefore:

1. asks the PACS for the study (C-FIND) and keeps only answers that really carry that
   StudyInstanceUID (a PACS may answer once per stored instance, or ignore a filter);
2. obtains the expected instance count from what the PACS answers (``expected_instances``):
   the study-level count, else the sum of series-level counts, else an IMAGE-level C-FIND of
   the SOP Instance UIDs of each series (which also says exactly which instances are missing);
3. counts what is already here and moves only when something is missing: one C-MOVE of the
   study (as an Orthanc job, bounded wait);
4. waits for arrivals to settle (the local count stops growing for ``Settle.quiet`` seconds,
   at most ``Settle.max_wait``), because an asynchronous PACS acknowledges the C-MOVE before
   its C-STOREs are done;
5. retries the C-MOVE with backoff (bounded) only while nothing has arrived and the failure may
   pass (a rejected association, an unreachable PACS, a move that moved nothing); a move that
   moved something is never repeated blindly: the re-fetch asks only for the missing series,
   or the missing instances when their UIDs are known, a bounded number of rounds.

The result says honestly what happened, with counts, how the count was obtained, Orthanc IDs
and a reason code, never DICOM values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from prefect_orthanc.orthanc_client.core import Sleep, Steps
from prefect_orthanc.orthanc_client.errors import (
    OrthancDimseError,
    OrthancError,
    OrthancJobFailed,
    OrthancJobLost,
    pacs_error,
)
from prefect_orthanc.orthanc_client.models import Level

__all__ = [
    "CountSource",
    "ExpectedCount",
    "RetrieveOutcome",
    "RetrieveResult",
    "Settle",
    "expected_instances",
    "retrieve_study",
    "uid_key",
]


class RetrieveOutcome(str, enum.Enum):
    ALREADY_PRESENT = "already_present"  # complete before we started: nothing moved
    COMPLETE = "complete"  # moved (perhaps in several rounds) and verified
    PARTIAL = "partial"  # some instances still missing after every round
    FAILED = "failed"  # nothing arrived
    NOT_FOUND = "not_found"  # the modality does not know the study
    UNVERIFIED = "unverified"  # moved, but the modality did not say how many to expect
    #: every instance arrived, but as the studies of several patients (the PACS holds one
    #: StudyInstanceUID under several PatientIDs): not a cohort study until a person checks
    SEVERAL_PATIENTS = "several_patients"


class CountSource(str, enum.Enum):
    """How the expected instance count of a study was obtained from the PACS."""

    STUDY = "study"  # NumberOfStudyRelatedInstances of the study-level answer
    SERIES = "series"  # the sum of NumberOfSeriesRelatedInstances over its series
    INSTANCES = "instances"  # IMAGE-level C-FIND: the SOP Instance UIDs of each series


@dataclasses.dataclass(frozen=True)
class ExpectedCount:
    """What the PACS says a study holds. ``series`` maps SeriesInstanceUID to a count and
    ``instances`` maps it to SOP Instance UIDs (only for ``CountSource.INSTANCES``); both are
    empty when the study-level count was enough. Holds UIDs: keep it in memory, never log it."""

    total: int
    source: CountSource
    series: Mapping[str, int] = dataclasses.field(default_factory=dict, repr=False)
    instances: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict,
                                                                repr=False)


@dataclasses.dataclass(frozen=True)
class Settle:
    """How long to let arrivals settle after a C-MOVE job ends (seconds): the local count must
    stop growing for ``quiet`` seconds, polled every ``interval``, at most ``max_wait`` in all.
    Nothing is waited for when the study is already complete."""

    quiet: float = 3.0
    interval: float = 0.5
    max_wait: float = 120.0


class RetrieveResult(BaseModel):
    """What ``retrieve_study`` did. Holds counts, Orthanc IDs and a hash key: no DICOM values.

    ``moved_instances`` counts instances that arrived during this call (so ``moved`` means a
    study was moved, not that a move was attempted); ``reason`` is a short code of the last
    failure (``move_destination_unknown``, ``association_rejected``, ``pacs_unreachable``,
    ``move_refused``, ``moved_nothing``, ``incomplete``...), ``failure`` its message.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    outcome: RetrieveOutcome
    expected_instances: int | None
    received_instances: int
    count_source: CountSource | None = None
    study_ids: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()
    moved_instances: int = 0
    move_attempts: int = 0
    refetched_series: int = 0
    refetched_instances: int = 0
    reason: str | None = None
    failure: str | None = None

    @property
    def complete(self) -> bool:
        return self.outcome in (RetrieveOutcome.ALREADY_PRESENT, RetrieveOutcome.COMPLETE)

    @property
    def moved(self) -> bool:
        return self.moved_instances > 0


def uid_key(uid: str) -> str:
    """A short, stable, non-reversible key for a DICOM UID, safe for names and logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _count(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _matching(answers: Iterable[Any], keyword: str, value: str) -> list[Any]:
    """Answers whose ``keyword`` is ``value`` (a PACS may ignore the filter and answer more)."""
    return [a for a in answers if str(a.get(keyword) or "") == value]


# ------------------------------------------------------------------ counting


def expected_instances(ops: Any, modality: str, study_uid: str,
                       study_answers: Sequence[Mapping[str, Any]] = ()
                       ) -> Steps[ExpectedCount | None]:
    """Steps of ``Orthanc.expected_instances``: the study's expected count, from the study
    answers already at hand, else series-level counts, else IMAGE-level SOP Instance UIDs.
    None when the PACS lists no series for the study."""
    counts = {_count(a.get("NumberOfStudyRelatedInstances")) for a in study_answers}
    counts.discard(None)
    if counts and max(c or 0 for c in counts) > 0:
        # several answers for one study (one per instance): the same count repeated
        return ExpectedCount(total=max(c or 0 for c in counts), source=CountSource.STUDY)
    return (yield from _series_detail(ops, modality, study_uid))


def _series_detail(ops: Any, modality: str, study_uid: str, *, instances: bool = False
                   ) -> Steps[ExpectedCount | None]:
    """Series-level counts, or (when any is missing, or ``instances``) the SOP Instance UIDs
    of every series from IMAGE-level C-FINDs, which name the upper-level UIDs (dcmqrscp
    refuses an IMAGE query without them)."""
    found = yield from ops.query.steps(modality, Level.SERIES,
                                       {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "",
                                        "NumberOfSeriesRelatedInstances": ""})
    yield from _forget(ops, found.query_id)
    series: dict[str, int | None] = {}
    for answer in _matching(found.answers, "StudyInstanceUID", study_uid):
        uid = str(answer.get("SeriesInstanceUID") or "")
        if uid:
            count = _count(answer.get("NumberOfSeriesRelatedInstances"))
            series[uid] = max(series.get(uid) or 0, count or 0) if count else series.get(uid)
    if not series:
        return None
    if not instances and all(series.values()):
        counts = {uid: int(c or 0) for uid, c in series.items()}
        return ExpectedCount(total=sum(counts.values()), source=CountSource.SERIES,
                             series=counts)
    sops: dict[str, frozenset[str]] = {}
    for uid in series:
        images = yield from ops.query.steps(modality, Level.INSTANCE,
                                            {"StudyInstanceUID": study_uid,
                                             "SeriesInstanceUID": uid, "SOPInstanceUID": ""})
        yield from _forget(ops, images.query_id)
        sops[uid] = frozenset(str(a.get("SOPInstanceUID")) for a in images.answers
                              if a.get("SOPInstanceUID")
                              and str(a.get("SeriesInstanceUID") or uid) == uid)
    return ExpectedCount(total=sum(len(s) for s in sops.values()), source=CountSource.INSTANCES,
                         series={uid: len(s) for uid, s in sops.items()}, instances=sops)


def _forget(ops: Any, query_id: str) -> Steps[None]:
    with contextlib.suppress(OrthancError):  # only housekeeping: Orthanc forgets old queries
        yield from ops.delete_query.steps(query_id)


# ------------------------------------------------------------------ what is here


@dataclasses.dataclass
class _Local:
    study_ids: tuple[str, ...]
    series: dict[str, int]  # SeriesInstanceUID -> instances held
    series_ids: dict[str, list[str]]  # SeriesInstanceUID -> Orthanc series IDs

    @property
    def total(self) -> int:
        return sum(self.series.values())


def _local(ops: Any, study_uid: str) -> Steps[_Local]:
    """The local studies with that UID, and the instances held per SeriesInstanceUID."""
    study_ids = tuple((yield from ops.find.steps(Level.STUDY, {"StudyInstanceUID": study_uid})))
    local = _Local(study_ids, {}, {})
    for study_id in study_ids:
        for series in (yield from ops.children.steps(Level.STUDY, study_id)):
            uid = series.main_dicom_tags.get("SeriesInstanceUID", series.id)
            local.series[uid] = local.series.get(uid, 0) + len(series.children_ids)
            local.series_ids.setdefault(uid, []).append(series.id)
    return local


def _local_sops(ops: Any, local: _Local, series_uid: str) -> Steps[set[str]]:
    sops: set[str] = set()
    for series_id in local.series_ids.get(series_uid, []):
        for instance in (yield from ops.children.steps(Level.SERIES, series_id)):
            sops.add(instance.main_dicom_tags.get("SOPInstanceUID", ""))
    return sops


def _settle(ops: Any, study_uid: str, expected: int | None, settle: Settle) -> Steps[_Local]:
    """Recount until complete, or until the count has not grown for ``settle.quiet`` s."""
    start = last_change = time.monotonic()
    local = yield from _local(ops, study_uid)
    while expected is None or local.total < expected:
        now = time.monotonic()
        if now - last_change >= settle.quiet or now - start >= settle.max_wait:
            break
        yield Sleep(settle.interval)
        again = yield from _local(ops, study_uid)
        if again.total != local.total:
            last_change = time.monotonic()
        local = again
    return local


# ------------------------------------------------------------------ moving


#: the longest pause between two polls of a C-MOVE job: a study's move ends on average half a
#: pause before the poll that sees it, in a slot the next study waits for (0.5 s pauses cost
#: 0.15-0.25 s per study against a synchronous move; docs/performance.md). A poll is one GET
#: of about 2 ms: four moves in flight poll about 20 times a second.
MOVE_POLL_SECONDS = 0.2


def _run_move(ops: Any, query_id: str, answer: int | None, target: str,
              job_timeout: float | None, jobs: list[str]) -> Steps[OrthancError | None]:
    """Move one query answer as a job and wait; a failed job is returned (classified), not
    raised, because what arrived is counted next (a transport error or a timeout raises)."""
    try:
        job_id = yield from ops.retrieve.steps(query_id, target, answer=answer)
    except OrthancDimseError as error:
        return error
    jobs.append(job_id)
    try:
        yield from ops.wait_for_job.steps(job_id, timeout=job_timeout,
                                          max_interval=MOVE_POLL_SECONDS)
    except OrthancJobFailed as error:
        return pacs_error(error.error_details, operation="C-MOVE", job_id=job_id) or error
    except OrthancJobLost as error:
        return error
    return None


def _moves_under_way(ops: Any, modality: str, study_uid: str) -> Steps[list[str]]:
    """This Orthanc's C-MOVE jobs not yet ended that ask ``modality`` for (part of)
    ``study_uid``: one a run started before it died (its job outlives it, association open),
    or another run's. Their content holds DICOM values: only their IDs leave."""
    aet = str((yield from ops.modality_configuration.steps(modality)).get("AET") or "")
    found = []
    for job in (yield from ops.jobs.steps()):
        if job.type != "DicomMoveScu" or job.state.finished:
            continue
        if str(job.content.get("RemoteAet") or "") != aet:
            continue
        queries = job.content.get("Query") or []
        if any(isinstance(q, dict) and {str(k).lower(): v for k, v in q.items()}
               .get("0020,000d") == study_uid for q in queries):
            found.append(job.id)
    return found


def _adopt_moves(ops: Any, modality: str, study_uid: str, job_timeout: float | None,
                 jobs: list[str]) -> Steps[int]:
    """Wait for the moves of this study already under way (``_moves_under_way``) instead of
    starting another: the study is not moved twice, and the slot this call holds covers the
    association they keep open. Their failures are not ours: what arrived is counted next.
    Returns how many were adopted (their IDs join ``jobs``)."""
    under_way = yield from _moves_under_way(ops, modality, study_uid)
    for job_id in under_way:
        jobs.append(job_id)
        try:
            yield from ops.wait_for_job.steps(job_id, timeout=job_timeout,
                                              max_interval=MOVE_POLL_SECONDS)
        except (OrthancJobFailed, OrthancJobLost):
            continue
    return len(under_way)


def _reason(error: OrthancError | None, fallback: str) -> tuple[str, str]:
    if error is None:
        return fallback, {"moved_nothing": "the C-MOVE ended without sending any instance",
                          "incomplete": "instances still missing after every re-fetch"
                          }.get(fallback, fallback)
    return getattr(error, "reason_code", "orthanc_error"), str(error)


def retrieve_study(ops: Any, modality: str, study_uid: str, *, job_timeout: float | None = None,
                   refetch_rounds: int = 2, settle: Settle | None = None,
                   move_attempts: int = 3, backoff: float = 1.0,
                   adopt_moves: bool = False) -> Steps[RetrieveResult]:
    """Steps of ``Orthanc.retrieve_study``: see the module docstring. ``ops`` is the client."""
    settle = settle or Settle()
    key = uid_key(study_uid)
    target = (yield from ops._system_info()).dicom_aet
    found = yield from ops.query.steps(modality, Level.STUDY,
                                       {"StudyInstanceUID": study_uid,
                                        "NumberOfStudyRelatedInstances": ""})
    answers = _matching(found.answers, "StudyInstanceUID", study_uid)
    if not answers:
        yield from _forget(ops, found.query_id)
        return RetrieveResult(key=key, outcome=RetrieveOutcome.NOT_FOUND, expected_instances=None,
                             received_instances=0)
    expected = yield from expected_instances(ops, modality, study_uid,
                                             [a.tags for a in answers])
    total = expected.total if expected else None
    source = expected.source if expected else None
    local = yield from _local(ops, study_uid)
    before = local.total
    if total and before >= total:
        yield from _forget(ops, found.query_id)
        return RetrieveResult(key=key, outcome=RetrieveOutcome.ALREADY_PRESENT,
                             expected_instances=total, received_instances=before,
                             count_source=source, study_ids=local.study_ids)

    jobs: list[str] = []
    error: OrthancError | None = None
    attempts = 0
    if adopt_moves and (yield from _adopt_moves(ops, modality, study_uid, job_timeout, jobs)):
        local = yield from _settle(ops, study_uid, total, settle)
    # a study partly here already goes straight to the re-fetch of what is missing
    for attempt in range(max(1, move_attempts) if not local.total else 0):
        attempts += 1
        error = yield from _run_move(ops, found.query_id, answers[0].index, target,
                                     job_timeout, jobs)
        local = yield from _settle(ops, study_uid, total, settle)
        if local.total > before or (error is not None and not error.transient):
            break
        if attempt + 1 < move_attempts:  # nothing moved, and it may pass: try again later
            yield Sleep(backoff * 2 ** attempt)
    yield from _forget(ops, found.query_id)
    reason, failure = (_reason(error, "moved_nothing") if attempts and local.total <= before
                       else (None, None))

    refetched_series = refetched_instances = 0
    # a study that moved nothing stops here; one partly here before gets an extra round
    rounds = (refetch_rounds + (1 if before else 0)) if local.total > 0 else 0
    for _ in range(rounds):
        if not total or local.total >= total:
            break
        if expected is None or not expected.series:
            expected = (yield from _series_detail(ops, modality, study_uid)) or expected
        assert expected is not None
        if expected.instances:
            error, count = yield from _refetch_instances(ops, modality, study_uid, expected,
                                                         local, target)
            refetched_instances += count
        else:
            error, count = yield from _refetch_series(ops, modality, study_uid, expected, local,
                                                      target, job_timeout, jobs)
            refetched_series += count
        local = yield from _settle(ops, study_uid, total, settle)
        if error is not None:
            reason, failure = _reason(error, "incomplete")
            if not error.transient:
                break

    received = local.total
    if not total:
        outcome = RetrieveOutcome.UNVERIFIED if received else RetrieveOutcome.FAILED
    elif received >= total:
        outcome, reason, failure = RetrieveOutcome.COMPLETE, None, None
    else:
        outcome = RetrieveOutcome.PARTIAL if received else RetrieveOutcome.FAILED
        if reason is None:
            reason, failure = _reason(None, "incomplete")
    return RetrieveResult(key=key, outcome=outcome, expected_instances=total,
                         received_instances=received, count_source=source,
                         study_ids=local.study_ids, job_ids=tuple(jobs),
                         moved_instances=max(0, received - before), move_attempts=attempts,
                         refetched_series=refetched_series,
                         refetched_instances=refetched_instances, reason=reason,
                         failure=failure)


def _refetch_series(ops: Any, modality: str, study_uid: str, expected: ExpectedCount,
                    local: _Local, target: str, job_timeout: float | None, jobs: list[str]
                    ) -> Steps[tuple[OrthancError | None, int]]:
    """Move each series holding fewer instances here than the PACS counts (one job each)."""
    found = yield from ops.query.steps(modality, Level.SERIES,
                                       {"StudyInstanceUID": study_uid, "SeriesInstanceUID": ""})
    first_answer: dict[str, int] = {}
    for answer in _matching(found.answers, "StudyInstanceUID", study_uid):
        first_answer.setdefault(str(answer.get("SeriesInstanceUID") or ""), answer.index)
    error: OrthancError | None = None
    moved = 0
    for uid, count in expected.series.items():
        if local.series.get(uid, 0) < count and uid in first_answer:
            error = (yield from _run_move(ops, found.query_id, first_answer[uid], target,
                                          job_timeout, jobs)) or error
            moved += 1
    yield from _forget(ops, found.query_id)
    return error, moved


def _refetch_instances(ops: Any, modality: str, study_uid: str, expected: ExpectedCount,
                       local: _Local, target: str
                       ) -> Steps[tuple[OrthancError | None, int]]:
    """Move exactly the instances not here (their UIDs came from the IMAGE-level C-FIND), in
    one synchronous C-MOVE request."""
    missing: list[dict[str, str]] = []
    for uid, sops in expected.instances.items():
        if local.series.get(uid, 0) >= len(sops):
            continue
        held = yield from _local_sops(ops, local, uid)
        missing += [{"StudyInstanceUID": study_uid, "SeriesInstanceUID": uid,
                     "SOPInstanceUID": sop} for sop in sorted(sops - held)]
    if not missing:
        return None, 0
    try:
        yield from ops.move.steps(modality, Level.INSTANCE, missing, target)
    except OrthancDimseError as error:
        return error, len(missing)
    return None, len(missing)
