"""C-ECHO, C-FIND at each level, retrieval, verification and failures, on both PACS kinds of
the lab: an Orthanc 1.10.1 and DCMTK's dcmqrscp (a non-Orthanc Q/R SCP). Their differences are
written down in docs/pacs-peers.md."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import (
    AssociationRejected,
    CountSource,
    Orthanc,
    PacsUnreachable,
    RetrieveOutcome,
)

AETS = {"orthanc": "PACS", "dcmqrscp": "DCMQR"}


def _forget(research: Orthanc, uid: str) -> None:
    research.delete_many(research.find("Study", {"StudyInstanceUID": uid}))


def _declare(research: Orthanc, name: str, aet: str, port: int) -> None:
    research.request("PUT", f"/modalities/{name}",
                     json={"AET": aet, "Host": "127.0.0.1", "Port": port}, expect="none")


def test_echo(research, pacs_peer):
    research.echo(pacs_peer.modality)


def test_find_at_each_level(research, pacs_peer, cohort):
    study = cohort.studies[0]
    patient = research.query(pacs_peer.modality, "Patient", {"PatientID": study.patient_id})
    assert {a.get("PatientID") for a in patient.answers} == {study.patient_id}
    studies = research.query(pacs_peer.modality, "Study",
                             {"PatientID": study.patient_id, "StudyInstanceUID": ""})
    mine = [s for s in cohort.studies if s.patient_id == study.patient_id]
    assert {a.get("StudyInstanceUID") for a in studies.answers} >= {s.study_uid for s in mine}
    series = research.query(pacs_peer.modality, "Series",
                            {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": "",
                             "Modality": ""})
    assert {a.get("SeriesInstanceUID") for a in series.answers} == {s[0] for s in study.series}
    assert {a.get("Modality") for a in series.answers} == {study.modality}
    first = study.series[0][0]
    images = research.query(pacs_peer.modality, "Instance",
                            {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": first,
                             "SOPInstanceUID": ""})
    assert len({a.get("SOPInstanceUID") for a in images.answers}) == study.series[0].instance_count


def test_expected_count_and_how_it_was_obtained(research, pacs_peer, cohort):
    study = cohort.studies[1]
    answers = research.query(pacs_peer.modality, "Study",
                             {"StudyInstanceUID": study.study_uid,
                              "NumberOfStudyRelatedInstances": ""}).answers
    count = research.expected_instances(pacs_peer.modality, study.study_uid,
                                        [a.tags for a in answers])
    assert count is not None and count.total == len(study.files)
    # dcmqrscp drops NumberOf*RelatedInstances (still answering 0xFF00): only IMAGE-level works
    assert count.source is {"orthanc": CountSource.STUDY,
                            "dcmqrscp": CountSource.INSTANCES}[pacs_peer.kind]


def test_retrieve_verify_rerun_and_refetch(research, pacs_peer, cohort):
    study = cohort.studies[2]
    _forget(research, study.study_uid)
    first = research.retrieve_study(pacs_peer.modality, study.study_uid)
    assert first.outcome is RetrieveOutcome.COMPLETE and first.moved
    assert first.expected_instances == first.received_instances == len(study.files)

    again = research.retrieve_study(pacs_peer.modality, study.study_uid)
    assert again.outcome is RetrieveOutcome.ALREADY_PRESENT and not again.job_ids

    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    research.delete_many(research.instances("Study", study_id)[:2])
    fixed = research.retrieve_study(pacs_peer.modality, study.study_uid)
    assert fixed.outcome is RetrieveOutcome.COMPLETE and fixed.moved_instances == 2
    if pacs_peer.kind == "dcmqrscp":  # exactly the two missing instances were asked for
        assert fixed.refetched_instances == 2 and fixed.refetched_series == 0
    else:
        assert fixed.refetched_series >= 1


def test_pacs_down_says_so(research, pacs_peer, cohort):
    from prefect_orthanc.deployments.lab.servers import free_ports

    name = f"{pacs_peer.modality}-down"
    _declare(research, name, AETS[pacs_peer.kind], free_ports(1)[0])  # nothing listens there
    with pytest.raises(PacsUnreachable, match="did not answer at the host and port") as info:
        research.echo(name)
    assert info.value.transient and info.value.reason_code == "pacs_unreachable"
    with pytest.raises(PacsUnreachable):
        research.retrieve_study(name, cohort.studies[0].study_uid)


def test_wrong_called_aet(research, pacs_peer, lab, cohort):
    port = lab.pacs.dicom_port if pacs_peer.kind == "orthanc" else lab.dcmqr.port
    name = f"{pacs_peer.modality}-wrong-aet"
    _declare(research, name, "NOT-THE-AET", port)
    if pacs_peer.kind == "orthanc":
        # the lab's Orthanc PACS runs with DicomCheckCalledAet false: any called AET is fine
        research.echo(name)
        return
    with pytest.raises(AssociationRejected, match="is the PACS's own AET") as info:
        research.echo(name)
    assert info.value.reason_code == "association_rejected"
    assert not info.value.retry_later  # Prefect does not retry it again


@pytest.fixture
def without_destination(request, pacs_peer, lab, research, cohort, tmp_path):
    """A PACS that does not know research as a move destination: the Orthanc PACS with its
    "research" modality removed for the test, or a second dcmqrscp whose host table is empty.
    Returns the modality name research knows it by."""
    if pacs_peer.kind == "orthanc":
        with Orthanc(url=lab.pacs.url) as pacs:
            entry = pacs.request("GET", "/modalities/research/configuration", safe=True)
            pacs.request("DELETE", "/modalities/research", expect="none")
            try:
                yield "pacs"
            finally:
                pacs.request("PUT", "/modalities/research", json=entry, expect="none")
        return
    from prefect_orthanc.deployments.lab.dcmqrscp import Dcmqrscp

    server = Dcmqrscp.start(tmp_path / "nodest", {}, aet="NODEST")
    try:
        server.load(cohort.studies[3].files)
        _declare(research, "nodest", "NODEST", server.port)
        yield "nodest"
    finally:
        server.stop()


def test_unknown_move_destination(research, pacs_peer, without_destination, cohort):
    study = cohort.studies[3]
    _forget(research, study.study_uid)
    result = research.retrieve_study(without_destination, study.study_uid)
    assert result.outcome is RetrieveOutcome.FAILED and not result.moved
    assert result.move_attempts == 1  # permanent: not retried
    assert "register research's AET" in result.failure
    # dcmqrscp answers 0xA801; an Orthanc PACS answers 0xC000 for an AET it does not know
    assert result.reason == {"orthanc": "move_refused",
                             "dcmqrscp": "move_destination_unknown"}[pacs_peer.kind]


@pytest.mark.usefixtures("prefect_server")
def test_flow_row_says_why_and_counts_studies_moved(research_env, research, pacs_peer,
                                                    without_destination, modality_limit,
                                                    cohort, tmp_path):
    import asyncio

    asyncio.run(modality_limit(without_destination, 2))
    study = cohort.studies[3]
    _forget(research, study.study_uid)
    path = tmp_path / "one.csv"
    path.write_text(f"study_instance_uid\n{study.study_uid}\n")
    state = collect_cohort(cohort_file=str(path), project="nodest",
                                             source_modality=without_destination,
                           return_state=True)
    assert state.is_failed()
    report = report_of(state)
    (row,) = report.rows
    assert row.status == "failed" and row.moved == 0 and report.studies_moved == 0
    code = {"orthanc": "move_refused", "dcmqrscp": "move_destination_unknown"}[pacs_peer.kind]
    assert row.note.startswith(code) and "register research's AET" in row.note
    assert "0 moved" in state.message
    with Path(report.report_path).open() as handle:
        written = list(csv.DictReader(handle))
    assert written[0]["result_note"].startswith(code)


@pytest.mark.usefixtures("prefect_server")
def test_patient_rows(research_env, research, pacs_peer, cohort, tmp_path):
    patient = cohort.studies[4].patient_id
    mine = [s for s in cohort.studies if s.patient_id == patient]
    for study in mine:
        _forget(research, study.study_uid)
    path = tmp_path / "patients.csv"
    path.write_text(f"patient_id\n{patient}\n")
    report = collect_cohort(cohort_file=str(path), project="by-patient",
                                              source_modality=pacs_peer.modality)
    (row,) = report.rows
    assert row.status == "collected" and row.studies == len(mine) == row.moved
    assert row.received_instances == row.expected_instances == sum(len(s.files) for s in mine)


@pytest.mark.usefixtures("prefect_server")
def test_forward_to_a_partner_that_comes_back(research, research_creds, modality_limit,
                                              loaded_pacs, cohort, tmp_path):
    """The partner PACS is down when the C-STORE job runs (Orthanc error 9): the task is
    retried with backoff and the study arrives once the partner is back."""
    import asyncio
    import threading

    from prefect import flow

    from prefect_orthanc.deployments.lab.dcmqrscp import Dcmqrscp
    from prefect_orthanc.deployments.lab.servers import free_ports
    from prefect_orthanc.tasks import store_to_modality

    study = cohort.studies[5]
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    port = free_ports(1)[0]
    _declare(research, "partner", "PARTNER", port)
    asyncio.run(modality_limit("partner", 1))
    partner = Dcmqrscp(tmp_path / "partner", {}, aet="PARTNER", port=port)
    later = threading.Timer(2.5, partner.boot, kwargs={"attempts": 1})
    later.start()

    @flow(name="forward-under-test")
    def forward():
        return store_to_modality(research_creds, "partner", [study_id])

    try:
        job = forward()
        assert job.state.value == "Success"
        # the partner is a dcmqrscp: ask it what it holds, through research
        found = research.query("partner", "Instance", {"StudyInstanceUID": study.study_uid,
                                                    "SeriesInstanceUID": "",
                                                    "SOPInstanceUID": ""})
        assert len(found.answers) == len(study.files)
    finally:
        later.join()
        partner.stop()


@pytest.mark.usefixtures("prefect_server")
def test_flow_with_pacs_down_fails_saying_so(research_env, research, pacs_peer, modality_limit,
                                             cohort, tmp_path):
    import asyncio

    from prefect_orthanc.deployments.lab.servers import free_ports

    name = f"{pacs_peer.modality}-down"
    _declare(research, name, AETS[pacs_peer.kind], free_ports(1)[0])
    asyncio.run(modality_limit(name, 1))
    path = tmp_path / "down.csv"
    path.write_text(f"accession_number\n{cohort.studies[0].accession}\n")
    state = collect_cohort(cohort_file=str(path), project="down",
                                             source_modality=name, return_state=True)
    # an operational error that stops the run ends it Failed in one line saying what to fix
    # (flows.states.stop_run), not with the exception's traceback
    assert state.is_failed() and state.message.startswith("collection stopped:"), state
    assert "did not answer at the host and port" in state.message
