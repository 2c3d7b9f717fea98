"""The research collection flow end to end on the lab: plan, retrieve, verify, report, resume."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from prefect.client.orchestration import get_client
from pydicom.uid import generate_uid

from prefect_orthanc.flows.cohort import Criteria
from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Orthanc
from prefect_orthanc.tasks.labels import labels_of

pytestmark = pytest.mark.usefixtures("prefect_server")
REPO = Path(__file__).resolve().parents[2]


def _forget(research: Orthanc, studies) -> None:
    for study in studies:
        research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _move_jobs(research: Orthanc) -> set[str]:
    jobs = research.request("GET", "/jobs", params={"expand": ""}, safe=True)
    return {job["ID"] for job in jobs if job["Type"] == "DicomMoveScu"}


def _copy_with_same_accession(peer, study) -> None:
    """Another patient's study carrying the same accession number: a classic ambiguity."""
    series: dict[str, str] = {}  # source series UID -> the copy's
    study_uid, copies = generate_uid(), []
    for path in study.files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID = "OTHER0001"
        copies.append(ds)
    peer.store_datasets(copies)


def test_accession_cohort_with_unknown_ambiguous_and_present_rows(
        research_env, research, pacs_peer, cohort, tmp_path):
    present, ambiguous, wanted = cohort.studies[0], cohort.studies[1], cohort.studies[2:4]
    _forget(research, cohort.studies[:4])
    research.retrieve_study(pacs_peer.modality, present.study_uid)
    _copy_with_same_accession(pacs_peer, ambiguous)
    path = _write(tmp_path / "cohort.csv", ["accession_number", "note"], [
        [present.accession, "a"], [ambiguous.accession, "b"], ["ACC00000000", "c"],
        [wanted[0].accession, "d"], [wanted[1].accession, "e"], [wanted[0].accession, "f"]])

    state = collect_cohort(cohort_file=str(path), project="lung-test",
                           source_modality=pacs_peer.modality,
                           return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert [r.status for r in report.rows] == [
        "already_present", "ambiguous", "not_found", "collected", "collected", "duplicate"]
    assert report.studies_found == 3 and report.studies_complete == 3
    assert report.studies_moved == 2
    for row, study in zip(report.rows[3:5], wanted, strict=True):
        assert row.expected_instances == row.received_instances == len(study.files)
        (study_id,) = row.study_ids
        assert "lung-test" in labels_of(research, "Study", study_id)

    with Path(report.report_path).open() as handle:
        written = list(csv.DictReader(handle))
    assert Path(report.report_path) == tmp_path / "cohort.report.csv"
    assert [r["result_status"] for r in written] == [r.status for r in report.rows]
    assert written[0]["note"] == "a" and written[3]["accession_number"] == wanted[0].accession

    # running the same cohort again moves nothing
    before = _move_jobs(research)
    again = collect_cohort(cohort_file=str(path), project="lung-test",
                           source_modality=pacs_peer.modality)
    assert again.studies_moved == 0 and again.studies_complete == 3
    assert _move_jobs(research) == before
    assert [r.status for r in again.rows][3:5] == ["already_present", "already_present"]


def test_artifacts_hold_no_identifiers(research_env, research, loaded_pacs, cohort, tmp_path):
    study = cohort.studies[2]
    path = _write(tmp_path / "one.csv", ["accession_number"], [[study.accession]])
    collect_cohort(cohort_file=str(path), project="artifact-test")

    async def read():
        # raw filter call: prefect 3.8's read_artifacts() sends nulls this server refuses
        async with get_client() as client:
            response = await client._client.post("/artifacts/filter", json={
                "limit": 50, "offset": 0, "sort": "CREATED_DESC",
                "artifacts": {"key": {"any_": ["collection-report", "collection-progress"]}}})
            response.raise_for_status()
            return response.json()

    artifacts = asyncio.run(read())
    assert {a["key"] for a in artifacts} >= {"collection-report"}
    text = " ".join(str(a["data"]) + str(a["description"]) for a in artifacts)
    for value in (study.accession, study.patient_id, study.study_uid, study.patient_name):
        assert value not in text


def test_criteria_cohort_and_dry_run(research_env, research, pacs_peer, cohort, tmp_path):
    """dcmqrscp ignores ModalitiesInStudy (it answers MR studies too): those answers are
    checked against the criteria (series-level Modality) and excluded before any move."""
    ct = [s for s in cohort.studies if s.modality == "CT"]
    dates = sorted(s.study_date for s in cohort.studies)
    criteria = Criteria(modalities=["CT"], date_from=dates[0], date_to=dates[-1])
    _forget(research, cohort.studies)

    dry = collect_cohort(criteria=criteria, dry_run=True, source_modality=pacs_peer.modality,
                         report_dir=str(tmp_path), return_state=True)
    assert dry.is_completed() and "dry run" in dry.message
    plan = dry.result()
    found = [r for r in plan.rows if r.status != "excluded"]
    assert len(found) == len(ct) and {r.status for r in found} == {"found"}
    assert all(r.expected_instances for r in found)
    assert all(not research.find("Study", {"StudyInstanceUID": s.study_uid}) for s in ct)

    report = collect_cohort(criteria=criteria, project="ct-only",
                            source_modality=pacs_peer.modality, report_dir=str(tmp_path))
    assert Path(report.report_path).parent == tmp_path
    assert report.studies_found == report.studies_complete == len(ct)
    for study in ct:
        (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
        assert research.count_instances("Study", study_id) == len(study.files)
    assert all(not research.find("Study", {"StudyInstanceUID": s.study_uid})
               for s in cohort.studies if s.modality != "CT")


def test_malformed_cohort_fails_fast_and_moves_nothing(research_env, research, loaded_pacs,
                                                       tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("accession_number,study_date\nACC1,2024-13-01\nACC2,20240101\n")
    before = _move_jobs(research)
    state = collect_cohort(cohort_file=str(path), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("collection not started: bad.csv: 1 problem(s)")
    assert "line 2: study_date is not YYYYMMDD" in state.message and "ACC1" not in state.message
    assert _move_jobs(research) == before


def test_spreadsheet_shaped_cohort_gets_its_report_line_for_line(
        research_env, research, loaded_pacs, cohort, tmp_path):
    """A cohort as a European Excel saves it (BOM, ';', CRLF, an Excel "sep=" line, rows
    padded with empty columns, a quoted note with ';' and a line break, blank rows, comments):
    read by the same parser that writes the report, so the report is the file itself in its
    own dialect, each row's outcome on its own line (the lines after a blank one included)."""
    wanted = cohort.studies[4:6]
    _forget(research, wanted)
    lines = ["sep=;", "# lung cohort: batch 1", "Accession Number;Note;;",
             f"{wanted[0].accession};\"left; right\";;", ";;;", "",
             "# batch 2", f"{wanted[1].accession};\"two\r\nlines\";;", "ACC00000000;;;",
             "# end"]
    path = tmp_path / "excel.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())

    report = collect_cohort(cohort_file=str(path), project="excel-shape")
    assert [(r.index, r.status) for r in report.rows] == [
        (4, "collected"), (8, "collected"), (10, "not_found")]
    written = Path(report.report_path)
    assert written == tmp_path / "excel.report.csv"
    data = written.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and data.count(b"\n") == data.count(b"\r\n")
    out = data.decode("utf-8-sig").split("\r\n")
    physical = "\r\n".join(lines).split("\r\n")
    for number in (1, 2, 5, 6, 7, 11):  # sep=, comments, blank rows: copied as they are
        assert out[number - 1] == physical[number - 1]
    assert out[2].startswith("Accession Number;Note;;;result_row;result_status;")
    assert out[3].startswith(f'{wanted[0].accession};"left; right";;;4;collected;')
    assert out[7] == f'{wanted[1].accession};"two'
    assert out[8].startswith('lines";;;8;collected;')
    assert out[9].startswith("ACC00000000;;;;10;not_found;")
    assert "skipped" not in data.decode() and "," not in data.decode()


def _task_runs(flow_run_id) -> list[dict]:
    with get_client(sync_client=True) as client:
        return client.request("POST", "/task_runs/filter", json={
            "flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 50,
            "offset": 0}).json()


def test_missing_cohort_is_one_clear_line_before_the_pacs(research_env, research, tmp_path):
    """The nightly default points at cohorts/research.csv under the data directory: when it is
    not there the run fails at once, naming the path and the setting, with no traceback, no
    task (nothing asked of the PACS), and nothing written."""
    data_dir = Path(os.environ["PREFECT_ORTHANC_DATA_DIR"])
    state = collect_cohort(cohort_file="cohorts/absent.csv", project="absent",
                           return_state=True)
    assert state.is_failed()
    expected = data_dir / "cohorts" / "absent.csv"
    assert state.message == (
        f"collection not started: cohort file not found: {expected}: put the cohort there or "
        f"set the cohort_file parameter (relative to PREFECT_ORTHANC_DATA_DIR={data_dir})")
    assert "\n" not in state.message and "Traceback" not in state.message
    assert _task_runs(state.state_details.flow_run_id) == []
    assert not expected.parent.exists() or not any(expected.parent.iterdir())


def test_relative_paths_resolve_in_the_data_directory(research_env, research, loaded_pacs,
                                                      cohort, tmp_path, monkeypatch):
    """A relative cohort_file is read from PREFECT_ORTHANC_DATA_DIR, whatever the working
    directory, and its report is written next to it, never in the checkout."""
    data_dir = tmp_path / "site-data"
    monkeypatch.setenv("PREFECT_ORTHANC_DATA_DIR", str(data_dir))
    monkeypatch.chdir(REPO)
    (data_dir / "cohorts").mkdir(parents=True)
    _write(data_dir / "cohorts" / "rel.csv", ["accession_number"], [[cohort.studies[5].accession]])
    report = collect_cohort(cohort_file="cohorts/rel.csv", project="relative")
    assert report.studies_complete == 1
    assert Path(report.report_path) == data_dir / "cohorts" / "rel.report.csv"
    assert not (REPO / "cohorts" / "rel.report.csv").exists()


def test_incomplete_study_fails_the_run(research_env, research, flaky_study_factory,
                                        pacs_peer, tmp_path):
    """One study can never be completed (research refuses a series every time): the run
    ends Failed with a summary, and the study is not marked collected. On dcmqrscp (no
    counts) the count comes from IMAGE-level C-FINDs and the re-fetch is per instance."""
    bad_uid, expected = flaky_study_factory("REJECT-ALWAYS", peer=pacs_peer)
    # partial at first, completed by re-fetch
    good_uid, _ = flaky_study_factory("REJECT-ONCE", peer=pacs_peer)
    path = _write(tmp_path / "flaky.csv", ["study_instance_uid"], [[bad_uid], [good_uid]])
    state = collect_cohort(cohort_file=str(path), project="flaky",
                           source_modality=pacs_peer.modality,
                           return_state=True)
    assert state.is_failed()
    assert "1/2 studies complete" in state.message
    report = report_of(state)
    bad, good = report.rows
    assert bad.status == "partial" and 0 < bad.received_instances < expected
    assert bad.expected_instances == expected and bad.note.startswith("incomplete")
    assert good.status == "collected" and good.received_instances == expected
    assert report.studies_moved == 2  # studies, not attempts
    (bad_id,) = bad.study_ids
    assert "flaky" not in labels_of(research, "Study", bad_id)


def test_interrupted_run_resumes_without_moving_twice(research_env, research, loaded_pacs,
                                                      cohort, tmp_path):
    studies = cohort.studies[:4]
    _forget(research, studies)
    path = _write(tmp_path / "resume.csv", ["study_instance_uid"],
                  [[s.study_uid] for s in studies])
    import prefect.settings

    env = {**os.environ, **research_env,
           "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
           "PYTHONPATH": str(REPO)}
    code = ("from prefect_orthanc.flows.collection import collect_cohort\n"
            f"collect_cohort(cohort_file={str(path)!r}, concurrency=1,"
            " project='resume')\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    collected: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            collected = [s.study_uid for s in studies
                         if any("resume" in labels_of(research, "Study", i)
                                for i in research.find("Study",
                                                       {"StudyInstanceUID": s.study_uid}))]
            if collected:
                break
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # a crash, not a clean stop
        child.wait()
    assert 1 <= len(collected) < len(studies), "the run was not interrupted half-way"

    # what a kill between a study's marking and the end of its retrieval leaves (the kill
    # above lands anywhere): its "being retrieved" record
    from prefect_orthanc.tasks.origin import register_retrieval

    register_retrieval(collected[0], "pacs")
    jobs_before = _move_jobs(research)
    report = collect_cohort(cohort_file=str(path), project="resume")
    assert report.studies_complete == len(studies)
    by_uid = {s.study_uid: row for s, row in zip(studies, report.rows, strict=True)}
    for uid in collected:
        assert by_uid[uid].status == "already_present" and by_uid[uid].moved == 0
    moved_again = {answer.get("StudyInstanceUID")
                   for job in _move_jobs(research) - jobs_before
                   for answer in research.job(job).content.get("Query", [])}
    assert moved_again and not moved_again & set(collected)
    # nothing of the killed run is left: no "being retrieved" record of any of its studies
    from prefect.variables import Variable

    from prefect_orthanc.tasks.origin import retrieval_variable

    left = [s for s in studies if Variable.get(retrieval_variable(s.study_uid)) is not None]
    assert not left, f"{len(left)} in-flight record(s) left behind by the killed run"


@pytest.fixture(scope="module")
def capped_lab(tmp_path_factory):
    """A lab whose pacs answers at most 3 matches per C-FIND (LimitFindResults), with 12
    studies: a single query over the whole range is cancelled by the PACS."""
    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort

    cohort = make_cohort(tmp_path_factory.mktemp("capped"), patients=6, studies_per_patient=2,
                         series_per_study=1, instances_per_series=2, seed=3)
    with OrthancLab.start(pacs_overrides={"LimitFindResults": 3}) as lab:
        load_into(lab.pacs.url, cohort.files)
        yield lab, cohort


def test_capped_cfind_is_split_by_date(capped_lab, monkeypatch, tmp_path):
    lab, cohort = capped_lab
    for key, value in {"ORTHANC_URL": lab.research.url,
                       "ORTHANC_USERNAME": lab.research.username,
                       "ORTHANC_PASSWORD": lab.research.password}.items():
        monkeypatch.setenv(key, value)
    dates = sorted(s.study_date for s in cohort.studies)
    criteria = Criteria(date_from=dates[0], date_to=dates[-1])
    with Orthanc(url=lab.research.url, username=lab.research.username,
                 password=lab.research.password) as research:
        with pytest.raises(Exception) as capped:  # one query: the PACS cancels it (0xFE00)
            research.query("pacs", "Study", criteria.query())
        assert getattr(capped.value, "dimse_status", None) == "0xFE00"

        state = collect_cohort(criteria=criteria, find_cap=3, dry_run=True,
                                                 report_dir=str(tmp_path), return_state=True)
        plan = state.result()
        assert len(plan.rows) == len(cohort.studies) == 12
        report = collect_cohort(criteria=criteria, find_cap=3,
                                                  project="capped", report_dir=str(tmp_path))
        assert report.studies_found == report.studies_complete == 12
        assert len(research.find("Study")) == 12


def test_one_study_uid_under_two_patients_is_not_collected_for_the_project(
        research_env, research, pacs, tmp_path):
    """pydicom's rtdose.dcm, and a copy filed under another PatientID with the same
    StudyInstanceUID (as deid-data's ultrasound files are): a C-MOVE by UID brings both
    patients. Asked by PatientID, the row must not mark the other patient's study for the
    project (a later project share would ship a patient who is not in the cohort)."""

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from prefect_orthanc.tasks.labels import labels_of

    original = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    study_uid, patient = generate_uid(), f"TWO-{generate_uid()[-8:]}"
    for patient_id in (patient, patient + "-OTHER"):
        copy = original.copy()
        copy.StudyInstanceUID, copy.PatientID = study_uid, patient_id
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        copy.save_as(buffer, enforce_file_format=True)
        pacs.upload(buffer.getvalue())
    path = _write(tmp_path / "two.csv", ["patient_id"], [[patient]])
    state = collect_cohort(cohort_file=str(path), project="two-patients", return_state=True)
    assert state.is_failed(), state.message
    (row,) = report_of(state).rows
    assert row.status == "several_patients"
    assert row.note.startswith("several_patients: the PACS holds this StudyInstanceUID under 2")
    arrived = research.find("Study", {"StudyInstanceUID": study_uid})
    assert len(arrived) == 2
    assert all("two-patients" not in labels_of(research, "Study", i) for i in arrived)
    research.delete_many(arrived)


def test_a_row_the_pacs_answers_unreadably_fails_alone(research_env, research, pacs_peer,
                                                       cohort, tmp_path):
    """pydicom's chrH31.dcm (ISO 2022 IR 87, Japanese): Orthanc 1.10.1 cannot decode
    dcmqrscp's answer for it (HTTP 400). That row is ``query_failed`` with the reason; the
    other rows are collected, and the run ends Failed saying a row could not be queried
    (before: the plan failed and nothing was collected for any row)."""
    import pydicom
    from pydicom.data import get_charset_files

    (path,) = [p for p in get_charset_files("chrH31.dcm")]
    japanese = pydicom.dcmread(path)
    pacs_peer.store([path])
    good = cohort.studies[4]
    _forget(research, [good])
    cohort_csv = _write(tmp_path / "charset.csv", ["study_instance_uid"],
                        [[japanese.StudyInstanceUID], [good.study_uid]])
    state = collect_cohort(cohort_file=str(cohort_csv), project="charset",
                           source_modality=pacs_peer.modality, return_state=True)
    # the corpus tests upload this file to research themselves: leave research as it was
    research.delete_many(research.find("Study", {"StudyInstanceUID": japanese.StudyInstanceUID}))
    rows = report_of(state).rows
    assert rows[1].status == "collected"
    if pacs_peer.kind == "orthanc":  # Orthanc as PACS answers in a charset it can read back
        assert rows[0].status == "collected" and state.is_completed(), state.message
        return
    assert rows[0].status == "query_failed", rows  # dcmqrscp answers in ISO 2022 IR 87
    assert rows[0].note.startswith("query_failed: ")
    assert state.is_failed() and "1 row(s) could not be queried" in state.message


def test_export_column_names_narrow_the_query_and_unread_ones_are_refused(
        research_env, research, pacs_peer, cohort, tmp_path):
    """Found by a tester: 'Patient ID;Accession' read only the patient ID, so a dry run matched
    every study of the patient. The export's names are read; a column that looks like an
    identifier but is not read fails the run before the PACS, naming the column only."""
    from prefect.logging.handlers import APILogHandler

    first, second = (s for s in cohort.studies if s.patient_id == cohort.studies[0].patient_id)
    path = tmp_path / "acc3.csv"
    path.write_text(f"Patient ID;Accession;Site\n{first.patient_id};{second.accession};x\n")
    state = collect_cohort(cohort_file=str(path), project="acc3",
                           source_modality=pacs_peer.modality, dry_run=True, return_state=True)
    report = state.result()
    assert report.studies_found == 1, state.message  # the accession's study, not the patient's 2
    APILogHandler().flush()
    flow_run_id = state.state_details.flow_run_id

    async def logs() -> str:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        async with get_client() as client:
            found = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return "\n".join(log.message for log in found)

    assert "cohort acc3.csv: columns carried along unread: Site" in asyncio.run(logs())

    path.write_text(f"Patient ID;Order No\n{first.patient_id};{second.accession}\n")
    state = collect_cohort(cohort_file=str(path), project="acc3",
                           source_modality=pacs_peer.modality, dry_run=True, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("collection not started: acc3.csv: the header (line 1) has "
                                    "column(s) 'Order No' that look like identifiers")
    assert second.accession not in state.message and first.patient_id not in state.message


def test_a_run_that_finds_nothing_says_so(research_env, research, pacs_peer, tmp_path):
    """Found by a tester: "0/0 studies complete ... not found 2" ended Completed, silently."""
    path = _write(tmp_path / "none.csv", ["accession_number"], [["ACC00000000"], ["ACC00000001"]])
    state = collect_cohort(cohort_file=str(path), project="none",
                           source_modality=pacs_peer.modality, return_state=True)
    assert state.is_completed()
    assert state.message.startswith(f"nothing found: no row matched a study on "
                                    f"{pacs_peer.modality} (check the cohort's identifiers "
                                    f"and source_modality); 0/0 studies complete")
    assert "ACC0000000" not in state.message
