"""Retrieve a study from a DICOM modality into this Orthanc, and prove it arrived whole.

C-MOVE answers "success" for partial transfers often enough that success means nothing until
counted. ``collect`` therefore: asks the modality how many instances the study has (C-FIND),
counts what is already here, moves only when something is missing (as an Orthanc job, polled
with a bounded wait), recounts, and re-fetches just the incomplete series, a bounded number of
rounds. The result says honestly what happened, with counts and Orthanc IDs, never DICOM values.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from .core import Steps
from .errors import OrthancJobFailed, OrthancJobLost
from .models import Level

__all__ = ["CollectOutcome", "CollectResult", "collect_study", "uid_key"]


class CollectOutcome(str, enum.Enum):
    ALREADY_PRESENT = "already_present"  # complete before we started: nothing moved
    COMPLETE = "complete"  # moved (perhaps in several rounds) and verified
    PARTIAL = "partial"  # some instances still missing after every round
    FAILED = "failed"  # nothing arrived
    NOT_FOUND = "not_found"  # the modality does not know the study
    UNVERIFIED = "unverified"  # moved, but the modality did not say how many to expect


class CollectResult(BaseModel):
    """What ``collect_study`` did. Holds counts, Orthanc IDs and a hash key: no DICOM values."""

    model_config = ConfigDict(frozen=True)

    key: str
    outcome: CollectOutcome
    expected_instances: int | None
    received_instances: int
    study_ids: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()
    refetched_series: int = 0
    failure: str | None = None

    @property
    def complete(self) -> bool:
        return self.outcome in (CollectOutcome.ALREADY_PRESENT, CollectOutcome.COMPLETE)

    @property
    def moved(self) -> bool:
        return bool(self.job_ids)


def uid_key(uid: str) -> str:
    """A short, stable, non-reversible key for a DICOM UID, safe for names and logs."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _count(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def collect_study(ops: Any, modality: str, study_uid: str, *, job_timeout: float | None = None,
                  refetch_rounds: int = 2) -> Steps[CollectResult]:
    """Steps of ``Orthanc.collect``: see the module docstring. ``ops`` is the client."""
    key = uid_key(study_uid)
    target = (yield from ops._system_info()).dicom_aet
    found = yield from ops.query.steps(modality, Level.STUDY,
                                       {"StudyInstanceUID": study_uid,
                                        "NumberOfStudyRelatedInstances": ""})
    if not found.answers:
        return CollectResult(key=key, outcome=CollectOutcome.NOT_FOUND, expected_instances=None,
                             received_instances=0)
    expected = sum(_count(a.get("NumberOfStudyRelatedInstances")) or 0 for a in found.answers)
    if not expected:
        expected = yield from _expected_from_series(ops, modality, study_uid)

    study_ids, local = yield from _local_series(ops, study_uid)
    received = sum(local.values())
    if expected and received >= expected:
        return CollectResult(key=key, outcome=CollectOutcome.ALREADY_PRESENT,
                             expected_instances=expected, received_instances=received,
                             study_ids=study_ids)

    jobs: list[str] = []
    failure = yield from _run_move(ops, found.query_id, None, target, job_timeout, jobs)
    refetched = 0
    for _ in range(refetch_rounds):
        study_ids, local = yield from _local_series(ops, study_uid)
        received = sum(local.values())
        if not expected or received >= expected:
            break
        series = yield from ops.query.steps(modality, Level.SERIES,
                                            {"StudyInstanceUID": study_uid,
                                             "SeriesInstanceUID": "",
                                             "NumberOfSeriesRelatedInstances": ""})
        missing = [answer.index for answer in series.answers
                   if local.get(answer.get("SeriesInstanceUID"), 0)
                   < (_count(answer.get("NumberOfSeriesRelatedInstances")) or 1)]
        for index in missing:
            failure = (yield from _run_move(ops, series.query_id, index, target, job_timeout,
                                            jobs)) or failure
        refetched += len(missing)
    study_ids, local = yield from _local_series(ops, study_uid)
    received = sum(local.values())
    if not expected:
        outcome = CollectOutcome.UNVERIFIED if received else CollectOutcome.FAILED
    elif received >= expected:
        outcome, failure = CollectOutcome.COMPLETE, None
    else:
        outcome = CollectOutcome.PARTIAL if received else CollectOutcome.FAILED
    return CollectResult(key=key, outcome=outcome, expected_instances=expected or None,
                         received_instances=received, study_ids=study_ids,
                         job_ids=tuple(jobs), refetched_series=refetched, failure=failure)


def _run_move(ops: Any, query_id: str, answer: int | None, target: str,
              job_timeout: float | None, jobs: list[str]) -> Steps[str | None]:
    """Move one query's answers as a job and wait; a failed job is reported, not raised,
    because what arrived is counted next (a transport error or a timeout still raises)."""
    job_id = yield from ops.retrieve.steps(query_id, target, answer=answer)
    jobs.append(job_id)
    try:
        yield from ops.wait_for_job.steps(job_id, timeout=job_timeout)
    except (OrthancJobFailed, OrthancJobLost) as error:
        return str(error)
    return None


def _expected_from_series(ops: Any, modality: str, study_uid: str) -> Steps[int]:
    series = yield from ops.query.steps(modality, Level.SERIES,
                                        {"StudyInstanceUID": study_uid,
                                         "NumberOfSeriesRelatedInstances": ""})
    counts = [_count(a.get("NumberOfSeriesRelatedInstances")) for a in series.answers]
    return 0 if None in counts else sum(c or 0 for c in counts)


def _local_series(ops: Any, study_uid: str
                  ) -> Steps[tuple[tuple[str, ...], Mapping[str, int]]]:
    """The local studies with that UID, and the instances held per SeriesInstanceUID."""
    study_ids = tuple((yield from ops.find.steps(Level.STUDY, {"StudyInstanceUID": study_uid})))
    counts: dict[str, int] = {}
    for study_id in study_ids:
        for series in (yield from ops.children.steps(Level.STUDY, study_id)):
            uid = series.main_dicom_tags.get("SeriesInstanceUID", series.id)
            counts[uid] = counts.get(uid, 0) + len(series.children_ids)
    return study_ids, counts
