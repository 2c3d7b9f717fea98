"""Cohort files as spreadsheets and people make them, read by the one parser, and the report
written back in the file's own dialect, line for line (row identity = line number)."""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path

import pytest

from prefect_orthanc.flows.cohort import CollectionRequest
from prefect_orthanc.flows.cohort_file import CohortError, CohortFile
from prefect_orthanc.flows.collection import REPORT_COLUMNS, RowReport, _write_csv

DATA = Path(__file__).parent / "data" / "cohorts"

# A European Excel's "CSV UTF-8" export of a sheet with a note column and a column formatted
# far to the right: BOM, ';', CRLF, padded rows, quoted cells (one with ';', one with a line
# break), blank rows (empty and ';;;;'), comments and an Excel "sep=" line.
EXCEL_SEMICOLON = (
    "\ufeffsep=;\r\n"
    "# cohort lung-2026 exported by the study nurse\r\n"
    "Accession Number;Patient ID;Note;;\r\n"
    "000123;;\"left; then right\";;\r\n"
    ";;;;\r\n"
    "\r\n"
    ";0042;\"two\r\nlines\";;\r\n"
    "# second batch\r\n"
    "ACC9;;\"he said \"\"urgent\"\"\";;\r\n"
    "# end of export\r\n")


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _lines(path: Path, encoding: str = "utf-8-sig") -> list[str]:
    return path.read_bytes().decode(encoding).split("\r\n" if b"\r\n" in path.read_bytes()
                                                    else "\n")


def test_excel_semicolon_export_rows_are_their_line_numbers(tmp_path):
    cohort = CohortFile.read(_write(tmp_path, "c.csv", EXCEL_SEMICOLON.encode()))
    assert (cohort.delimiter, cohort.line_terminator, cohort.encoding) == (";", "\r\n",
                                                                           "utf-8-sig")
    assert [(r.index, r.accession_number, r.patient_id) for r in cohort.rows] == [
        (4, "000123", ""), (7, "", "0042"), (10, "ACC9", "")]
    kinds = [(r.line, r.kind) for r in cohort.records]
    assert kinds == [(1, "preamble"), (2, "comment"), (3, "header"), (4, "row"), (5, "blank"),
                     (6, "blank"), (7, "row"), (9, "comment"), (10, "row"), (11, "comment")]


def test_report_keeps_the_dialect_and_every_line(tmp_path):
    source = _write(tmp_path, "c.csv", EXCEL_SEMICOLON.encode())
    cohort = CohortFile.read(source)
    target = cohort.write_report(tmp_path / "c.report.csv", ["result_row", "result_status"],
                                 {r.index: [r.index, "collected"] for r in cohort.rows})
    data = target.read_bytes()
    assert data.startswith(codecs.BOM_UTF8) and b"\r\n" in data
    assert data.count(b"\n") == data.count(b"\r\n") == EXCEL_SEMICOLON.count("\n")
    lines = data.decode("utf-8-sig").split("\r\n")
    original = EXCEL_SEMICOLON.lstrip("\ufeff").split("\r\n")
    # blank, comment and sep= lines are copied; nothing is "skipped" after the blank lines
    for number in (1, 2, 5, 6, 9, 11):
        assert lines[number - 1] == original[number - 1]
    assert lines[2] == "Accession Number;Patient ID;Note;;;result_row;result_status"
    rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=";"))
    by_first_cell = {tuple(r[:2]): r for r in rows if len(r) == 7}
    assert by_first_cell[("000123", "")][2:] == ["left; then right", "", "", "4", "collected"]
    assert by_first_cell[("", "0042")][2] == "two\r\nlines"
    assert by_first_cell[("", "0042")][5:] == ["7", "collected"]
    assert by_first_cell[("ACC9", "")][2] == 'he said "urgent"'
    assert "," not in data.decode("utf-8-sig").replace("left; then right", "")


def test_the_report_reads_back_as_the_same_cohort(tmp_path):
    cohort = CohortFile.read(_write(tmp_path, "c.csv", EXCEL_SEMICOLON.encode()))
    report = cohort.write_report(tmp_path / "c.report.csv", ["result_status"],
                                 {r.index: ["collected"] for r in cohort.rows})
    again = CohortFile.read(report)
    assert again.rows == cohort.rows
    assert (again.delimiter, again.line_terminator, again.encoding) == (
        cohort.delimiter, cohort.line_terminator, cohort.encoding)


