"""How runs end, read back from the session's Prefect server: a Failed and a Cancelled
collection run log their one-line outcome and nothing else (no ``TypeError: Unexpected result
for failed state``, no traceback), and their report is still there (the run's table artifact,
and the state's report in the process). An unknown modality name is reported as unknown, with
Orthanc's own list, before any concurrency limit is looked at."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

from prefect_orthanc.flows.cohort import TimeWindow
from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.sharing import Destination, share_studies
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.tasks import (
    UnknownModality,
    echo_modality,
    query_modality,
    retrieve_study,
    store_to_modality,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


def _run_logs(flow_run_id: UUID, until: str) -> str:
    """The run's logs as stored by the server (they arrive in batches: wait for ``until``)."""
    deadline, text = time.monotonic() + 30, ""
    while until not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        text = "\n".join(entry.message for entry in logs)
    return text


def _report_artifact(flow_run_id: UUID) -> list[dict]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    (table,) = [a for a in artifacts if a.key == "collection-report"]
    return table.data if isinstance(table.data, list) else __import__("json").loads(table.data)


def _assert_one_outcome(text: str, line: str) -> None:
    """``line`` was logged, and no second error: the suite runs at PREFECT_LOGGING_LEVEL
    WARNING, where Prefect's "Finished in state ..." (INFO) is not stored: a run is
    recognised by its own outcome line (ERROR when Failed, WARNING when Cancelled)."""
    assert line in text, text[-2000:]
    for second_error in ("Traceback", "TypeError", "Unexpected result",
                         "Engine execution exited"):
        assert second_error not in text, text[-3000:]


def _cohort(tmp_path: Path, name: str, column: str, values: list[str]) -> Path:
    path = tmp_path / f"{name}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([column])
        writer.writerows([v] for v in values)
    return path


def test_a_failed_collection_logs_its_summary_once_and_keeps_its_report(
        research_env, research, loaded_pacs, flaky_study_factory, tmp_path):
    bad_uid, _ = flaky_study_factory("REJECT-ALWAYS")  # research refuses a series every time
    state = collect_cohort(cohort_file=str(_cohort(tmp_path, "failed", "study_instance_uid",
                                                   [bad_uid])),
                           project="states", return_state=True)
    assert state.is_failed() and "0/1 studies complete" in state.message
    run_id = state.state_details.flow_run_id
    line = "collection incomplete: 0/1 studies complete"
    _assert_one_outcome(_run_logs(run_id, line), line)
    assert report_of(state).rows[0].status == "partial"
    assert [row["status"] for row in _report_artifact(run_id)] == ["partial"]


def test_a_cancelled_collection_logs_its_reason_once_and_keeps_its_report(
        research_env, research, loaded_pacs, cohort, tmp_path, monkeypatch):
    """Cancelled by the window closing during planning: the planning task refused by the
    window logs one line, the run its reason; neither a traceback."""
    answers = iter([True, True])  # the run's first check, then one C-FIND
    monkeypatch.setattr(TimeWindow, "is_open", lambda self, now: next(answers, False))
    start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    window = TimeWindow(start=start.strftime("%H:%M"),
                        end=(start + dt.timedelta(hours=1)).strftime("%H:%M"), timezone="UTC")
    path = _cohort(tmp_path, "cancelled", "study_instance_uid",
                   [s.study_uid for s in cohort.studies[:2]])
    state = collect_cohort(cohort_file=str(path), project="states", time_window=window,
                           return_state=True)
    assert state.is_cancelled() and "outside the transfer window" in state.message
    run_id = state.state_details.flow_run_id
    text = _run_logs(run_id, "not planned: outside the transfer window")
    _assert_one_outcome(text, "not planned: outside the transfer window")
    assert "OutsideWindow" in text  # the planning task's one line
    assert [r.status for r in report_of(state).rows] == ["deferred"] * 2
    assert [row["status"] for row in _report_artifact(run_id)] == ["deferred"] * 2


