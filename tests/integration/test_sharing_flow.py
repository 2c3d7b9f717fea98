"""The de-identified sharing flow on the lab with the PHI-laden synthetic cohort."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import date
from pathlib import Path

import pydicom
import pytest

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.sharing import SECRET_ENV, Destination, share_studies
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Orthanc

from .conftest import DEID_SECRET

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, DEID_SECRET)


def _patient_studies(research: Orthanc, cohort, patient_index: int = 0) -> tuple[list, list]:
    patient = cohort.patients[patient_index]
    ids = []
    for study in patient.studies:
        research.retrieve_study("pacs", study.study_uid)
        ids += research.find("Study", {"StudyInstanceUID": study.study_uid})
    return patient, ids


def _request(tmp_path: Path, ids, destination: Destination, **extra) -> dict:
    """The flow's parameters (flat, as a deployment run passes them)."""
    return dict(study_ids=ids, destination=destination,
                linkage_path=str(tmp_path / "private" / "linkage.csv"),
                staging_dir=str(tmp_path / "staging"),
                ledger_path=str(tmp_path / "ledger.jsonl"), **extra)


def _datasets(zip_path: Path) -> list[pydicom.Dataset]:
    with zipfile.ZipFile(zip_path) as archive:
        return [pydicom.dcmread(io.BytesIO(archive.read(n))) for n in archive.namelist()
                if not n.endswith("/")]


def _assert_no_phi(paths, phi) -> None:
    """Independent of the flow's scanner: raw bytes and member names."""
    for path in paths:
        data = path.read_bytes()
        with zipfile.ZipFile(path) as archive:
            names = " ".join(archive.namelist())
            contents = b"".join(archive.read(n) for n in archive.namelist())
        for value in phi:
            needle = value.encode()
            assert needle not in data and needle not in contents, "identifier in a package"
            assert value not in names and value not in path.name


def test_share_to_directory_consistent_pseudonyms_and_dates(
        research_env, secret_env, research, loaded_pacs, cohort, tmp_path):
    patient, ids = _patient_studies(research, cohort, 0)
    out = tmp_path / "out"
    request = _request(tmp_path, ids, Destination(kind="directory", target=str(out)))
    state = share_studies(**request, return_state=True)
    assert state.is_completed(), state.message
    outcomes = state.result()
    assert len(outcomes) == 2 and all(o.verified and o.delivered for o in outcomes)

    zips = sorted(out.glob("*.zip"))
    assert len(zips) == 2
    _assert_no_phi(zips, {v for v in cohort.phi_values(patient.patient_id) if len(v) >= 4})
    datasets = [_datasets(z) for z in zips]
    pseudo_ids = {ds.PatientID for group in datasets for ds in group}
    assert len(pseudo_ids) == 1 and patient.patient_id not in pseudo_ids  # same patient, one ID
    assert sum(len(g) for g in datasets) == sum(len(s.files) for s in patient.studies)
    for group in datasets:
        assert group[0].PatientIdentityRemoved == "YES"
        assert {ds.StudyInstanceUID for ds in group}.isdisjoint(
            {s.study_uid for s in patient.studies})

    def interval(dates):
        a, b = sorted(date.fromisoformat(d) for d in dates)  # DICOM DA: YYYYMMDD
        return (b - a).days

    shared_dates = [group[0].StudyDate for group in datasets]
    assert set(shared_dates).isdisjoint({s.study_date for s in patient.studies})
    assert interval(shared_dates) == interval([s.study_date for s in patient.studies])

    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["studies"]) == 2 and "113100" in manifest["method_codes"]
    assert {m["sha256"] for m in manifest["studies"]} == {o.sha256 for o in outcomes}
    linkage = (tmp_path / "private" / "linkage.csv").read_text()
    assert patient.patient_id in linkage and pseudo_ids.pop() in linkage

    # a re-run delivers nothing new
    again = share_studies(**request)
    assert [o.outcome for o in again] == ["delivered_before"] * 2
    assert sorted(out.glob("*.zip")) == zips
    # another run, elsewhere, with the same secret: the very same pseudonyms
    other = tmp_path / "other"
    second = share_studies(**_request(tmp_path / "second", ids,
                                    Destination(kind="directory", target=str(other))))
    assert {o.pseudo_patient for o in second} == {o.pseudo_patient for o in outcomes}
    assert all(not research.exists("Study", o.anonymized_id) for o in outcomes)


