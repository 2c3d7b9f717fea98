"""Deliveries that cannot lose a study, on the real lab, with studies written by others
(pydicom's test files): unique never-overwritten packages, a ledger keyed by content version,
a per-study lock for concurrent runs, one outcome per kind of study, and an artifact and logs
that never hold a pseudonym (they name source studies)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pydicom
import pydicom.dataset
import pydicom.uid
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from prefect_orthanc.flows.sharing import Destination, share_studies
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Orthanc

from .conftest import DEID_SECRET

pytestmark = pytest.mark.usefixtures("prefect_server")


def _params(tmp_path: Path, ids, **extra) -> dict:
    return dict(study_ids=ids, destination=Destination(kind="directory",
                                                       target=str(tmp_path / "out")),
                linkage_path=str(tmp_path / "private" / "linkage.csv"),
                staging_dir=str(tmp_path / "staging"),
                ledger_path=str(tmp_path / "private" / "ledger.jsonl"), **extra)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _upload(research: Orthanc, datasets) -> str:
    studies = {r.parent_study for ds in datasets for r in research.upload(_bytes(ds))}
    (study,) = studies
    assert study is not None
    return study


def _ct_copies(n: int) -> list[pydicom.Dataset]:
    """``n`` instances of one new study made from pydicom's CT_small.dcm (a real CT header):
    new study, series and SOP instance UIDs, the rest as written by its authors."""
    study, series = generate_uid(), generate_uid()
    copies: list[pydicom.Dataset] = []
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    for index in range(n):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        copies.append(ds)
    return copies


def _linkage_rows(tmp_path: Path) -> list[dict]:
    path = tmp_path / "private" / "linkage.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def _ledger_lines(tmp_path: Path) -> list[dict]:
    path = tmp_path / "private" / "ledger.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _cleanup(research: Orthanc, *study_ids: str) -> None:
    for study in study_ids:
        research.delete("Study", study, missing_ok=True)


_RUN = """
import json, sys, time
from prefect import flow
from prefect_orthanc.flows.sharing import Destination, share_studies
from prefect_orthanc.flows.states import report_of
flow(name="warm-up")(lambda: None)()  # a worker's first flow run is slow to start: not this one
params = json.loads(sys.argv[1])
params["destination"] = Destination(**params["destination"])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both processes start together
state = share_studies(**params, return_state=True)
outcomes = report_of(state)
print(json.dumps({"completed": state.is_completed(), "message": state.message,
                  "outcomes": [o.outcome for o in outcomes]}))
