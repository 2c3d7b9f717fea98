"""PACS behaviours neither lab peer shows, from a small pynetdicom SCP (quirky_scp.py), and
dcmqrscp's late-freed association limit: the collection flow must complete on each."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from prefect_orthanc.flows.cohort import Criteria
from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Orthanc, RetrieveOutcome
from tests.integration.quirky_scp import QuirkySCP

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def quirk_cohort(tmp_path_factory):
    """2 patients x 3 studies x 2 series x 4 instances (CT and MR alternate by study)."""
    from prefect_orthanc.deployments.lab.synthetic import make_cohort

    return make_cohort(tmp_path_factory.mktemp("quirks"), patients=2, studies_per_patient=3,
                       series_per_study=2, instances_per_series=4, seed=21)


@pytest.fixture
def quirky(lab, research, research_env, modality_limit, quirk_cohort):
    """Start a QuirkySCP with the given quirks, declared in research as modality "quirky"."""
    started: list[QuirkySCP] = []

    def start(**quirks) -> QuirkySCP:
        scp = QuirkySCP(quirk_cohort.files, {"RESEARCH": lab.research.dicom_port},
                        **quirks).start()
        started.append(scp)
        research.request("PUT", "/modalities/quirky", json={
            "AET": scp.aet, "Host": "127.0.0.1", "Port": scp.port}, expect="none")
        asyncio.run(modality_limit("quirky", 2))
        for study in quirk_cohort.studies:
            research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
        return scp

    yield start
    for scp in started:
        scp.stop()


def _cohort_file(tmp_path: Path, column: str, values: list[str]) -> str:
    path = tmp_path / "cohort.csv"
    path.write_text(column + "\n" + "\n".join(values) + "\n")
    return str(path)


def test_one_answer_per_instance(quirky, quirk_cohort, research, tmp_path):
    """60 answers for 6 studies: each study is planned and moved once, and the cap counts
    distinct studies (at most 3 studies a day here)."""
    scp = quirky(answers_per_instance=True)
    dates = sorted(s.study_date for s in quirk_cohort.studies)
    report = collect_cohort(
        criteria=Criteria(date_from=dates[0], date_to=dates[-1]), find_cap=4,
        source_modality="quirky", project="per-instance", report_dir=str(tmp_path))
    assert report.studies_found == report.studies_complete == len(quirk_cohort.studies)
    assert scp.moves == len(quirk_cohort.studies)  # one C-MOVE per study, not per answer
    for study in quirk_cohort.studies:
        (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
        assert research.count_instances("Study", study_id) == len(study.files)


def test_silent_cap_on_a_patient_row(quirky, quirk_cohort, tmp_path):
    """A patient with 3 studies on a PACS that silently stops at 2: with find_cap=2 the row
    is too_many_matches, not 'Completed 2/2'."""
    scp = quirky(find_cap=2)
    patient = quirk_cohort.studies[0].patient_id
    state = collect_cohort(
        cohort_file=_cohort_file(tmp_path, "patient_id", [patient]), find_cap=2,
        source_modality="quirky", project="capped", return_state=True)
    report = report_of(state)
    (row,) = report.rows
    assert row.status == "too_many_matches" and "study_date" in row.note
    assert scp.moves == 0


def test_asynchronous_move_waits_for_arrivals(quirky, quirk_cohort, research):
    """The C-MOVE is acknowledged at once and the C-STOREs follow: the study is complete after
    arrivals settle, with no re-fetch and one C-MOVE."""
    scp = quirky(async_store=True, store_interval=0.1)
    study = quirk_cohort.studies[1]
    result = research.retrieve_study("quirky", study.study_uid)
    assert result.outcome is RetrieveOutcome.COMPLETE
    assert result.received_instances == len(study.files)
    assert result.refetched_series == result.refetched_instances == 0
    assert scp.moves == 1


def test_busy_pacs_move_is_retried(quirky, quirk_cohort, research):
    """Out of resources (0xA702), nothing sent: retried with backoff, then complete."""
    scp = quirky(busy_moves=2)
    study = quirk_cohort.studies[2]
    result = research.retrieve_study("quirky", study.study_uid, backoff=0.2)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.move_attempts == 3
    assert scp.moves == 3


def test_rejected_associations_are_retried(quirky, quirk_cohort, lab):
    """The PACS has no free association for a moment (rejected transient): the C-FIND is
    tried again by the request itself, and the collection completes."""
    scp = quirky(reject_moves=2)
    study = quirk_cohort.studies[3]
    with Orthanc(url=lab.research.url, username=lab.research.username,
                 password=lab.research.password, retries=3, backoff=0.1) as client:
        result = client.retrieve_study("quirky", study.study_uid)
    assert result.outcome is RetrieveOutcome.COMPLETE and scp.rejected == 2


def test_a_move_outliving_its_killed_run_is_waited_for_not_repeated(
        quirky, quirk_cohort, research, research_env, tmp_path):
    """A run is killed (SIGKILL) while its C-MOVE job runs: the job goes on in Orthanc with
    its association open. The re-run waits for that job under its own slot instead of moving
    the study a second time beside it: one C-MOVE reaches the PACS, never two at once, and
    the study ends complete."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import prefect.settings

    scp = quirky(slow_store=0.5)  # 8 instances: a 4 s move
    study = quirk_cohort.studies[5]
    path = _cohort_file(tmp_path, "study_instance_uid", [study.study_uid])
    env = {**os.environ, **research_env,
           "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}
    code = ("from prefect_orthanc.flows.collection import collect_cohort\n"
            f"collect_cohort(cohort_file={path!r}, source_modality='quirky', project='kill')\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while scp.moving == 0:  # its C-MOVE is under way: kill the run now
            assert child.poll() is None and time.monotonic() < deadline, "no move started"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert scp.moving == 1  # the dead run's job goes on

    report = collect_cohort(cohort_file=path, source_modality="quirky", project="kill",
                            report_dir=str(tmp_path))
    assert report.studies_complete == 1, report.rows
    assert scp.moves == 1 and scp.peak_moving == 1
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    assert research.count_instances("Study", study_id) == len(study.files)


def test_unknown_destination_on_quirky(quirky, quirk_cohort, research):
    scp = quirky()
    scp.destinations.clear()
    result = research.retrieve_study("quirky", quirk_cohort.studies[4].study_uid)
    assert result.reason == "move_destination_unknown" and result.move_attempts == 1
    assert scp.moves == 1


@pytest.fixture
def dcmqr_one_association(lab, research, research_env, modality_limit, quirk_cohort,
                          tmp_path):
    """dcmqrscp with MaxAssociations 1: it frees an association late, so a C-MOVE right after
    a C-FIND is often rejected ("DUL Association Rejected")."""
    from prefect_orthanc.deployments.lab.dcmqrscp import Dcmqrscp

    server = Dcmqrscp.start(tmp_path / "one", {"RESEARCH": lab.research.dicom_port},
                            aet="ONEASSOC", max_associations=1)
    try:
        server.load(quirk_cohort.files)
        research.request("PUT", "/modalities/one-assoc", json={
            "AET": "ONEASSOC", "Host": "127.0.0.1", "Port": server.port}, expect="none")
        asyncio.run(modality_limit("one-assoc", 1))
        for study in quirk_cohort.studies:
            research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
        yield server
    finally:
        server.stop()


def test_dcmqrscp_with_one_association(dcmqr_one_association, quirk_cohort, tmp_path):
    studies = quirk_cohort.studies[:4]
    state = collect_cohort(
        cohort_file=_cohort_file(tmp_path, "study_instance_uid", [s.study_uid for s in studies]),
        source_modality="one-assoc", project="one-assoc", concurrency=2, return_state=True)
    report = report_of(state)
    assert state.is_completed(), state.message
    assert report.studies_complete == report.studies_moved == len(studies)