def test_an_unknown_modality_is_reported_as_unknown(research_env, research, research_creds,
                                                    tmp_path, monkeypatch):
    """A typo ("pcas") with no concurrency limit of its own: the error says the name is
    unknown, lists Orthanc's names and how to register one, whichever entry point took it;
    nothing is asked of a limit (the limit is the last step of the advice)."""
    from prefect_orthanc.flows.sharing.secret import SECRET_ENV

    from .conftest import DEID_SECRET

    known = sorted(research.modalities())
    expected = f"Orthanc has no DICOM modality named 'pcas' (it knows: {', '.join(known)})"

    state = collect_cohort(cohort_file=str(_cohort(tmp_path, "typo", "accession_number",
                                                   ["ACC1"])),
                           source_modality="pcas", return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"collection not started: {expected}"), state.message
    assert "PUT /modalities/pcas" in state.message
    assert not state.message.startswith("collection not started: no Prefect global")

    for task_call in (lambda: query_modality.fn(research_creds, "pcas", "Study",
                                                {"PatientID": ""}),
                      lambda: echo_modality.fn(research_creds, "pcas"),
                      lambda: retrieve_study.fn(research_creds, "pcas", "1.2.3"),
                      # routing's forward rule and any C-STORE go through this task
                      lambda: store_to_modality.fn(research_creds, "pcas", ["x"])):
        with pytest.raises(UnknownModality, match="no DICOM modality named 'pcas'"):
            task_call()

    monkeypatch.setenv(SECRET_ENV, DEID_SECRET)
    shared = share_studies(study_ids=["-".join(["0" * 8] * 5)],
                           destination=Destination(kind="modality", target="pcas"),
                           linkage_path=str(tmp_path / "private" / "linkage.csv"),
                           staging_dir=str(tmp_path / "staging"),
                           ledger_path=str(tmp_path / "ledger.jsonl"), return_state=True)
    assert shared.is_failed()
    assert shared.message.startswith(f"sharing not started: {expected}"), shared.message
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())


@pytest.mark.parametrize("kind", ["collection", "sharing"])
def test_a_run_whose_slot_wait_passes_its_bound_fails_in_one_line(
        kind, research_env, secret_env, research, loaded_pacs, cohort, monkeypatch, tmp_path):
    """Every slot it needs is held by a live holder (this test, with a record the run's
    reclaim checks read as live): the run waits ``PREFECT_ORTHANC_SLOT_WAIT_SECONDS`` (3 s
    here), then ends Failed (not TimedOut: the wait is not the run's own timeout) with one
    line naming the limit and the bound, and no traceback."""
    from prefect_orthanc.tasks.limits import modality_slot, study_lock

    monkeypatch.setenv("PREFECT_ORTHANC_SLOT_WAIT_SECONDS", "3")
    study, added = cohort.studies[0], set()
    if kind == "collection":
        holds = [modality_slot("pacs", timeout=10) for _ in range(2)]  # the pacs limit's 2
    else:
        from pydicom.data import get_testdata_file

        before = set(research.find("Study"))
        stored = research.upload(Path(get_testdata_file("CT_small.dcm")))  # a real file
        ids = [stored[0].parent_study]
        added = set(ids) - before  # removed afterwards: other tests count research's studies
        holds = [study_lock(*ids, timeout=10)]
    with contextlib.ExitStack() as held:
        for slot in holds:
            held.enter_context(slot)
        if kind == "collection":
            state = collect_cohort(
                cohort_file=str(_cohort(tmp_path, "waits", "study_instance_uid",
                                        [study.study_uid])),
                project="states-wait", return_state=True)
            line = "collection stopped: no free slot"
        else:
            state = share_studies(study_ids=ids, destination=Destination(
                kind="directory", target=str(tmp_path / "out")),
                linkage_path=str(tmp_path / "private" / "linkage.csv"),
                staging_dir=str(tmp_path / "staging"),
                ledger_path=str(tmp_path / "private" / "ledger.jsonl"), return_state=True)
            line = "sharing stopped: no free slot"
    for study_id in added:
        research.delete("Study", study_id, missing_ok=True)
    assert state.is_failed() and state.type.value == "FAILED", state
    assert state.message.startswith(line) and "PREFECT_ORTHANC_SLOT_WAIT_SECONDS" in state.message
    _assert_one_outcome(_run_logs(state.state_details.flow_run_id, line), line)
