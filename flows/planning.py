"""Resolve a cohort against the PACS before anything moves: one C-FIND per row (or per date
range for criteria), every row classified, and what is already here recognised.

Answers are checked against the question before anything else: they are deduplicated by
StudyInstanceUID (some PACS answer a study-level query once per stored instance), answers
contradicting a key of the query are dropped (some PACS silently ignore keys they do not
support, as filters too), and every C-FIND applies ``find_cap`` to *distinct* studies: a capped
answer is split by date (criteria) or reported ``too_many_matches`` (rows), never truncated.
Criteria answers are verified against every criterion (modality through series-level
``Modality`` when ``ModalitiesInStudy`` is not returned, description, dates); a study that does
not match is ``excluded`` and never moved. Each study's expected instance count comes from
``Orthanc.expected_instances`` (study, series or IMAGE-level C-FIND), recorded as
``PlannedStudy.count_source``.

Each row's C-FINDs (and each criteria answer's checks) are independent: with ``concurrency``
above 1 they run that many at a time, each row under a ``slot`` (the caller's PACS slot, so the
PACS's limit holds), and the rows are then classified in cohort order (duplicates are decided
there, exactly as one after another would). The first error that is not the row's own (an
unreachable PACS) stops planning and is raised.

Plain functions over an ``Orthanc`` client, so they can be tested and reused without Prefect.
UIDs stay in memory (``PlannedStudy.uid`` is out of repr); reports use ``key`` hashes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import enum
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

from prefect_orthanc.flows.cohort import Criteria
from prefect_orthanc.flows.cohort_file import CohortRow, study_date
from prefect_orthanc.orthanc_client import (
    Level,
    Orthanc,
    OrthancBadRequest,
    OrthancDimseError,
    QueryRefused,
    SafeMessageError,
)
from prefect_orthanc.orthanc_client.retrieval import uid_key

__all__ = [
    "CohortTooBroad",
    "PlanRow",
    "PlannedStudy",
    "RowStatus",
    "find_capped",
    "mismatch",
    "plan_criteria",
    "plan_rows",
]

_RETURN_KEYS = {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}

#: What the PACS exchanges of one row (or one criteria answer) run under: a context manager
#: factory, e.g. ``lambda: modality_slot("pacs")``. The default holds nothing.
Slot = Callable[[], contextlib.AbstractContextManager[object]]

_In = TypeVar("_In")
_Out = TypeVar("_Out")


def _each(work: Callable[[_In], _Out], items: Sequence[_In], concurrency: int) -> list[_Out]:
    """``[work(item) for item in items]``, ``concurrency`` at a time, in the items' order; the
    first error (in that order) is raised once the items under way have ended, and the items
    not yet started are never started. Each thread runs in a copy of the caller's context (the
    Prefect run the slots are held for, its logger)."""
    if concurrency <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items)),
                            thread_name_prefix="planning") as pool:
        futures = [pool.submit(contextvars.copy_context().run, work, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


class RowStatus(str, enum.Enum):
    """How planning classified a cohort row (or a criteria answer)."""

    FOUND = "found"
    NOT_FOUND = "not_found"
    AMBIGUOUS = "ambiguous"
    ALREADY_PRESENT = "already_present"
    DUPLICATE = "duplicate"
    TOO_MANY = "too_many_matches"
    EXCLUDED = "excluded"  # answered by the PACS but not matching the criteria: never moved
    #: this row's C-FIND was refused, or its answers could not be read (e.g. a character set
    #: Orthanc 1.10.1 cannot decode): the other rows go on
    QUERY_FAILED = "query_failed"


class PlannedStudy(BaseModel):
    """A study a plan row matched: its UID (kept out of reprs), the UID's hash key, the
    instance count the PACS gave (None when it gave none), whether research already holds it
    whole, and where the count came from."""

    model_config = ConfigDict(frozen=True)

    uid: str = Field(repr=False)
    key: str
    expected: int | None
    present: bool
    count_source: str | None = None  # "study", "series" or "instances" (see retrieval)


class PlanRow(BaseModel):
    """One cohort row (or one criteria answer), numbered from 1: its ``RowStatus``, the
    studies it matched and a note without values."""

    model_config = ConfigDict(frozen=True)

    index: int
    status: RowStatus
    studies: tuple[PlannedStudy, ...] = ()
    note: str = ""


class CohortTooBroad(SafeMessageError, ValueError):
    """Criteria whose C-FIND stays capped even for a single day: nothing would be complete."""


def _local_complete(orthanc: Orthanc, uid: str, expected: int | None) -> bool:
    if not expected:
        return False
    held = sum(orthanc.count_instances(Level.STUDY, study_id)
               for study_id in orthanc.find(Level.STUDY, {"StudyInstanceUID": uid}))
    return held >= expected


def _studies(orthanc: Orthanc, modality: str, answers: Iterable[Mapping[str, object]]
             ) -> list[PlannedStudy]:
    studies = []
    for tags in answers:
        uid = str(tags.get("StudyInstanceUID", ""))
        count = orthanc.expected_instances(modality, uid, [tags])
        expected = count.total if count else None
        studies.append(PlannedStudy(uid=uid, key=uid_key(uid), expected=expected,
                                    present=_local_complete(orthanc, uid, expected),
                                    count_source=count.source.value if count else None))
    return studies


def _status(studies: list[PlannedStudy], found: RowStatus = RowStatus.FOUND) -> RowStatus:
    return RowStatus.ALREADY_PRESENT if all(s.present for s in studies) else found


@dataclasses.dataclass(frozen=True)
class _RowAnswer:
    """What the PACS and research said about one row, before it is classified."""

    failed: str = ""  # its C-FIND was refused or unreadable: the query_failed note
    found: dict[str, dict[str, str]] | None = None  # distinct agreeing answers; None: capped
    studies: dict[str, PlannedStudy] | None = None  # by UID, when the row could be planned
    studies_failed: str = ""  # the count or local C-FINDs of its studies failed


def _look_up(orthanc: Orthanc, modality: str, row: CohortRow, cap: int, slot: Slot
             ) -> _RowAnswer:
    with slot():
        try:
            found = _capped_query(orthanc, modality, row.query(), cap)
        except (OrthancBadRequest, QueryRefused) as error:  # this row's, not the PACS's
            return _RowAnswer(failed=f"query_failed: {error}")
        if not found or (len(found) > 1 and (row.accession_number or row.study_instance_uid)):
            return _RowAnswer(found=found)  # capped, not found or ambiguous: no counts needed
        try:
            studies = _studies(orthanc, modality, found.values())
        except (OrthancBadRequest, QueryRefused) as error:
            return _RowAnswer(found=found, studies_failed=f"query_failed: {error}")
        return _RowAnswer(found=found, studies={s.uid: s for s in studies})


def plan_rows(orthanc: Orthanc, modality: str, rows: Iterable[CohortRow], cap: int = 0, *,
              concurrency: int = 1, slot: Slot = contextlib.nullcontext) -> list[PlanRow]:
    """Classify each cohort row: found / not found / ambiguous / already present / duplicate /
    too many matches / query failed.

    A row naming an accession number or a study UID must match exactly one study (several is
    ambiguous: nothing is moved for it). A row with only a patient ID (and maybe a date) asks
    for every matching study; when the PACS answers ``cap`` distinct studies or more (or
    cancels the query) the row is ``too_many_matches``, never silently truncated. A row whose
    studies were all matched by earlier rows is a ``duplicate`` of the first of them.

    The rows' C-FINDs run ``concurrency`` at a time, each row's under ``slot()``; the result is
    the same as one row after another, in cohort order.

    Raises:
        OrthancDimseError: The PACS did not answer or refused as a whole (a refusal of one
            row's own query makes that row ``query_failed`` instead).
        SlotWaitExceeded: Raised by ``slot()`` (as anything else it raises) when no PACS
            slot became free in time.
    """
    rows = list(rows)
    answers = _each(lambda row: _look_up(orthanc, modality, row, cap, slot), rows, concurrency)
    plan: list[PlanRow] = []
    seen: dict[str, int] = {}
    for row, answer in zip(rows, answers, strict=True):
        if answer.failed:
            plan.append(PlanRow(index=row.index, status=RowStatus.QUERY_FAILED,
                                note=answer.failed))
            continue
        unique = answer.found
        if unique is None:
            plan.append(PlanRow(index=row.index, status=RowStatus.TOO_MANY,
                                note="the PACS answered its cap of matches (find_cap) or "
                                     "cancelled the query: add a study_date to the row"))
            continue
        if not unique:
            plan.append(PlanRow(index=row.index, status=RowStatus.NOT_FOUND))
            continue
        if len(unique) > 1 and (row.accession_number or row.study_instance_uid):
            plan.append(PlanRow(index=row.index, status=RowStatus.AMBIGUOUS,
                                note=f"{len(unique)} studies match"))
            continue
        first = next((seen[uid] for uid in unique if uid in seen), None)
        if first is not None and all(uid in seen for uid in unique):
            plan.append(PlanRow(index=row.index, status=RowStatus.DUPLICATE,
                                note=f"same study as row {first}"))
            continue
        if answer.studies is None:
            plan.append(PlanRow(index=row.index, status=RowStatus.QUERY_FAILED,
                                note=answer.studies_failed))
            continue
        studies = [answer.studies[uid] for uid in unique if uid not in seen]
        for study in studies:
            seen[study.uid] = row.index
        plan.append(PlanRow(index=row.index, status=_status(studies), studies=tuple(studies)))
    return plan


def _in_range(value: str, wanted: str) -> bool:
    """Whether a DA value matches a DICOM date matcher (``D``, ``D1-D2``, ``-D2``, ``D1-``)."""
    value = value.strip()[:8]
    if "-" not in wanted:
        return value == wanted
    start, end = wanted.split("-", 1)
    return bool(value) and (not start or value >= start) and (not end or value <= end)


def _agrees(tags: Mapping[str, object], query: Mapping[str, str]) -> bool:
    """False when a returned value contradicts a key of the query (the PACS ignored that key).
    A key the PACS did not return cannot be checked here and is let through."""
    for keyword in ("StudyInstanceUID", "AccessionNumber", "PatientID", "StudyDate"):
        wanted = query.get(keyword, "")
        value = str(tags.get(keyword) or "")
        if not wanted or not value:
            continue
        if keyword == "StudyDate":
            if not _in_range(value, wanted):
                return False
        elif value != wanted:
            return False
    return True

# DIMSE "Cancel" (matching terminated): what an Orthanc PACS sends past its LimitFindResults,
# and what Orthanc 1.10.1 turns into a failed query with no answers at all.
CAPPED_STATUS = "0xFE00"


def _capped_query(orthanc: Orthanc, modality: str, query: dict[str, str], cap: int
                  ) -> dict[str, dict[str, str]] | None:
    """The answers agreeing with ``query``, one per StudyInstanceUID, or None when the PACS
    capped them (cancelled the query, or answered ``cap`` distinct studies or more)."""
    try:
        result = orthanc.query(modality, Level.STUDY, {**_RETURN_KEYS, **query})
    except OrthancDimseError as error:
        if error.dimse_status == CAPPED_STATUS:
            return None
        raise
    orthanc.delete_query(result.query_id)
    distinct: dict[str, dict[str, str]] = {}
    for answer in result.answers:
        uid = str(answer.get("StudyInstanceUID") or "")
        if uid:
            distinct.setdefault(uid, dict(answer.tags))
    if cap and len(distinct) >= cap:
        return None
    return {uid: tags for uid, tags in distinct.items() if _agrees(tags, query)}


def find_capped(orthanc: Orthanc, modality: str, criteria: Criteria, cap: int
                ) -> list[dict[str, str]]:
    """C-FIND the criteria; while a range is capped by the PACS (it cancelled the query, or it
    returned exactly ``cap`` answers), split the date range in two, down to single days."""
    answers: dict[str, dict[str, str]] = {}
    pending = [criteria.dates()]
    while pending:
        start, end = pending.pop()
        found = _capped_query(orthanc, modality, criteria.query(start, end), cap)
        if found is None:
            if start == end:
                raise CohortTooBroad(
                    f"the PACS returned its cap of {cap} answers for a single day: narrow "
                    f"the criteria (modality, description) so nothing is silently dropped")
            first = study_date(start)
            last = study_date(end)
            middle = first + (last - first) // 2
            pending.append(((middle + dt.timedelta(days=1)).strftime("%Y%m%d"), end))
            pending.append((start, middle.strftime("%Y%m%d")))
            continue
        for uid, tags in found.items():
            answers.setdefault(uid, tags)
    return list(answers.values())


def mismatch(orthanc: Orthanc, modality: str, criteria: Criteria,
             tags: Mapping[str, object]) -> str | None:
    """Which criterion a study answer fails, or None when it matches every one. A criterion
    the answer does not let us check counts as failed ("cannot be verified"): a study outside
    the cohort must never be moved. Modalities are read from ``ModalitiesInStudy`` when the PACS
    returned it, else from a series-level C-FIND of ``Modality``."""
    start, end = criteria.dates()
    if not _in_range(str(tags.get("StudyDate") or ""), f"{start}-{end}"):
        return "study date outside the range, or not returned by the PACS"
    if criteria.study_description:
        pattern = criteria.study_description.replace("[", "[[]")
        if not fnmatch.fnmatchcase(str(tags.get("StudyDescription") or ""), pattern):
            return "study description does not match, or was not returned by the PACS"
    if criteria.modalities:
        returned = str(tags.get("ModalitiesInStudy") or "")
        modalities = {m for m in returned.split("\\") if m}
        if not modalities:
            uid = str(tags.get("StudyInstanceUID") or "")
            series = orthanc.query(modality, Level.SERIES,
                                   {"StudyInstanceUID": uid, "SeriesInstanceUID": "",
                                    "Modality": ""})
            orthanc.delete_query(series.query_id)
            modalities = {str(a.get("Modality") or "") for a in series.answers
                          if str(a.get("StudyInstanceUID") or uid) == uid} - {""}
        if not modalities & set(criteria.modalities):
            return "no series of the requested modalities"
    return None


def plan_criteria(orthanc: Orthanc, modality: str, criteria: Criteria, cap: int, *,
                  concurrency: int = 1, slot: Slot = contextlib.nullcontext) -> list[PlanRow]:
    """One plan row per study the PACS answered (numbered in StudyDate order): ``found`` or
    ``already_present`` when it matches every criterion, ``excluded`` (with the criterion it
    fails in the note, no values) when the PACS ignored a filter.

    The criteria's C-FINDs run one after another under one ``slot()`` (a capped range is
    split); each answer's checks and counts then run ``concurrency`` at a time, each under
    ``slot()``.

    Raises:
        CohortTooBroad: A single day's C-FIND is still capped.
        OrthancDimseError: The PACS did not answer or refused.
    """
    with slot():
        found = find_capped(orthanc, modality, criteria, cap)
    answers = sorted(found, key=lambda t: (str(t.get("StudyDate", "")),
                                           str(t.get("StudyInstanceUID"))))

    def classify(item: tuple[int, dict[str, str]]) -> PlanRow:
        index, tags = item
        with slot():
            why = mismatch(orthanc, modality, criteria, tags)
            if why:
                return PlanRow(index=index, status=RowStatus.EXCLUDED, note=why)
            (study,) = _studies(orthanc, modality, [tags])
        return PlanRow(index=index, status=_status([study]), studies=(study,))

    return _each(classify, list(enumerate(answers, start=1)), concurrency)