def test_leaky_profile_is_quarantined(research_env, secret_env, research, loaded_pacs, cohort,
                                      tmp_path):
    """Descriptions kept: the synthetic ones hold the patient's surname. Nothing leaves."""
    patient, ids = _patient_studies(research, cohort, 1)
    out = tmp_path / "out"
    leaky = DeidProfile(name="leaky", descriptions="keep_if_clean")
    state = share_studies(**_request(tmp_path, ids[:1], Destination(kind="directory",
                                                                  target=str(out)),
                                   profile=leaky), return_state=True)
    assert state.is_failed() and "1 quarantined" in state.message
    (outcome,) = report_of(state)
    assert not outcome.verified and not outcome.delivered and outcome.findings
    assert not out.exists() or not list(out.glob("*.zip"))
    for finding in outcome.findings:
        for value in cohort.phi_values(patient.patient_id):
            assert value not in finding
    quarantined = list((tmp_path / "staging" / "quarantine").glob("*.zip"))
    assert len(quarantined) == 1
    assert outcome.outcome == "quarantined"
    assert not (tmp_path / "private" / "linkage.csv").exists()  # no row unless delivered
    assert not research.exists("Study", outcome.anonymized_id)


def test_share_to_pacs_modality_once(research_env, secret_env, research, pacs, loaded_pacs,
                                     cohort, tmp_path):
    _, ids = _patient_studies(research, cohort, 2)
    request = _request(tmp_path, ids[:1], Destination(kind="modality", target="pacs"))
    (outcome,) = share_studies(**request)
    assert outcome.delivered == "modality:pacs"
    found = pacs.find("Study", {"PatientID": outcome.pseudo_patient})
    assert len(found) == 1
    assert pacs.count_instances("Study", found[0]) == outcome.instances_out
    jobs_before = research.request("GET", "/jobs", safe=True)
    again = share_studies(**request)  # the ledger: no second C-STORE
    assert [o.outcome for o in again] == ["delivered_before"]
    assert research.request("GET", "/jobs", safe=True) == jobs_before
    pacs.delete("Study", found[0])


def test_nothing_selected_is_a_warning_in_the_summary_and_artifact(
        research_env, secret_env, research, tmp_path):
    """A project nothing was collected for: the run completes, but says so loudly."""
    from prefect.client.orchestration import get_client

    state = share_studies(project="never-collected",
                          destination=Destination(kind="directory", target=str(tmp_path / "o")),
                          ledger_path=str(tmp_path / "ledger.jsonl"), return_state=True)
    assert state.is_completed() and state.result() == []
    assert state.message.startswith("WARNING: no study selected: project 'never-collected'")
    with get_client(sync_client=True) as client:
        artifacts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}},
            "limit": 10, "offset": 0}).json()
    (artifact,) = [a for a in artifacts if a["key"] == "sharing-report"]
    assert "WARNING: no study selected" in artifact["data"]
    assert not (tmp_path / "o").exists()


def test_unusable_parameters_fail_before_anything_is_touched(research_env, secret_env,
                                                             tmp_path):
    """The linkage table inside the shared directory would be shared with the data."""
    out = tmp_path / "out"
    state = share_studies(project="research",
                          destination=Destination(kind="directory", target=str(out)),
                          linkage_path=str(out / "linkage.csv"), return_state=True)
    assert state.is_failed()
    assert state.message == ("sharing not started: linkage_path is inside the destination "
                             "directory: it would be shared with the data")
    assert not out.exists()
