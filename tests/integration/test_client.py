"""The client against two real Orthanc 1.10.1 servers (the lab): every operation, end to end."""

from __future__ import annotations

import asyncio
import io
import pickle
import socket
import time
import zipfile
from pathlib import Path

import pydicom
import pytest

from prefect_orthanc.orthanc_client import (
    AsyncOrthanc,
    JobState,
    Level,
    ModifyResult,
    Orthanc,
    OrthancDimseError,
    OrthancError,
    OrthancJobFailed,
    OrthancJobTimeout,
    OrthancNotFound,
    OrthancUnauthorized,
    OrthancUnavailable,
    OrthancUnsupported,
    RetrieveOutcome,
)


def _study(cohort, index=0):
    return cohort.studies[index]


def test_system_reports_debian_version(pacs: Orthanc, research: Orthanc):
    for client, aet in ((pacs, "PACS"), (research, "RESEARCH")):
        info = client.system()
        assert info.version == "1.10.1"
        assert info.api_version == 16
        assert info.dicom_aet == aet


def test_echo_both_ways_and_unknown_modality(pacs: Orthanc, research: Orthanc):
    research.echo("pacs")
    pacs.echo("research")
    with pytest.raises(OrthancNotFound) as caught:
        research.echo("no-such-pacs")
    assert "no modality of that name" in str(caught.value)


def test_cfind_answers_with_counts(research: Orthanc, loaded_pacs, cohort):
    result = research.query("pacs", "Study", {"StudyInstanceUID": "",
                                               "NumberOfStudyRelatedInstances": ""})
    assert len(result) >= len(cohort.studies)  # other tests may add studies to the pacs
    by_uid = {a.get("StudyInstanceUID"): int(a.get("NumberOfStudyRelatedInstances"))
              for a in result.answers}
    for study in cohort.studies:
        assert by_uid[study.study_uid] == len(study.files)
    # answers never show tag values in their repr
    assert cohort.studies[0].patient_id not in repr(result)


def test_collect_moves_as_job_then_is_idempotent(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 0)
    research_ids = research.find("Study", {"StudyInstanceUID": study.study_uid})
    research.delete_many(research_ids)

    first = research.retrieve_study("pacs", study.study_uid)
    assert first.outcome is RetrieveOutcome.COMPLETE
    assert first.expected_instances == first.received_instances == len(study.files)
    assert len(first.job_ids) == 1 and len(first.study_ids) == 1
    job = research.job(first.job_ids[0])
    assert job.state is JobState.SUCCESS and job.type == "DicomMoveScu"
    assert research.count_instances("Study", first.study_ids[0]) == len(study.files)

    again = research.retrieve_study("pacs", study.study_uid)
    assert again.outcome is RetrieveOutcome.ALREADY_PRESENT
    assert again.job_ids == () and again.received_instances == len(study.files)


def test_collect_refetches_missing_series(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 1)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    series = research.children("Study", study_id)
    assert len(series) >= 2
    research.delete("Series", series[0].id)  # a partial study, as a broken move leaves it
    before = research.count_instances("Study", study_id)
    assert before < len(study.files)

    result = research.retrieve_study("pacs", study.study_uid)
    assert result.outcome is RetrieveOutcome.COMPLETE
    assert result.received_instances == len(study.files)


def test_collect_unknown_study_is_not_found(research: Orthanc, loaded_pacs):
    result = research.retrieve_study("pacs", "1.2.826.0.1.3680043.99999.1")
    assert result.outcome is RetrieveOutcome.NOT_FOUND and not result.moved


def test_retrieve_and_wait_for_job(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 2)
    research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
    query = research.query("pacs", "Study", {"StudyInstanceUID": study.study_uid})
    job_id = research.retrieve(query.query_id, "RESEARCH")
    info = research.wait_for_job(job_id, timeout=60)
    assert info.state is JobState.SUCCESS and info.progress == 100
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    assert research.count_instances("Study", study_id) == len(study.files)
    research.delete_query(query.query_id)


def test_synchronous_move_and_dimse_failure(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 3)
    research.move("pacs", "Study", [{"StudyInstanceUID": study.study_uid}], "RESEARCH")
    assert research.find("Study", {"StudyInstanceUID": study.study_uid})
    with pytest.raises(OrthancDimseError) as caught:
        research.move("pacs", "Study", [{"StudyInstanceUID": study.study_uid}], "UNKNOWNAET")
    assert caught.value.transient is False
    assert study.study_uid not in str(caught.value)


