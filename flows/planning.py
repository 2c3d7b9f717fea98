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

Plain functions over an ``Orthanc`` client, so they can be tested and reused without Prefect.
UIDs stay in memory (``PlannedStudy.uid`` is out of repr); reports use ``key`` hashes.
"""

from __future__ import annotations

import datetime as dt
import enum
import fnmatch
from collections.abc import Iterable, Mapping

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


def plan_rows(orthanc: Orthanc, modality: str, rows: Iterable[CohortRow], cap: int = 0
              ) -> list[PlanRow]:
    """Classify each cohort row: found / not found / ambiguous / already present / duplicate /
    too many matches.

    A row naming an accession number or a study UID must match exactly one study (several is
    ambiguous: nothing is moved for it). A row with only a patient ID (and maybe a date) asks
    for every matching study; when the PACS answers ``cap`` distinct studies or more (or
    cancels the query) the row is ``too_many_matches``, never silently truncated.
    """
    plan: list[PlanRow] = []
    seen: dict[str, int] = {}
    for row in rows:
        try:
            found = _capped_query(orthanc, modality, row.query(), cap)
        except (OrthancBadRequest, QueryRefused) as error:  # this row's, not the PACS's
            plan.append(PlanRow(index=row.index, status=RowStatus.QUERY_FAILED,
                                note=f"query_failed: {error}"))
            continue
        if found is None:
            plan.append(PlanRow(index=row.index, status=RowStatus.TOO_MANY,
                                note="the PACS answered its cap of matches (find_cap) or "
                                     "cancelled the query: add a study_date to the row"))
            continue
        unique = found
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
        try:
            studies = _studies(orthanc, modality,
                               (t for uid, t in unique.items() if uid not in seen))
        except (OrthancBadRequest, QueryRefused) as error:
            plan.append(PlanRow(index=row.index, status=RowStatus.QUERY_FAILED,
                                note=f"query_failed: {error}"))
            continue
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


def plan_criteria(orthanc: Orthanc, modality: str, criteria: Criteria, cap: int
                  ) -> list[PlanRow]:
    """One plan row per study the PACS answered (numbered in StudyDate order): ``found`` or
    ``already_present`` when it matches every criterion, ``excluded`` (with the criterion it
    fails in the note, no values) when the PACS ignored a filter."""
    answers = sorted(find_capped(orthanc, modality, criteria, cap),
                     key=lambda t: (str(t.get("StudyDate", "")), str(t.get("StudyInstanceUID"))))
    plan = []
    for index, tags in enumerate(answers, start=1):
        why = mismatch(orthanc, modality, criteria, tags)
        if why:
            plan.append(PlanRow(index=index, status=RowStatus.EXCLUDED, note=why))
            continue
        (study,) = _studies(orthanc, modality, [tags])
        plan.append(PlanRow(index=index, status=_status([study]), studies=(study,)))
    return plan
