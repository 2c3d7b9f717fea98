"""The lab itself (deployments/lab), checked with plain httpx against the real Orthanc 1.10.1
servers, and the synthetic cohort generator (deployments/lab/synthetic.py)."""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from prefect_orthanc.deployments.lab.servers import OrthancLab, OrthancServer, free_ports
from prefect_orthanc.deployments.lab.synthetic import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    Cohort,
    load_into,
    make_cohort,
)

COUNT_KEYS = ("CountPatients", "CountStudies", "CountSeries", "CountInstances")
#: a cohort of its own (other seed, other patients) so counts are exact whatever else the
#: session stored; removed from both servers at the end of the module
SHAPE: dict[str, Any] = {"patients": 2, "studies_per_patient": 2, "series_per_study": 2,
                         "instances_per_series": 2, "seed": 11}


def _client(server: OrthancServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=server.auth, timeout=30)


def _counts(client: httpx.Client) -> dict[str, int]:
    response = client.get("/statistics")
    assert response.status_code == 200
    return {key: response.json()[key] for key in COUNT_KEYS}


def _expected(cohort: Cohort) -> dict[str, int]:
    return {"CountPatients": len(cohort.patients), "CountStudies": len(cohort.studies),
            "CountSeries": cohort.series_count, "CountInstances": cohort.instance_count}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in COUNT_KEYS}


def _wait_for_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["State"] in ("Success", "Failure") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def _delete_patients(client: httpx.Client, patient_ids: list[str]) -> None:
    ids: list[str] = []
    for patient_id in patient_ids:
        found = client.post("/tools/find", json={"Level": "Patient",
                                                  "Query": {"PatientID": patient_id}})
        ids += found.json()
    if ids:
        assert client.post("/tools/bulk-delete", json={"Resources": ids}).status_code == 200


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pacs(lab: OrthancLab) -> Iterator[httpx.Client]:
    with _client(lab.pacs) as client:
        yield client


@pytest.fixture(scope="module")
def research(lab: OrthancLab) -> Iterator[httpx.Client]:
    with _client(lab.research) as client:
        yield client


@pytest.fixture(scope="module")
def own_cohort(tmp_path_factory: pytest.TempPathFactory, cohort: Cohort) -> Cohort:
    made = make_cohort(tmp_path_factory.mktemp("lab-cohort"), **SHAPE)
    assert not {p.patient_id for p in made.patients} & {p.patient_id for p in cohort.patients}
    return made


@pytest.fixture(scope="module")
def loaded(lab: OrthancLab, pacs: httpx.Client, research: httpx.Client,
           own_cohort: Cohort) -> Iterator[dict[str, int]]:
    """Loads the module's cohort into the pacs; yields the /statistics change it made."""
    before = _counts(pacs)
    stored = load_into(lab.pacs.url, own_cohort.files, batch_size=5)
    assert stored == own_cohort.instance_count
    yield _delta(_counts(pacs), before)
    patient_ids = [p.patient_id for p in own_cohort.patients]
    _delete_patients(pacs, patient_ids)
    _delete_patients(research, patient_ids)


@pytest.fixture(scope="module")
def study_query(research: httpx.Client, loaded: dict[str, int],
                own_cohort: Cohort) -> Iterator[str]:
    """A C-FIND from research to pacs for exactly the module's studies (UID list matching)."""
    response = research.post("/modalities/pacs/query", json={
        "Level": "Study",
        "Query": {"StudyInstanceUID": "\\".join(s.study_uid for s in own_cohort.studies),
                  "PatientID": "", "NumberOfStudyRelatedInstances": ""},
    })
    assert response.status_code == 200, response.text
    query_id = response.json()["ID"]
    yield query_id
    research.delete(f"/queries/{query_id}")


@pytest.fixture(scope="module")
def moved(research: httpx.Client, study_query: str, own_cohort: Cohort) -> dict:
    """The asynchronous C-MOVE of the whole query into research; returns the final job."""
    before = _counts(research)
    response = research.post(f"/queries/{study_query}/retrieve",
                             json={"TargetAet": "RESEARCH", "Synchronous": False})
    assert response.status_code == 200, response.text
    job = _wait_for_job(research, response.json()["ID"])
    job["_delta"] = _delta(_counts(research), before)
    return job


# ------------------------------------------------------------------ servers