def test_anonymize_as_job_and_synchronously(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 0)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})

    job_id = research.anonymize("Study", study_id, replace={"PatientName": "PSEUDO^ONE"})
    assert isinstance(job_id, str)  # asynchronous: a job
    job = research.wait_for_job(job_id, timeout=60)
    new = research.modified_resource(job)
    assert new.id != study_id and new.level is Level.STUDY
    instance = research.instances("Study", new.id)[0]
    tags = research.tags("Instance", instance)
    assert tags["PatientName"] == "PSEUDO^ONE"
    assert tags["StudyInstanceUID"] != study.study_uid
    assert study.patient_id not in str(tags)

    sync = research.anonymize("Study", study_id, asynchronous=False)
    assert isinstance(sync, ModifyResult)
    assert sync.id not in (study_id, new.id)
    assert research.count_instances("Study", sync.id) == len(study.files)
    research.delete_many([new.id, sync.id])


def test_modify_keeps_source(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 0)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    job_id = research.modify("Study", study_id, replace={"InstitutionName": "RESEARCH SITE"})
    assert isinstance(job_id, str)  # asynchronous: a job
    job = research.wait_for_job(job_id)
    new = research.modified_resource(job)
    assert research.tags("Study", new.id, shared=True)["InstitutionName"] == "RESEARCH SITE"
    assert research.exists("Study", study_id)
    research.delete("Study", new.id)


def _check_zip(path: Path, expected: int) -> None:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        assert len(names) == expected
        for name in names:
            dataset = pydicom.dcmread(io.BytesIO(archive.read(name)))
            assert dataset.SOPInstanceUID


def test_archive_streamed_to_file(research: Orthanc, loaded_pacs, cohort, tmp_path):
    study = _study(cohort, 0)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    result = research.download_resource_archive("Study", study_id, tmp_path / "study.zip")
    assert result.path.exists() and result.size == result.path.stat().st_size
    import hashlib
    assert result.sha256 == hashlib.sha256(result.path.read_bytes()).hexdigest()
    _check_zip(result.path, len(study.files))
    assert [p.name for p in tmp_path.iterdir()] == ["study.zip"]  # no partial file left


def test_download_archive_job_for_many_studies(research: Orthanc, loaded_pacs, cohort, tmp_path):
    uids = [s.study_uid for s in cohort.studies[:2]]
    ids = []
    for uid in uids:
        research.retrieve_study("pacs", uid)
        ids += research.find("Study", {"StudyInstanceUID": uid})
    result = research.download_archive(ids, tmp_path / "many.zip", timeout=60)
    _check_zip(result.path, sum(len(s.files) for s in cohort.studies[:2]))
    media = research.download_archive(ids[:1], tmp_path / "media.zip", media=True, timeout=60)
    with zipfile.ZipFile(media.path) as archive:
        assert any(name.endswith("DICOMDIR") for name in archive.namelist())


