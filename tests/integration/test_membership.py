"""Project membership and study origin on the real Orthanc 1.10.1 lab.

A study collected for two projects belongs to both and is shared by each; concurrent label
writers keep every label; a study retrieved by the collection flow is not a new study for
the routing flow (whether its stable event comes before or after the retrieval marked it),
unless asked.
"""

from __future__ import annotations

import csv
import threading
import uuid
from pathlib import Path

import pytest

from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.routing import RouteRule, route_new_study
from prefect_orthanc.flows.sharing import SECRET_ENV, Destination, share_studies
from prefect_orthanc.orthanc_client import Level, Orthanc
from prefect_orthanc.tasks.labels import attach_labels, labels_of, project_studies
from prefect_orthanc.tasks.origin import RETRIEVED_METADATA, end_retrieval, register_retrieval

from .conftest import DEID_SECRET

pytestmark = pytest.mark.usefixtures("prefect_server")


def _collect(path: Path, studies, project: str):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid"])
        writer.writerows([[s.study_uid] for s in studies])
    state = collect_cohort(cohort_file=str(path), project=project, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def _ids(research: Orthanc, studies) -> set[str]:
    return {i for s in studies for i in research.find("Study", {"StudyInstanceUID": s.study_uid})}


def test_a_study_in_two_projects_is_shared_by_each(research_env, monkeypatch, research,
                                                  loaded_pacs, cohort, tmp_path):
    monkeypatch.setenv(SECRET_ENV, DEID_SECRET)
    first, second = f"lung-{uuid.uuid4().hex[:6]}", f"heart-{uuid.uuid4().hex[:6]}"
    in_first, in_second = cohort.studies[0:3], cohort.studies[2:5]  # studies[2] is in both
    _collect(tmp_path / "first.csv", in_first, first)
    _collect(tmp_path / "second.csv", in_second, second)

    both = _ids(research, cohort.studies[2:3])
    assert all({first, second} <= labels_of(research, "Study", i) for i in both)
    assert set(project_studies(research, first)) == _ids(research, in_first)
    assert set(project_studies(research, second)) == _ids(research, in_second)

    for project, members in ((first, in_first), (second, in_second)):
        out = tmp_path / project
        state = share_studies(
            project=project, destination=Destination(kind="directory", target=str(out)),
            linkage_path=str(tmp_path / "private" / f"{project}.csv"),
            staging_dir=str(tmp_path / "staging"),
            ledger_path=str(tmp_path / f"{project}.jsonl"), return_state=True)
        assert state.is_completed(), state.message
        shared = state.result()
        assert {s.source_id for s in shared} == _ids(research, members)
        assert all(s.verified and s.delivered for s in shared)
        assert len(list(out.glob("*.zip"))) == len(members)


def _attach_at_once(research: Orthanc, study_id: str, labels: set[str]) -> list[BaseException]:
    """One writer per label, each with its own connection (as flows do), released together
    by a barrier; returns what the writers raised."""
    barrier = threading.Barrier(len(labels))
    errors: list[BaseException] = []

    def write(label: str) -> None:
        with Orthanc(research.settings) as own:
            barrier.wait()
            try:
                attach_labels(own, Level.STUDY, study_id, [label])
            except BaseException as error:
                errors.append(error)

    threads = [threading.Thread(target=write, args=(label,)) for label in sorted(labels)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_concurrent_writers_keep_every_label(research, loaded_pacs, cohort):
    """Eight writers add a label each to the same study at once (the set exists, so every
    write is a compare-and-set on 1.10.1): none is lost."""
    study = cohort.studies[5]
    research.retrieve_study("pacs", study.study_uid)
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    attach_labels(research, Level.STUDY, study_id, ["seed"])
    before = labels_of(research, Level.STUDY, study_id)
    wanted = {f"writer-{uuid.uuid4().hex[:6]}" for _ in range(8)}
    assert _attach_at_once(research, study_id, wanted) == []
    assert labels_of(research, Level.STUDY, study_id) == before | wanted


def test_collected_studies_are_not_new_studies(research_env, research, loaded_pacs, cohort,
                                               tmp_path):
    rules = [RouteRule(name="tag", action="label", labels=["arrived"])]
    study = cohort.studies[1]
    for found in research.find("Study", {"StudyInstanceUID": study.study_uid}):
        research.delete(Level.STUDY, found)
    report = _collect(tmp_path / "one.csv", [study], f"p-{uuid.uuid4().hex[:6]}")
    assert report.studies_moved == 1
    (study_id,) = _ids(research, [study])
    assert research.metadata(Level.STUDY, study_id, RETRIEVED_METADATA) == "pacs"

    state = route_new_study(study_id, rules=rules, return_state=True)
    assert state.is_completed() and state.result().skipped, state.message
    assert "arrived" not in labels_of(research, Level.STUDY, study_id)

    state = route_new_study(study_id, rules=rules, include_retrieved=True, return_state=True)
    assert state.is_completed(), state.message
    assert state.result().done == ("tag",)
    assert "arrived" in labels_of(research, Level.STUDY, study_id)


def test_a_study_still_being_retrieved_is_not_new(research_env, research, pacs, loaded_pacs,
                                                 cohort):
    """The stable event can come before the retrieval marks the study: the in-flight record,
    written before the move, covers that window."""
    rules = [RouteRule(name="tag", action="label", labels=["arrived"])]
    study = cohort.studies[4]
    for found in research.find("Study", {"StudyInstanceUID": study.study_uid}):
        research.delete(Level.STUDY, found)
    register_retrieval(study.study_uid, "pacs")
    try:
        (source,) = pacs.find("Study", {"StudyInstanceUID": study.study_uid})
        pacs.store("research", [source], synchronous=True)  # arrives, not marked yet
        (study_id,) = _ids(research, [study])
        assert research.metadata(Level.STUDY, study_id, RETRIEVED_METADATA) is None
        state = route_new_study(study_id, rules=rules, return_state=True)
        assert state.is_completed() and state.result().skipped, state.message
    finally:
        end_retrieval(study.study_uid)
    # no record left, no mark: the same study pushed by a modality is a new study
    state = route_new_study(study_id, rules=rules, return_state=True)
    assert state.result().done == ("tag",), state.message


def test_anonymized_copies_are_not_new_studies(research_env, research, loaded_pacs, cohort):
    """The sharing flow's de-identified copies live in research through packaging and
    delivery and fire the stable event too: skipped unless include_copies."""
    rules = [RouteRule(name="tag", action="label", labels=["arrived"])]
    study = cohort.studies[3]
    research.retrieve_study("pacs", study.study_uid)
    (source,) = _ids(research, [study])
    copy = research.modified_resource(research.wait_for_job(str(
        research.anonymize(Level.STUDY, source, asynchronous=True)))).id
    try:
        state = route_new_study(copy, rules=rules, return_state=True)
        assert state.is_completed() and state.result().skipped, state.message
        assert "anonymized or modified copy" in state.message
        state = route_new_study(copy, rules=rules, include_copies=True, return_state=True)
        assert state.result().done == ("tag",), state.message
    finally:
        research.delete(Level.STUDY, copy, missing_ok=True)


@pytest.fixture(scope="module")
def revisions_research(tmp_path_factory):
    """A research server with ``CheckRevisions: true`` (a lab of its own)."""
    from prefect_orthanc.deployments.lab.servers import OrthancLab

    lab = OrthancLab.start(tmp_path_factory.mktemp("revisions-lab"),
                           research_overrides={"CheckRevisions": True})
    try:
        with Orthanc(url=lab.research.url, username=lab.research.username,
                     password=lab.research.password) as client:
            assert client.system_info().check_revisions is True
            yield client
    finally:
        lab.stop()


def test_check_revisions_makes_even_the_first_write_safe(revisions_research, cohort):
    """With CheckRevisions, Orthanc refuses a second creator, so eight writers racing to
    create a study's label set all keep their label; plain overwrites still work."""
    from prefect_orthanc.deployments.lab.synthetic import zip_bytes

    research = revisions_research
    for round_ in range(3):
        research.delete_many(research.find("Study", {}))
        stored = research.upload(zip_bytes(cohort.studies[round_].files))
        study_id = next(item.parent_study for item in stored if item.parent_study)
        wanted = {f"writer-{i}" for i in range(8)}
        assert _attach_at_once(research, study_id, wanted) == []
        assert labels_of(research, Level.STUDY, study_id) == wanted
    research.set_metadata(Level.STUDY, study_id, "PrefectOrthancRouted", "a")
    research.set_metadata(Level.STUDY, study_id, "PrefectOrthancRouted", "b")  # overwrite
    assert research.metadata(Level.STUDY, study_id, "PrefectOrthancRouted") == "b"