def test_both_servers_answer_system(lab: OrthancLab, pacs: httpx.Client,
                                    research: httpx.Client):
    for client, server in ((pacs, lab.pacs), (research, lab.research)):
        system = client.get("/system").json()
        assert system["Version"] == "1.10.1" and system["ApiVersion"] == 16
        assert system["DicomAet"] == server.aet and system["Name"] == server.name
        assert system["HttpPort"] == server.http_port
        assert system["DicomPort"] == server.dicom_port
    assert lab.pacs.url.startswith("http://127.0.0.1:") and lab.pacs.auth is None


def test_research_requires_the_lab_password(lab: OrthancLab):
    url = lab.research.url + "/system"
    assert lab.research.username == "research" and len(lab.research.password or "") >= 16
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=("research", "not-the-password")).status_code == 401
    assert httpx.get(url, auth=lab.research.auth).status_code == 200
    assert httpx.get(lab.pacs.url + "/system").status_code == 200  # the pacs has no auth
    assert lab.research.password and lab.research.password not in repr(lab)  # no secret in reprs


def test_echo_both_ways(pacs: httpx.Client, research: httpx.Client):
    assert pacs.post("/modalities/research/echo", json={}).status_code == 200
    assert research.post("/modalities/pacs/echo", json={}).status_code == 200
    assert research.post("/modalities/nowhere/echo", json={}).status_code == 404


def test_loaded_cohort_counts(loaded: dict[str, int], own_cohort: Cohort):
    assert loaded == _expected(own_cohort)


def test_cfind_finds_the_studies(research: httpx.Client, study_query: str, own_cohort: Cohort):
    answers = research.get(f"/queries/{study_query}/answers",
                           params={"expand": "", "simplify": ""}).json()
    found = {a["StudyInstanceUID"]: a for a in answers}
    assert set(found) == {s.study_uid for s in own_cohort.studies}
    for study in own_cohort.studies:
        answer = found[study.study_uid]
        assert answer["PatientID"] == study.patient_id
        assert int(answer["NumberOfStudyRelatedInstances"]) == study.instance_count


def test_cmove_job_brings_everything(moved: dict, own_cohort: Cohort):
    assert moved["State"] == "Success", moved.get("ErrorDetails")
    assert moved["Type"] == "DicomMoveScu" and moved["Progress"] == 100
    assert moved["Content"]["RemoteAet"] == "PACS"
    assert moved["Content"]["LocalAet"] == "RESEARCH"
    assert len(moved["Content"]["Query"]) == len(own_cohort.studies)
    assert moved["_delta"] == _expected(own_cohort)


def test_restart_keeps_storage(lab: OrthancLab, research: httpx.Client, moved: dict):
    before = _counts(research)
    pid = lab.research.pid
    lab.research.restart()
    assert lab.research.is_running and lab.research.pid != pid
    assert _counts(research) == before
    assert research.post("/modalities/pacs/echo", json={}).status_code == 200


def test_stop_leaves_nothing_behind(tmp_path: Path):
    kept_root = tmp_path / "kept"
    made_roots = []
    for root in (None, kept_root):
        other = OrthancLab.start(root, stable_age=1)
        made_roots.append(other.root)
        pids = [server.pid for server in other.servers]
        ports = [port for s in other.servers for port in (s.http_port, s.dicom_port)]
        assert all(s.is_running for s in other.servers)
        assert other.pacs.config["StableAge"] == 1
        other.stop()
        assert not any(s.is_running for s in other.servers)
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}"), "an Orthanc process outlived stop()"
        for port in ports:
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", port)) != 0
        other.stop()  # idempotent
    assert not made_roots[0].exists()  # the lab's own temporary root is removed
    assert (kept_root / "pacs" / "orthanc.log").exists()  # a caller's root is kept