def test_excel_unicode_text_is_utf16_with_tabs(tmp_path):
    text = "PatientID\tStudyDate\tComment\r\nP001\t20240105\té\r\n\r\nP002\t\t\r\n"
    path = _write(tmp_path, "c.txt", codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    cohort = CohortFile.read(path)
    assert (cohort.delimiter, cohort.encoding) == ("\t", "utf-16")
    assert [(r.index, r.patient_id, r.study_date) for r in cohort.rows] == [
        (2, "P001", "20240105"), (4, "P002", "")]
    report = cohort.write_report(tmp_path / "c.report.txt", ["result_status"],
                                 {2: ["collected"], 4: ["not_found"]})
    written = report.read_bytes()
    assert written.startswith(codecs.BOM_UTF16_LE)
    assert written.decode("utf-16").split("\r\n") == [
        "PatientID\tStudyDate\tComment\tresult_status", "P001\t20240105\té\tcollected", "",
        "P002\t\t\tnot_found", ""]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_blank_lines_anywhere_keep_every_row_its_line(tmp_path, ending):
    text = ending.join(["", "patient_id,note", "", "P1,a", "", "", "P2,b", "P3,c", "", ""])
    cohort = CohortFile.read(_write(tmp_path, "c.csv", text.encode()))
    assert [r.index for r in cohort.rows] == [4, 7, 8]
    assert cohort.line_terminator == ending
    report = cohort.write_report(tmp_path / "r.csv", ["result_row"],
                                 {r.index: [r.index] for r in cohort.rows})
    lines = report.read_bytes().decode().split(ending)
    assert lines[3] == "P1,a,4" and lines[6] == "P2,b,7" and lines[7] == "P3,c,8"
    assert lines[:3] == ["", "patient_id,note,result_row", ""]


def test_title_lines_before_the_header_are_kept_not_read(tmp_path):
    text = ("Export from RIS 5.2,,\nPrinted 2026-01-05,,\n,,\n"
            "\"Study Instance UID\",\"Study Date\",\"Room\"\n"
            "\"1.2.840.10008.1\",\"20240102\",\"3\"\n")
    cohort = CohortFile.read(_write(tmp_path, "c.csv", text.encode()))
    assert [r.kind for r in cohort.records] == ["preamble", "preamble", "blank", "header", "row"]
    (row,) = cohort.rows
    assert (row.index, row.study_instance_uid, row.study_date) == (5, "1.2.840.10008.1",
                                                                   "20240102")


def test_a_quote_in_a_comment_does_not_swallow_rows(tmp_path):
    text = "accession_number|note\n# the \"new batch\n A1 |x\nA2|\"quoted | pipe\"\n"
    cohort = CohortFile.read(_write(tmp_path, "c.csv", text.encode()))
    assert cohort.delimiter == "|"
    assert [(r.index, r.accession_number) for r in cohort.rows] == [(3, "A1"), (4, "A2")]


def test_single_column_file_without_any_delimiter(tmp_path):
    cohort = CohortFile.read(_write(tmp_path, "c.csv", b"patient_id\n0001\n0002\n"))
    assert [r.patient_id for r in cohort.rows] == ["0001", "0002"]


@pytest.mark.parametrize("text, message", [
    ("patient_id;note\nP1;a;extra\n", "line 2: 3 cells, the header has 2"),
    ("patient_id,note\nP1,\"open cell\nP2,b\n", "line 2: a quote opened there is never"),
    ("patient_id,note\nP1,a\nP2,\"ab\"cd\n", "line 3: a quote opened there is never"),
    ("patient_id\n# only a comment\n\n", "no data rows"),
    ("# a comment\n\n", "no header row"),
    ("P1;20240101\nP2;20240102\n", "no header row"),
    ("patient_id;note\nP1,a\n", "line 2: 1 cells, the header has 2"),  # ',' in a ';' file
])
def test_problems_name_the_line_never_the_value(tmp_path, text, message):
    path = _write(tmp_path, "c.csv", text.encode())
    with pytest.raises(CohortError) as caught:
        CohortFile.read(path)
    assert message in str(caught.value)
    assert "P1" not in str(caught.value) and "open cell" not in str(caught.value)


def test_collection_report_of_a_semicolon_cohort_is_all_semicolons(tmp_path):
    """The regression: a ';' cohort gave a report mixing ';' and ',', and one blank line made
    every later row "skipped"."""
    source = _write(tmp_path, "lung.csv",
                    b"accession_number;note\r\nA1;x\r\n\r\nA2;y\r\nA3;z\r\n")
    cohort = CohortFile.read(source)
    request = CollectionRequest(cohort_file=str(source), report_dir=str(tmp_path / "reports"))
    reports = [RowReport(index=r.index, status="collected", studies=1, study_ids=("s",))
               for r in cohort.rows]
    path = _write_csv(request, cohort, reports, "run")
    assert path == tmp_path / "lung.report.csv"
    lines = path.read_bytes().decode().split("\r\n")
    assert lines[0] == "accession_number;note;" + ";".join(REPORT_COLUMNS)
    assert lines[1].startswith("A1;x;2;collected;") and lines[2] == ""
    assert lines[3].startswith("A2;y;4;collected;") and lines[4].startswith("A3;z;5;collected;")
    assert "skipped" not in path.read_text() and all("," not in line for line in lines)


def test_collection_report_keeps_a_tsv_cohort_a_tsv(tmp_path):
    source = _write(tmp_path, "lung.tsv", b"patient_id\tnote\nP1\tx\n")
    cohort = CohortFile.read(source)
    request = CollectionRequest(cohort_file=str(source))
    path = _write_csv(request, cohort, [RowReport(index=2, status="not_found")], "run")
    assert path.name == "lung.report.tsv"
    assert path.read_text().splitlines()[1].split("\t")[:4] == ["P1", "x", "2", "not_found"]


@pytest.mark.parametrize("fixture", sorted(p.name for p in DATA.glob("*.csv"))
                         if DATA.is_dir() else [])
def test_files_exported_by_a_spreadsheet_program(tmp_path, fixture):
    """Cohorts saved by LibreOffice Calc (7.4, headless) from one sheet, in the dialects a
    site's spreadsheet offers; see data/cohorts/README.md. Every export reads as the same
    rows, and its report is the export itself with the result columns added."""
    cohort = CohortFile.read(DATA / fixture)
    assert [(r.accession_number, r.patient_id, r.study_date) for r in cohort.rows] == [
        ("000123", "", ""), ("", "0042", "20240105"), ("ACC9", "", "")]
    report = cohort.write_report(tmp_path / fixture, ["result_status"],
                                 {r.index: ["collected"] for r in cohort.rows})
    again = CohortFile.read(report)
    assert again.rows == cohort.rows
    assert (again.delimiter, again.encoding) == (cohort.delimiter, cohort.encoding)
    assert [(r.line, r.kind) for r in again.records] == [(r.line, r.kind) for r in cohort.records]
    assert [r.cells[-1] for r in again.records if r.kind in ("header", "row")] == [
        "result_status"] + ["collected"] * 3
    assert ";;;" in (DATA / fixture).read_bytes().decode(cohort.encoding) or \
        cohort.delimiter != ";"  # Calc's blank row, copied as it is


# Headers as hospital exports (RIS, PACS worklists, EHR reports, spreadsheets) name them.
ALIASES = {
    "accession_number": ["Accession", "Accession No", "Accession No.", "Acc#", "ACC_NUM",
                         "AccessionNumber", "accession number", "Acc. No.", "Accession #"],
    "patient_id": ["MRN", "Patient ID", "PatientID", "patient-id", "Medical Record Number",
                   "Patient MRN", "MR Number"],
    "study_instance_uid": ["Study UID", "StudyInstanceUID", "Study Instance UID"],
    "study_date": ["Study Date", "StudyDate", "Exam Date"],
}


@pytest.mark.parametrize(("column", "name"), [(c, n) for c, names in ALIASES.items()
                                              for n in names])
def test_export_names_read_as_their_column(tmp_path: Path, column: str, name: str) -> None:
    value = {"accession_number": "ONLY-THIS-ONE", "patient_id": "0047",
             "study_instance_uid": "1.2.3.4", "study_date": "20240105"}[column]
    key = "" if column != "study_date" else "patient_id,"
    cells = "" if column != "study_date" else "P1;"
    text = f"{key.replace(',', ';')}{name}\n{cells}{value}\n"
    cohort = CohortFile.read(_write(tmp_path, "c.csv", text.encode()))
    assert getattr(cohort.rows[0], column) == value
    assert cohort.extra_columns == ()


def test_tester_file_narrows_to_the_accession(tmp_path: Path) -> None:
    """Found by a tester: 'Accession' was ignored, so the query was the whole patient."""
    path = _write(tmp_path, "acc3.csv", b"Patient ID;Accession\ncookie-47;ONLY-THIS-ONE\n")
    (row,) = CohortFile.read(path).rows
    assert row.query() == {"AccessionNumber": "ONLY-THIS-ONE", "PatientID": "cookie-47"}


@pytest.mark.parametrize("name", [
    "Order ID", "OrderID", "Visit ID", "Pat ID", "PID", "Exam No", "ExamNumber", "Case No",
    "Encounter Number", "Patient Name", "PatientName", "Study Description", "study_id",
    "SeriesInstanceUID", "UID", "Record", "Date", "DOB", "Date of birth", "Acc Nbr", "Key"])
def test_unread_identifier_like_column_refused_by_name(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, "c.csv", f"patient_id,{name}\nP-SECRET,V-SECRET\n".encode())
    with pytest.raises(CohortError) as caught:
        CohortFile.read(path)
    message = str(caught.value)
    assert repr(name) in message and "accession_number" in message and "MRN" in message
    assert "SECRET" not in message and "\n" not in message


@pytest.mark.parametrize("name", [
    "notes", "Note", "comment", "Comments", "site", "Site", "Modality", "Reason", "Priority",
    "Sex", "Age", "Requested by", "Referring Physician", "Body Part", "Description", "Ward",
    "Department", "Status", "Protocol", "Series", "Account", "covid", "Valid", "Radiologist",
    "Note: old MRN", "comment (study)"])
def test_other_columns_carried_along_and_named(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, "c.csv", f"MRN,{name}\nP1,x\n".encode())
    cohort = CohortFile.read(path)
    assert cohort.rows[0].patient_id == "P1"
    assert cohort.extra_columns == (name,)
    report = cohort.write_report(tmp_path / "r.csv", ["result"], {2: ["ok"]})
    assert report.read_text().splitlines()[0] == f"MRN,{name},result"


def test_identifier_only_under_an_unknown_name_says_the_accepted_names(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.csv", b"Requisition\nR1\n")
    with pytest.raises(CohortError, match=r"no header row.*Acc#.*MRN"):
        CohortFile.read(path)


def test_read_cohort_reads_relative_paths_under_the_data_directory(tmp_path, monkeypatch):
    """As the flows' cohort_file: a task a user writes finds the same file, wherever it runs."""
    from prefect_orthanc.flows.cohort_file import read_cohort

    data = tmp_path / "data"
    (data / "cohorts").mkdir(parents=True)
    (data / "cohorts" / "lung.csv").write_text("Accession\nA1\n")
    monkeypatch.setenv("PREFECT_ORTHANC_DATA_DIR", str(data))
    monkeypatch.chdir(tmp_path)
    assert [row.accession_number for row in read_cohort("cohorts/lung.csv")] == ["A1"]
    with pytest.raises(CohortError) as caught:
        read_cohort("cohorts/absent.csv")
    assert str(caught.value) == (
        f"cohort file not found: {data / 'cohorts' / 'absent.csv'}: put the cohort there or "
        f"set another path (relative to PREFECT_ORTHANC_DATA_DIR={data})")


def test_cohort_file_read_says_what_a_relative_path_was_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CohortError, match=rf"^cohort file not found: c\.csv \(relative to the "
                                          rf"working directory {tmp_path}\)$"):
        CohortFile.read("c.csv")


@pytest.mark.parametrize("header", ['patient_id,"accession', 'patient_id,"accession"x',
                                    '"Patient ID";"Accession', 'MRN\t"Acc#'])
def test_a_broken_quote_in_the_header_is_refused_not_repaired(tmp_path, header):
    """Found by a tester: 'patient_id,"accession' was read as two columns and the report's
    header rewritten."""
    delimiter = ";" if ";" in header else "\t" if "\t" in header else ","
    path = _write(tmp_path, "c.csv", f"{header}\nP1{delimiter}A1\n".encode())
    with pytest.raises(CohortError, match=r"^c\.csv: line 1 \(the header\): a quote opened "):
        CohortFile.read(path)


@pytest.mark.parametrize("cell", ["8.00E+15", "8,00E+15", "1.23457e+11", "8E+15"])
def test_identifiers_a_spreadsheet_turned_into_numbers_are_refused(tmp_path, cell):
    """Found by a tester: an accession Excel showed as 8.00E+15 was merely 'not found'."""
    path = _write(tmp_path, "c.csv", f'accession_number;patient_id\n"{cell}";P1\n'.encode())
    with pytest.raises(CohortError, match=r"line 2: accession_number is a number a spreadsheet "
                                          r"rewrote \(like 8\.00E\+15\): format the column as "
                                          r"Text"):
        CohortFile.read(path)


@pytest.mark.parametrize("cell", ["ACC8E+15", "8.00E-15X", "E+15", "12345678"])
def test_identifiers_that_only_resemble_numbers_pass(tmp_path, cell):
    path = _write(tmp_path, "c.csv", f"accession_number\n{cell}\n".encode())
    assert CohortFile.read(path).rows[0].accession_number == cell
