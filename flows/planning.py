"""Resolve a cohort against the PACS before anything moves: one C-FIND per row (or per date
range for criteria), every row classified, and what is already here recognised.

Plain functions over an ``Orthanc`` client, so they can be tested and reused without Prefect.
UIDs stay in memory (``PlannedStudy.uid`` is out of repr); reports use ``key`` hashes.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from orthanc_client import Level, Orthanc, OrthancDimseError, SafeMessageError
from orthanc_client.retrieval import uid_key

from .cohort import CohortRow, Criteria

__all__ = ["RowStatus", "PlannedStudy", "PlanRow", "CohortTooBroad", "plan_rows",
           "plan_criteria", "find_capped"]

_RETURN_KEYS = {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""}


class RowStatus(str, enum.Enum):
    FOUND = "found"
    NOT_FOUND = "not_found"
    AMBIGUOUS = "ambiguous"
    ALREADY_PRESENT = "already_present"
    DUPLICATE = "duplicate"
    TOO_MANY = "too_many_matches"


class PlannedStudy(BaseModel):
    model_config = ConfigDict(frozen=True)

    uid: str = Field(repr=False)
    key: str
    expected: int | None
    present: bool


class PlanRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    status: RowStatus
    studies: tuple[PlannedStudy, ...] = ()
    note: str = ""


class CohortTooBroad(SafeMessageError, ValueError):
    """Criteria whose C-FIND stays capped even for a single day: nothing would be complete."""


def _count(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _local_complete(orthanc: Orthanc, uid: str, expected: int | None) -> bool:
    if not expected:
        return False
    held = sum(orthanc.count_instances(Level.STUDY, study_id)
               for study_id in orthanc.find(Level.STUDY, {"StudyInstanceUID": uid}))
    return held >= expected


def _studies(orthanc: Orthanc, answers: Iterable[dict[str, str]]) -> list[PlannedStudy]:
    studies = []
    for tags in answers:
        uid = str(tags.get("StudyInstanceUID", ""))
        expected = _count(tags.get("NumberOfStudyRelatedInstances"))
        studies.append(PlannedStudy(uid=uid, key=uid_key(uid), expected=expected,
                                    present=_local_complete(orthanc, uid, expected)))
    return studies


def _status(studies: list[PlannedStudy], found: RowStatus = RowStatus.FOUND) -> RowStatus:
    return RowStatus.ALREADY_PRESENT if all(s.present for s in studies) else found


def plan_rows(orthanc: Orthanc, modality: str, rows: Iterable[CohortRow]) -> list[PlanRow]:
    """Classify each cohort row: found / not found / ambiguous / already present / duplicate.

    A row naming an accession number or a study UID must match exactly one study (several is
    ambiguous: nothing is moved for it). A row with only a patient ID (and maybe a date) asks
    for every matching study.
    """
    plan: list[PlanRow] = []
    seen: dict[str, int] = {}
    for row in rows:
        found = _capped_query(orthanc, modality, row.query(), 0)
        if found is None:
            plan.append(PlanRow(index=row.index, status=RowStatus.TOO_MANY,
                                note="the PACS capped the answers: add a study_date"))
            continue
        unique = {str(t.get("StudyInstanceUID")): t for t in found}
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
        studies = _studies(orthanc, (t for uid, t in unique.items() if uid not in seen))
        for study in studies:
            seen[study.uid] = row.index
        plan.append(PlanRow(index=row.index, status=_status(studies), studies=tuple(studies)))
    return plan


# DIMSE "Cancel" (matching terminated): what an Orthanc PACS sends past its LimitFindResults,
# and what Orthanc 1.10.1 turns into a failed query with no answers at all.
CAPPED_STATUS = "0xFE00"


def _capped_query(orthanc: Orthanc, modality: str, query: dict[str, str], cap: int
                  ) -> list[dict[str, str]] | None:
    """The answers, or None when the PACS capped them (cancelled, or exactly ``cap`` answers)."""
    try:
        result = orthanc.query(modality, Level.STUDY, {**_RETURN_KEYS, **query})
    except OrthancDimseError as error:
        if error.dimse_status == CAPPED_STATUS:
            return None
        raise
    orthanc.delete_query(result.query_id)
    if cap and len(result.answers) >= cap:
        return None
    return [dict(a.tags) for a in result.answers]


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
            first = dt.datetime.strptime(start, "%Y%m%d").date()
            last = dt.datetime.strptime(end, "%Y%m%d").date()
            middle = first + (last - first) // 2
            pending.append(((middle + dt.timedelta(days=1)).strftime("%Y%m%d"), end))
            pending.append((start, middle.strftime("%Y%m%d")))
            continue
        for tags in found:
            answers.setdefault(str(tags.get("StudyInstanceUID")), tags)
    return list(answers.values())


def plan_criteria(orthanc: Orthanc, modality: str, criteria: Criteria, cap: int
                  ) -> list[PlanRow]:
    """One plan row per study matching the criteria (numbered in StudyDate order)."""
    answers = sorted(find_capped(orthanc, modality, criteria, cap),
                     key=lambda t: (str(t.get("StudyDate", "")), str(t.get("StudyInstanceUID"))))
    plan = []
    for index, study in enumerate(_studies(orthanc, answers), start=1):
        plan.append(PlanRow(index=index, status=_status([study]), studies=(study,)))
    return plan
