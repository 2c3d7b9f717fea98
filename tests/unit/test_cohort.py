"""Cohort files, criteria and time windows: malformed input fails fast, by line and field.
(Real-world file shapes and the report: test_cohort_file.py.)"""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from prefect_orthanc.flows.cohort import CollectionRequest, Criteria, TimeWindow
from prefect_orthanc.flows.cohort_file import CohortError, read_cohort


def _csv(tmp_path, text, name="cohort.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_rows_keeping_leading_zeros(tmp_path):
    rows = read_cohort(_csv(tmp_path, "Accession Number,patient_id,extra\n"
                                      " 000123 ,,x\n\n,0042,y\n"))
    assert [(r.index, r.accession_number, r.patient_id) for r in rows] == [
        (2, "000123", ""), (4, "", "0042")]  # line numbers: line 3 is blank
    assert rows[0].query() == {"AccessionNumber": "000123"}
    assert "000123" not in repr(rows[0])


def test_semicolon_and_bom_are_accepted(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("\ufeffstudy_instance_uid;study_date\n1.2.3;20240105\n".encode())
    (row,) = read_cohort(path)
    assert row.query() == {"StudyInstanceUID": "1.2.3", "StudyDate": "20240105"}


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("name,age\nA,1\n", "no header row with any of the columns"),
    ("accession_number\n", "no data rows"),
    ("accession_number,patient_id\nA1\n", "line 2: 1 cells, the header has 2"),
    ("accession_number,patient_id\n,\n ,x\n", None),
    ("study_instance_uid\n1.2.abc\n", "line 2: study_instance_uid is not a DICOM UID"),
    ("study_instance_uid\n1.02.3\n", "line 2: study_instance_uid is not a DICOM UID"),
    ("patient_id,study_date\nP1,2024-01-05\n", "line 2: study_date is not YYYYMMDD"),
    ("patient_id,study_date\nP1,20240231\n", "line 2: study_date is not YYYYMMDD"),
    ("accession_number\nAC*\n", "line 2: wildcards"),
    # an accession is SH (16 characters), a patient ID LO (64): a longer value was asked of
    # the PACS and reported not_found, as if the study did not exist
    ("accession_number\nACC-2024-000123456789\n",
     "line 2: accession_number is longer than a DICOM AccessionNumber can be (SH: 16"),
    ("patient_id\n" + "P" * 65 + "\n",
     "line 2: patient_id is longer than a DICOM PatientID can be (LO: 64"),
    ("patient_id\nP1\x07\n", "line 2: patient_id holds control characters"),
    ("accession_number,AccessionNumber\nA,B\n", "names accession_number more than once"),
])
def test_malformed_files_name_the_line(tmp_path, text, message):
    if message is None:  # blank rows are skipped; a row with only unknown data is an error
        text, message = "accession_number,patient_id,note\n,,hello\n", "line 2: no accession"
    with pytest.raises(CohortError) as caught:
        read_cohort(_csv(tmp_path, text))
    assert message in str(caught.value)


def test_errors_never_echo_cell_values(tmp_path):
    secret = "SECRETMRN99"
    with pytest.raises(CohortError) as caught:
        read_cohort(_csv(tmp_path, f"patient_id,study_date\n{secret},notadate\n"))
    assert secret not in str(caught.value) and "notadate" not in str(caught.value)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(CohortError) as caught:
        read_cohort(_csv(tmp_path, "study_instance_uid,study_date\nx,1\ny,2\n"))
    assert "2 problem(s)" in str(caught.value) and "line 3" in str(caught.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(CohortError, match="not found"):
        read_cohort(tmp_path / "nope.csv")
    path = tmp_path / "bin.csv"
    path.write_bytes(b"patient_id\n\x81\xfe\x00\n")
    with pytest.raises(CohortError, match="not UTF-8"):
        read_cohort(path)


def test_criteria_validation_and_query():
    criteria = Criteria(modalities=["ct", "MR"], date_from="2024-01-01", date_to="20240131",
                        study_description="CHEST*")
    assert criteria.query() == {"StudyDate": "20240101-20240131",
                                "ModalitiesInStudy": "CT\\MR", "StudyDescription": "CHEST*"}
    assert criteria.query("20240110", "20240112")["StudyDate"] == "20240110-20240112"
    for bad in (dict(date_from="20240201", date_to="20240101"),
                dict(date_from="2024011", date_to="20240131"),
                dict(date_from="20240101", date_to="20240131", modalities=["C-T"])):
        with pytest.raises(ValidationError):
            Criteria(**bad)


def test_request_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one"):
        CollectionRequest()
    with pytest.raises(ValidationError, match="exactly one"):
        CollectionRequest(cohort_file="a.csv",
                          criteria=Criteria(date_from="20240101", date_to="20240102"))
    with pytest.raises(ValidationError, match="project"):
        CollectionRequest(cohort_file="a.csv", project="no spaces please")
    assert CollectionRequest(cohort_file="a.csv").concurrency == 4


def test_time_window_across_midnight():
    window = TimeWindow(start="19:00", end="07:00", timezone="Europe/Brussels")
    utc = dt.UTC
    assert window.is_open(dt.datetime(2026, 1, 15, 22, 0, tzinfo=utc))  # 23:00 in Brussels
    assert window.is_open(dt.datetime(2026, 1, 15, 5, 0, tzinfo=utc))  # 06:00
    assert not window.is_open(dt.datetime(2026, 1, 15, 12, 0, tzinfo=utc))  # 13:00
    assert window.seconds_until_open(dt.datetime(2026, 1, 15, 12, 0, tzinfo=utc)) == 6 * 3600
    assert window.seconds_until_open(dt.datetime(2026, 1, 15, 22, 0, tzinfo=utc)) == 0
    day = TimeWindow(start="08:00", end="18:00", timezone="UTC")
    assert day.is_open(dt.datetime(2026, 1, 15, 8, 0, tzinfo=utc))
    assert not day.is_open(dt.datetime(2026, 1, 15, 18, 0, tzinfo=utc))
    assert day.seconds_until_open(dt.datetime(2026, 1, 15, 19, 0, tzinfo=utc)) == 13 * 3600
    with pytest.raises(ValidationError):
        TimeWindow(start="25:00")
    with pytest.raises(ValidationError):
        TimeWindow(timezone="Mars/Olympus")


def test_criteria_last_days_counts_back_from_the_run_day():
    import datetime as dt

    from prefect_orthanc.flows.cohort import Criteria

    criteria = Criteria(last_days=2, modalities=["ct"])
    assert criteria.dates(dt.date(2026, 3, 1)) == ("20260228", "20260301")
    assert Criteria(date_from="20260101", date_to="20260131").dates() == ("20260101", "20260131")
    query = criteria.query()
    assert query["ModalitiesInStudy"] == "CT" and query["StudyDate"].count("-") == 1


@pytest.mark.parametrize("fields", [{}, {"date_from": "20260101"},
                                    {"last_days": 3, "date_from": "20260101",
                                     "date_to": "20260102"}])
def test_criteria_need_one_kind_of_date_range(fields):
    from pydantic import ValidationError

    from prefect_orthanc.flows.cohort import Criteria

    with pytest.raises(ValidationError):
        Criteria(**fields)