def test_start_failure_is_a_clear_error(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (dicom_port,) = free_ports(1)
        config = {"HttpPort": port, "DicomPort": dicom_port, "Plugins": [],
                  "StorageDirectory": str(tmp_path / "storage"),
                  "IndexDirectory": str(tmp_path / "storage")}
        server = OrthancServer("clash", "CLASH", port, dicom_port, tmp_path, config,
                               startup_timeout=20)
        with pytest.raises(RuntimeError) as caught:
            server.start()
    message = str(caught.value)
    assert "'clash' exited" in message and "already in use" in message  # the log tail
    assert server.is_running is False


# ------------------------------------------------------------------ synthetic cohort


def test_same_seed_gives_identical_files(tmp_path: Path):
    shape: dict[str, Any] = {"patients": 2, "studies_per_patient": 2, "series_per_study": 1,
                             "instances_per_series": 2}
    first = make_cohort(tmp_path / "a", seed=3, **shape)
    second = make_cohort(tmp_path / "b", seed=3, **shape)
    other = make_cohort(tmp_path / "c", seed=4, **shape)
    assert [p.relative_to(tmp_path / "a") for p in first.files] == \
           [p.relative_to(tmp_path / "b") for p in second.files]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first.files, second.files,
                                                                   strict=True))
    assert first.phi_values() == second.phi_values()
    assert not {s.study_uid for s in first.studies} & {s.study_uid for s in other.studies}
    assert first.phi_values() != other.phi_values()


def test_files_are_valid_and_encoded_like_pydicom(cohort: Cohort):
    assert cohort.instance_count == len(cohort.files) == 36 and len(cohort.studies) == 6
    seen = set()
    for study in cohort.studies:
        for path in study.files:
            raw = path.read_bytes()
            ds = pydicom.dcmread(path)
            assert raw[128:132] == b"DICM"
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.SOPClassUID == {"CT": pydicom.uid.CTImageStorage,
                                      "MR": pydicom.uid.MRImageStorage}[ds.Modality]
            assert ds.StudyInstanceUID == study.study_uid and ds.StudyID
            assert (ds.SeriesInstanceUID, ds.Modality) in {(s[0], s[1]) for s in study.series}
            assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (16, 16, 16)
            assert ds.PhotometricInterpretation == "MONOCHROME2" and len(ds.PixelData) == 512
            seen.add(ds.SOPInstanceUID)
            # the fast writer's bytes are what pydicom writes for the same elements
            fresh = Dataset()
            for element in ds:
                fresh.add(DataElement(element.tag, element.VR, element.value))
            fresh.file_meta, fresh.preamble = ds.file_meta, b"\x00" * 128
            buffer = io.BytesIO()
            fresh.save_as(buffer, enforce_file_format=True)
            assert buffer.getvalue() == raw
    assert len(seen) == cohort.instance_count


def test_planted_phi_is_everywhere(cohort: Cohort):
    for patient in cohort.patients:
        dates = [s.study_date for s in patient.studies]
        assert len(set(dates)) == len(dates), "studies of one patient share a date"
        raw = b"".join(path.read_bytes() for s in patient.studies for path in s.files)
        for value in patient.phi_values():
            assert value.encode() in raw, f"planted value {value!r} not found"
        for other in cohort.patients:
            if other is not patient:
                assert other.patient_id.encode() not in raw
        for study in patient.studies:
            ds = pydicom.dcmread(study.files[0])
            assert ds.PatientName == patient.patient_name
            assert ds.PatientID == patient.patient_id
            assert ds.PatientBirthDate == patient.birth_date
            assert ds.AccessionNumber == study.accession
            assert list(ds.OtherPatientIDs) == list(patient.other_ids)
            assert ds.PatientAddress == patient.address
            assert ds.PatientTelephoneNumbers == patient.phone
            assert ds.InstitutionName == patient.institution_name
            assert patient.family_name in ds.StudyDescription
            assert patient.family_name in ds.SeriesDescription
            assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == study.study_date
            block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
            assert block[0x01].value == patient.patient_id
            assert block[0x02].value == patient.patient_name
            request = ds.RequestAttributesSequence[0]
            assert request.AccessionNumber == study.accession
            assert request.RequestedProcedureID == study.requested_procedure_id
            assert patient.family_name in request.RequestedProcedureDescription
            assert request.OtherPatientIDsSequence[0].PatientID == patient.patient_id
            assert request.ReferencedStudySequence[0].ReferencedSOPInstanceUID == \
                study.study_uid
        assert cohort.phi_values(patient.patient_id) == patient.phi_values()
    shown = repr(cohort) + repr(cohort.studies) + repr(cohort.patients)
    assert not [value for value in cohort.phi_values() if value in shown]
    names = {p.family_name for p in cohort.patients}
    assert len(names) == len(cohort.patients)
    assert all(len(v) >= 3 for v in cohort.phi_values())