"""


def test_concurrent_runs_on_one_study_deliver_it_once(research_env, secret_env, research,
                                                      prefect_server, tmp_path):
    """Duplicate events: two workers (two processes) share the same study at the same
    moment. The study lock makes them take turns: one delivery, the other finds it
    delivered; no crash, no anonymized copy deleted under the other's feet."""
    import os
    import subprocess
    import sys
    import time

    study = _upload(research, _ct_copies(40))
    before = set(research.find("Study"))
    params = _params(tmp_path, [study])
    params["destination"] = params["destination"].model_dump()
    env = {**os.environ, "PREFECT_API_URL": prefect_server.api_url,
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    # after both processes have warmed up; the second while the first is de-identifying
    start_at = time.time() + 25
    runs = [subprocess.Popen([sys.executable, "-c", _RUN, json.dumps(params),
                              str(start_at + delay)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for delay in (0.0, 0.4)]
    try:
        results = []
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        assert all(r["completed"] for r in results), results
        assert sorted(o for r in results for o in r["outcomes"]) == [
            "delivered", "delivered_before"]
        assert len(list((tmp_path / "out").glob("*.zip"))) == 1
        assert len(_ledger_lines(tmp_path)) == 1 and len(_linkage_rows(tmp_path)) == 1
        assert not list((tmp_path / "out").glob(".*"))  # no partial file left behind
        assert set(research.find("Study")) == before  # no anonymized copy left behind
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
        _cleanup(research, study)


def test_two_tasks_on_one_study_at_once_take_turns(research_env, secret_env, research,
                                                   research_creds, tmp_path):
    """The same race without the flows' start-up skew: two ``share_study`` tasks for one
    study submitted together. Without the lock both de-identify at once and the second
    deletes the first's anonymized copy as a crashed run's leftover."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from prefect_orthanc.flows.sharing import SharingRequest, share_study

    study = _upload(research, _ct_copies(40))
    request = SharingRequest(**_params(tmp_path, [study]))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def duplicate_events():
        futures = [share_study.submit(research_creds, study, request, DEID_SECRET.encode())
                   for _ in range(2)]
        return [f.result(raise_on_failure=False) for f in futures]

    try:
        results = duplicate_events()
        assert all(not isinstance(r, Exception) for r in results), results
        assert sorted(r.outcome for r in results) == ["delivered", "delivered_before"]
        assert len(list((tmp_path / "out").glob("*.zip"))) == 1
        assert len(_ledger_lines(tmp_path)) == 1 and len(_linkage_rows(tmp_path)) == 1
    finally:
        _cleanup(research, study)


def test_a_study_that_grew_is_shared_again_whole_as_a_new_version(research_env, secret_env,
                                                                 research, tmp_path):
    copies = _ct_copies(3)
    study = _upload(research, copies[:2])
    params = _params(tmp_path, [study])
    try:
        (first,) = share_studies(**params)
        assert first.outcome == "delivered" and first.version == 1
        assert first.instances_out == 2
        (again,) = share_studies(**params)
        assert again.outcome == "delivered_before"
        research.upload(_bytes(copies[2]))  # the rest of the study arrives
        (second,) = share_studies(**params)
        assert second.outcome == "delivered" and second.version == 2
        assert second.instances_out == 3  # whole, not just the new instance
        assert second.supersedes == (Path(first.file).name,)
        out = tmp_path / "out"
        assert sorted(p.name for p in out.glob("*.zip")) == sorted(
            [Path(first.file).name, Path(second.file).name])
        assert Path(first.file).name.endswith("-v1.zip")
        assert Path(second.file).name.endswith("-v2.zip")
        manifest = json.loads((out / "manifest.json").read_text())
        (entry,) = manifest["studies"]  # one entry per study
        assert entry["file"] == Path(second.file).name and entry["version"] == 2
        assert entry["supersedes"] == [Path(first.file).name]
        assert entry["sha256"] == second.sha256
        assert [e["version"] for e in _ledger_lines(tmp_path)] == [1, 2]
        assert [r["package"] for r in _linkage_rows(tmp_path)] == [
            Path(first.file).name, Path(second.file).name]
    finally:
        _cleanup(research, study)


def test_a_package_name_taken_is_recognised_or_refused_never_overwritten(
        research_env, secret_env, research, tmp_path):
    """The ledger is lost, the package is still there: the next delivery takes the same
    name. Packages are byte-deterministic, so the same content is recognised as delivered
    (recorded again, no second file, no second linkage row); other content under that name
    (the study grew meanwhile) fails with its PHI-free message shown, the package untouched."""
    copies = _ct_copies(3)
    study = _upload(research, copies[:2])
    params = _params(tmp_path, [study])
    try:
        (first,) = share_studies(**params)
        before = Path(first.file).read_bytes()
        (tmp_path / "private" / "ledger.jsonl").unlink()
        (again,) = share_studies(**params)
        assert again.outcome == "delivered" and again.file == first.file
        assert again.sha256 == first.sha256  # the same bytes, made again
        assert Path(first.file).read_bytes() == before
        assert len(_linkage_rows(tmp_path)) == 1 and len(_ledger_lines(tmp_path)) == 1

        (tmp_path / "private" / "ledger.jsonl").unlink()
        research.upload(_bytes(copies[2]))  # the study grew: other bytes, same v1 name
        state = share_studies(**params, return_state=True)
        assert state.is_failed() and "1 failed" in state.message
        (outcome,) = report_of(state)
        assert outcome.outcome == "failed"
        assert "DeliveryError" in outcome.findings[0]
        assert "nothing overwritten" in outcome.findings[0]  # not "details withheld"
        assert Path(first.file).read_bytes() == before
        assert len(_linkage_rows(tmp_path)) == 1  # no row for what was not delivered
        assert research.find("Study", {"PatientID": first.pseudo_patient}) == []  # no copy left
        assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
        assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]
    finally:
        _cleanup(research, study)


def _artifact_and_logs(state) -> tuple[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs are shipped in batches: send what is queued, and wait
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [str(run_id)]}},
            "limit": 10, "offset": 0}).json()
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    (artifact,) = [a for a in artifacts if a["key"] == "sharing-report"]
    return json.dumps(artifact["data"]), [log.message for log in logs]


def test_outcomes_by_kind_and_a_report_that_never_pairs_pseudonym_and_source(
        research_env, secret_env, research, tmp_path, monkeypatch):
    """Real files: an all-US study (pydicom's examples_jpeg2k + examples_rgb_color) is
    excluded; an RT Ion Plan without PatientID (ExplVR_LitEndNoMeta) is delivered under a
    pseudonym keyed on its StudyInstanceUID; a CT study is delivered. Completed with a
    warning. Then, with descriptions kept, a study whose description names the patient is
    quarantined: Failed. Linkage rows only for what was delivered."""
    us = _upload(research, [pydicom.dcmread(get_testdata_file(n))
                            for n in ("examples_jpeg2k.dcm", "examples_rgb_color.dcm")])
    plan = pydicom.dcmread(get_testdata_file("ExplVR_LitEndNoMeta.dcm"), force=True)
    assert "PatientID" not in plan
    plan.file_meta = pydicom.dataset.FileMetaDataset()  # the file has none: only the wrapper
    plan.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    no_id = _upload(research, [plan])
    ct = _upload(research, _ct_copies(2))
    selected = [us, no_id, ct]
    try:
        state = share_studies(**_params(tmp_path, selected), return_state=True)
        assert state.is_completed(), state.message
        assert state.message.startswith("WARNING: 1 studies had nothing to share")
        assert "2 delivered" in state.message and "1 excluded" in state.message
        excluded, plan_out, ct_out = state.result()  # selection order
        assert excluded.outcome == "excluded" and excluded.excluded == 2
        assert excluded.excluded_reasons == {"modality US": 2}
        assert not excluded.findings and not excluded.file
        assert plan_out.outcome == "delivered"
        assert plan_out.pseudonym_from == "StudyInstanceUID"
        assert ct_out.outcome == "delivered" and ct_out.pseudonym_from == "PatientID"
        rows = _linkage_rows(tmp_path)
        assert sorted(r["source_orthanc_id"] for r in rows) == sorted([no_id, ct])
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert {e["pseudonym_from"] for e in manifest["studies"]} == {
            "StudyInstanceUID", "PatientID"}

        # Prefect sees source studies, never a pseudonym: not in the artifact (its rows follow
        # the study_ids parameter), not in a log line
        artifact, logs = _artifact_and_logs(state)
        pseudonyms = {plan_out.pseudo_patient, ct_out.pseudo_patient,
                      excluded.pseudo_patient, plan_out.pseudo_study, ct_out.pseudo_study}
        assert all(source in artifact for source in selected)
        assert not any(p in artifact for p in pseudonyms)
        for line in logs:
            assert not any(p in line for p in pseudonyms), line
        assert any("nothing shared, every instance held back" in line for line in logs)
        assert any("no PatientID" in line for line in logs)

        from prefect_orthanc.flows.deid import DeidProfile
        leaky = _ct_copies(1)
        leaky[0].StudyDescription = f"CT follow-up {leaky[0].PatientName.family_name}"
        quarantined = _upload(research, leaky)
        selected.append(quarantined)
        state = share_studies(**_params(tmp_path / "leaky", [quarantined],
                                        profile=DeidProfile(name="kept",
                                                            descriptions="keep_if_clean")),
                              return_state=True)
        assert state.is_failed() and "1 quarantined" in state.message
        (outcome,) = report_of(state)
        assert outcome.outcome == "quarantined" and outcome.findings
        assert _linkage_rows(tmp_path / "leaky") == []
        artifact, logs = _artifact_and_logs(state)
        assert outcome.pseudo_patient not in artifact and quarantined in artifact
        assert not any(outcome.pseudo_patient in line for line in logs)
        assert any(f"{quarantined[:8]} quarantined" in line for line in logs)
    finally:
        _cleanup(research, *selected)
