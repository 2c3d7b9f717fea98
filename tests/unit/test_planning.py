"""Planning checks answers against the question: deduplication, caps on distinct studies,
answers contradicting the query, criteria a PACS ignored. A small in-memory PACS stands in for
the client (the same calls the real one answers)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import pytest

from prefect_orthanc.flows.cohort import Criteria
from prefect_orthanc.flows.cohort_file import CohortRow
from prefect_orthanc.flows.planning import (
    CohortTooBroad,
    RowStatus,
    find_capped,
    mismatch,
    plan_criteria,
    plan_rows,
)
from prefect_orthanc.orthanc_client import (
    CountSource,
    ExpectedCount,
    Level,
    OrthancDimseError,
    QueryAnswer,
    QueryRefused,
    QueryResult,
)

# (study uid, patient, accession, date, description, series modalities, instances)
STUDIES = [("1.1", "P1", "A1", "20240105", "CHEST CT", ("CT",), 4),
           ("1.2", "P1", "A2", "20240106", "BRAIN MR", ("MR",), 3),
           ("1.3", "P1", "A3", "20240107", "CHEST CT", ("CT", "SR"), 2),
           ("1.4", "P2", "A4", "20240301", "ABDOMEN CT", ("CT",), 5)]


class FakePacs:
    """Answers like dcmqrscp: no counts, ModalitiesInStudy dropped and ignored as a filter;
    optionally once per instance, or silently capped."""

    def __init__(self, *, per_instance: bool = False, silent_cap: int | None = None,
                 ignore: tuple[str, ...] = ()) -> None:
        self.per_instance, self.silent_cap, self.ignore = per_instance, silent_cap, ignore
        self.series_queries = 0

    def _study_matches(self, study: tuple, query: dict[str, str]) -> bool:
        uid, patient, accession, date, description, _, _ = study
        values = {"StudyInstanceUID": uid, "PatientID": patient, "AccessionNumber": accession,
                  "StudyDescription": description}
        for key, wanted in query.items():
            if not wanted or key in self.ignore or key == "ModalitiesInStudy":
                continue
            if key == "StudyDate":
                start, _, end = wanted.partition("-")
                if not (start <= date <= (end or start)):
                    return False
            elif key in values and values[key] != wanted:
                return False
        return True

    def query(self, modality: str, level: Any, query: dict[str, str]) -> QueryResult:
        answers = []
        if Level(level) is Level.STUDY:
            for study in STUDIES:
                if self._study_matches(study, query):
                    uid, patient, accession, date, description, _, count = study
                    tags = {"StudyInstanceUID": uid, "PatientID": patient,
                            "AccessionNumber": accession, "StudyDate": date,
                            "StudyDescription": description}
                    answers += [tags] * (count if self.per_instance else 1)
        else:
            self.series_queries += 1
            for study in STUDIES:
                if study[0] == query["StudyInstanceUID"]:
                    answers += [{"StudyInstanceUID": study[0],
                                 "SeriesInstanceUID": f"{study[0]}.{i}", "Modality": m}
                                for i, m in enumerate(study[5])]
        if self.silent_cap is not None:
            answers = answers[:self.silent_cap]
        return QueryResult(query_id="q", modality=modality, level=Level(level),
                           answers=tuple(QueryAnswer(index=i, tags=t)
                                         for i, t in enumerate(answers)))

    def delete_query(self, query_id: str) -> None:
        pass

    def expected_instances(self, modality: str, uid: str, answers: Any) -> ExpectedCount:
        count = next(s[6] for s in STUDIES if s[0] == uid)
        return ExpectedCount(total=count, source=CountSource.INSTANCES)

    def find(self, level: Any, query: dict[str, str]) -> list[str]:
        return []


def test_ignored_modality_filter_is_checked_on_series():
    plan = plan_criteria(FakePacs(), "pacs",
                         Criteria(modalities=["CT"], date_from="20240101", date_to="20240131"),
                         cap=0)
    statuses = [row.status for row in plan]
    assert statuses == [RowStatus.FOUND, RowStatus.EXCLUDED, RowStatus.FOUND]
    assert "modalit" in plan[1].note and "MR" not in plan[1].note
    assert [row.studies[0].count_source for row in plan if row.studies] == ["instances"] * 2


def test_ignored_description_and_dates_are_checked():
    pacs = FakePacs(ignore=("StudyDescription", "StudyDate"))
    plan = plan_criteria(pacs, "pacs", Criteria(study_description="CHEST*",
                                                date_from="20240101", date_to="20240106"), 0)
    # answers outside the date range contradict the query: dropped before planning; the one
    # in range with another description is an excluded row, never moved
    assert [row.status for row in plan] == [RowStatus.FOUND, RowStatus.EXCLUDED]
    assert plan[0].studies[0].uid == "1.1"


def test_unverifiable_criterion_excludes():
    tags = {"StudyInstanceUID": "1.1", "StudyDate": ""}
    assert mismatch(FakePacs(), "pacs", Criteria(date_from="20240101", date_to="20241231"),
                    tags)


def test_one_answer_per_instance_counts_distinct_studies_against_the_cap():
    criteria = Criteria(date_from="20240101", date_to="20241231")
    assert len(find_capped(FakePacs(per_instance=True), "pacs", criteria, cap=5)) == 4
    with pytest.raises(CohortTooBroad):  # still at the cap for a single day: say so
        find_capped(FakePacs(), "pacs", Criteria(date_from="20240105", date_to="20240105"),
                    cap=1)


def test_silent_cap_on_patient_and_accession_rows():
    rows = [CohortRow(index=1, patient_id="P1"), CohortRow(index=2, accession_number="A4")]
    plan = plan_rows(FakePacs(silent_cap=2), "pacs", rows, cap=2)
    assert plan[0].status is RowStatus.TOO_MANY and "study_date" in plan[0].note
    assert plan[1].status is RowStatus.FOUND


def test_answers_contradicting_the_row_are_dropped():
    """A PACS that ignores AccessionNumber answers every study: only the asked one is kept."""
    plan = plan_rows(FakePacs(ignore=("AccessionNumber",)), "pacs",
                     [CohortRow(index=1, accession_number="A2")])
    assert plan[0].status is RowStatus.FOUND and len(plan[0].studies) == 1
    assert plan[0].studies[0].uid == "1.2"


def test_rows_deduplicate_answers_per_instance():
    plan = plan_rows(FakePacs(per_instance=True), "pacs", [CohortRow(index=1, patient_id="P1")])
    assert len(plan[0].studies) == 3


# ------------------------------------------------------------------ rows planned in parallel

class SlowPacs(FakePacs):
    """Answers each study-level C-FIND after a delay that differs by row (later rows answer
    first), and counts how many exchanges are inside the caller's slot at once."""

    def __init__(self, *, refuse: str = "", fail: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refuse, self.fail = refuse, fail
        self.lock = threading.Lock()
        self.holding = self.peak = self.queries = 0

    def slot(self) -> contextlib.AbstractContextManager[object]:
        pacs = self

        @contextlib.contextmanager
        def held():
            with pacs.lock:
                pacs.holding += 1
                pacs.peak = max(pacs.peak, pacs.holding)
            try:
                yield
            finally:
                with pacs.lock:
                    pacs.holding -= 1
        return held()

    def query(self, modality: str, level: Any, query: dict[str, str]) -> QueryResult:
        assert self.holding, "a C-FIND outside the slot"
        with self.lock:
            self.queries += 1
        wanted = query.get("AccessionNumber") or query.get("PatientID") or ""
        if wanted and wanted == self.refuse:
            raise QueryRefused("refused", method="POST", route="/modalities/{name}/query",
                               status_code=500, dimse_status="0xA900")
        if wanted and wanted == self.fail:
            raise OrthancDimseError("no association", method="POST",
                                    route="/modalities/{name}/query", status_code=500,
                                    dimse_status=None)
        time.sleep(0.002 * (8 - len(wanted)) if wanted else 0)
        return super().query(modality, level, query)


MIXED = [CohortRow(index=1, accession_number="A3"),  # found
         CohortRow(index=2, patient_id="P1"),  # P1's other two studies
         CohortRow(index=3, accession_number="A9"),  # not found
         CohortRow(index=4, accession_number="A1"),  # duplicate of row 2
         CohortRow(index=5, study_instance_uid="1.4"),  # found
         CohortRow(index=6, accession_number="XREF"),  # refused: query_failed
         CohortRow(index=7, patient_id="P2"),  # duplicate of row 5
         CohortRow(index=8, accession_number="A3")]  # duplicate of row 1


@pytest.mark.parametrize("concurrency", [2, 4, 16])
def test_rows_planned_in_parallel_read_as_one_after_another(concurrency):
    """The same plan, statuses, studies and 'same study as row N' notes, whatever order the
    answers come back in; never more C-FINDs in flight than the concurrency."""
    alone = SlowPacs(refuse="XREF")
    one_by_one = plan_rows(alone, "pacs", MIXED, slot=alone.slot)
    assert alone.peak == 1
    pacs = SlowPacs(refuse="XREF")
    parallel = plan_rows(pacs, "pacs", MIXED, concurrency=concurrency, slot=pacs.slot)
    assert parallel == one_by_one
    assert [r.status for r in parallel] == [
        RowStatus.FOUND, RowStatus.FOUND, RowStatus.NOT_FOUND, RowStatus.DUPLICATE,
        RowStatus.FOUND, RowStatus.QUERY_FAILED, RowStatus.DUPLICATE, RowStatus.DUPLICATE]
    assert [r.note for r in parallel if r.status is RowStatus.DUPLICATE] == [
        "same study as row 2", "same study as row 5", "same study as row 1"]
    assert {s.uid for s in parallel[1].studies} == {"1.1", "1.2"}  # not row 1's 1.3
    assert 1 < pacs.peak <= concurrency and pacs.holding == 0


def test_rows_are_in_flight_together():
    """Two rows' C-FINDs are under way at once (a barrier only two at once can pass)."""
    barrier = threading.Barrier(2, timeout=10)

    class Meeting(FakePacs):
        def query(self, modality, level, query):
            barrier.wait()  # BrokenBarrierError if the rows ran one after another
            return super().query(modality, level, query)

    rows = [CohortRow(index=1, accession_number="A1"), CohortRow(index=2, accession_number="A4")]
    plan = plan_rows(Meeting(), "pacs", rows, concurrency=2)
    assert [r.status for r in plan] == [RowStatus.FOUND, RowStatus.FOUND]


def test_a_pacs_failure_stops_planning_and_is_raised():
    """Not a row's own refusal: the PACS failing as a whole is raised (retried by the task),
    never turned into rows; rows far behind it are never asked."""
    pacs = SlowPacs(fail="A2")
    rows = [CohortRow(index=1, accession_number="A1"), CohortRow(index=2, accession_number="A2"),
            *(CohortRow(index=i, accession_number=f"A{i}") for i in range(3, 40))]
    with pytest.raises(OrthancDimseError) as raised:
        plan_rows(pacs, "pacs", rows, concurrency=2, slot=pacs.slot)
    assert not isinstance(raised.value, QueryRefused)
    assert pacs.queries < len(rows) and pacs.holding == 0


def test_criteria_answers_checked_in_parallel_read_as_one_after_another():
    criteria = Criteria(modalities=["CT"], date_from="20240101", date_to="20241231")
    one_by_one = plan_criteria(FakePacs(), "pacs", criteria, 0)
    pacs = SlowPacs()
    assert plan_criteria(pacs, "pacs", criteria, 0, concurrency=3, slot=pacs.slot) == one_by_one
    assert [r.status for r in one_by_one] == [RowStatus.FOUND, RowStatus.EXCLUDED,
                                              RowStatus.FOUND, RowStatus.FOUND]
    assert pacs.holding == 0