def test_bounded_wait_raises_then_reports_failure(research: Orthanc, loaded_pacs, cohort):
    """A C-STORE to a peer that accepts TCP but never speaks DICOM stays Running until its
    association times out: a bounded wait returns control on time, then the job fails."""
    import threading

    held = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        stop = threading.Event()

        def accept():
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    held.append(listener.accept()[0])  # accept, then say nothing
                except OSError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            research.request("PUT", "/modalities/blackhole", json={
                "AET": "BLACKHOLE", "Host": "127.0.0.1", "Port": port, "Timeout": 3},
                expect="none")
            study = _study(cohort, 0)
            research.retrieve_study("pacs", study.study_uid)
            (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
            job_id = research.store("blackhole", [study_id])
            assert job_id is not None  # asynchronous: a job
            started = time.monotonic()
            with pytest.raises(OrthancJobTimeout) as caught:
                research.wait_for_job(job_id, timeout=0.5)
            assert time.monotonic() - started < 3
            assert caught.value.job_id == job_id and caught.value.state in ("Running", "Pending")
            with pytest.raises(OrthancJobFailed) as failed:
                research.wait_for_job(job_id, timeout=60)
            assert failed.value.job_id == job_id and failed.value.error_code
        finally:
            stop.set()
            thread.join()
            for connection in held:
                connection.close()
            research.request("DELETE", "/modalities/blackhole", expect="none")


def test_upload_file_and_zip_is_idempotent(pacs: Orthanc, cohort):
    extra = cohort.studies[-1]
    first = pacs.upload(extra.files[0])
    assert first[0].status in ("Success", "AlreadyStored")
    assert pacs.upload(extra.files[0])[0].status == "AlreadyStored"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in extra.files:
            archive.write(path, path.name)
    stored = pacs.upload(buffer.getvalue())
    assert len(stored) == len(extra.files)
    assert {r.parent_study for r in stored} == {first[0].parent_study}


def test_navigation(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 0)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    resource = research.resource("Study", study_id)
    assert resource.level is Level.STUDY and resource.parent_id
    assert study.patient_id not in repr(resource)
    series = research.children("Study", study_id)
    assert len(series) == len(study.series)
    assert research.parent("Series", series[0].id).id == study_id
    assert research.parent("Study", study_id).level is Level.PATIENT
    assert len(research.instances("Study", study_id)) == len(study.files)
    stats = research.statistics_of("Study", study_id)
    assert stats.count_instances == len(study.files) and stats.count_series == len(study.series)
    shared = research.tags("Study", study_id, shared=True)
    assert shared["StudyInstanceUID"] == study.study_uid


def test_find_pages_on_real_server(pacs: Orthanc, loaded_pacs, cohort):
    everything = pacs.find("Instance", page_size=1000)
    paged = pacs.find("Instance", page_size=7)
    assert paged == everything and len(set(paged)) == len(paged) >= cohort.instance_count
    assert len(pacs.find("Study", limit=2)) == 2
    assert len(pacs.find_resources("Study", page_size=2)) == len(pacs.find("Study"))


def test_store_to_modality_as_job(research: Orthanc, pacs: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 0)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    job_id = research.store("pacs", [study_id])
    assert job_id is not None  # asynchronous: a job
    info = research.wait_for_job(job_id, timeout=60)
    assert info.state is JobState.SUCCESS and info.type == "DicomModalityStore"


def test_metadata_roundtrip(research: Orthanc, loaded_pacs, cohort):
    study = _study(cohort, 0)
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    assert research.metadata("Study", study_id, "PrefectOrthancSource") is None
    research.set_metadata("Study", study_id, "PrefectOrthancSource", "pacs")
    assert research.metadata("Study", study_id, "PrefectOrthancSource") == "pacs"
    research.delete_metadata("Study", study_id, "PrefectOrthancSource")
    assert research.metadata("Study", study_id, "PrefectOrthancSource") is None
    with pytest.raises(OrthancNotFound):
        research.metadata("Study", "0" * 8, "PrefectOrthancSource")


def test_changes_cursor(pacs: Orthanc, cohort):
    start = pacs.changes(0, 0).last  # limit 0: just the cursor of the end of the log
    path = cohort.studies[-1].files[-1]
    (stored,) = pacs.upload(path)
    pacs.delete("Instance", stored.id)  # 1.10.1 logs no change for this...
    (again,) = pacs.upload(path)  # ...but logs the instance (and its parents) coming back
    seen = list(pacs.iter_changes(since=start, limit=1))  # one change per page
    assert seen and all(c.seq > start for c in seen)
    assert [c.seq for c in seen] == sorted({c.seq for c in seen})
    assert any(c.change_type == "NewInstance" and c.id == again.id for c in seen)
    assert pacs.changes(seen[-1].seq, 100).changes == ()


def test_labels_unsupported_on_1_10(research: Orthanc, loaded_pacs):
    study_id = research.find("Study", limit=1) or ["0" * 8]
    with pytest.raises(OrthancUnsupported) as caught:
        research.add_label("Study", study_id[0], "cohort")
    assert caught.value.required_version == "1.12.0" and "1.10.1" in str(caught.value)
    with pytest.raises(OrthancUnsupported):
        research.find("Study", labels=["cohort"])


def test_wrong_password_is_unauthorized(lab):
    with Orthanc(url=lab.research.url, username="research", password="wrong") as client, \
            pytest.raises(OrthancUnauthorized) as caught:
        client.system()
    error = caught.value
    assert error.status_code == 401 and "wrong" not in str(error)
    assert pickle.loads(pickle.dumps(error)) == error


def test_dead_server_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Orthanc(url=f"http://127.0.0.1:{port}", retries=1, backoff=0.01) as client:
        started = time.monotonic()
        with pytest.raises(OrthancUnavailable) as caught:
            client.system()
    assert time.monotonic() - started < 5
    assert caught.value.transient and "connection refused" in str(caught.value)


def test_server_restart_is_survived_by_retries(lab, research: Orthanc):
    lab.pacs.stop()
    try:
        with pytest.raises(OrthancError) as caught:  # PACS down: an unreachable-peer error
            research.echo("pacs")
        assert caught.value.transient
    finally:
        lab.pacs.start()
    research.echo("pacs")


def test_async_client(lab, loaded_pacs, cohort):
    async def scenario():
        async with AsyncOrthanc(url=lab.research.url, username=lab.research.username,
                                password=lab.research.password) as client:
            info = await client.system()
            found = await client.query("pacs", "Study", {"StudyInstanceUID": ""})
            study = cohort.studies[0]
            result = await client.retrieve_study("pacs", study.study_uid)
            ids = await client.find("Study", {"StudyInstanceUID": study.study_uid})
            return info, found, result, ids

    info, found, result, ids = asyncio.run(scenario())
    assert info.version == "1.10.1"
    assert {s.study_uid for s in cohort.studies} <= {a.get("StudyInstanceUID")
                                                     for a in found.answers}
    assert result.complete and len(ids) == 1
