"""The Prefect tasks on the real lab, under one session-wide Prefect test server."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import zipfile
from datetime import UTC, datetime

import pytest
from prefect import flow
from prefect.client.orchestration import get_client

from prefect_orthanc.orthanc_client import (
    JobState,
    Level,
    RetrieveOutcome,
)
from prefect_orthanc.tasks import (
    ModalityLimitMissing,
    UnknownModality,
    add_labels,
    advance_changes_cursor,
    anonymize_resource,
    delete_resources,
    download_archive,
    echo_modality,
    find_resource_ids,
    modify_resource,
    query_modality,
    read_changes,
    retrieve_study,
    set_metadata,
    store_to_modality,
    wait_for_job,
)

pytestmark = pytest.mark.usefixtures("prefect_server")


def _run(task, *args, **kwargs):
    """Run one task inside a throwaway flow run (as users do) and return its result."""

    @flow(name="task-under-test")
    def wrapper():
        return task(*args, **kwargs)

    return wrapper()


def _study_id(research, study):
    (study_id,) = research.find("Study", {"StudyInstanceUID": study.study_uid})
    return study_id


def test_echo_and_query(research_creds, loaded_pacs, cohort):
    assert _run(echo_modality, research_creds, "pacs") is True
    answers = _run(query_modality, research_creds, "pacs", "Study",
                   {"StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""})
    counts = {a.get("StudyInstanceUID"): a.get("NumberOfStudyRelatedInstances")
              for a in answers.answers}  # other tests may have added studies: check ours
    assert all(counts[s.study_uid] == str(len(s.files)) for s in cohort.studies)
    series = _run(query_modality, research_creds, "pacs", Level.SERIES,
                  {"StudyInstanceUID": cohort.studies[0].study_uid, "SeriesInstanceUID": ""})
    assert len(series) == len(cohort.studies[0].series)


def test_retrieve_study_then_rerun_moves_nothing(research_creds, research, loaded_pacs,
                                                 cohort):
    study = cohort.studies[4]
    research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
    first = _run(retrieve_study, research_creds, "pacs", study.study_uid)
    assert first.outcome is RetrieveOutcome.COMPLETE
    assert first.received_instances == first.expected_instances == len(study.files)
    second = _run(retrieve_study, research_creds, "pacs", study.study_uid)
    assert second.outcome is RetrieveOutcome.ALREADY_PRESENT and not second.moved


def test_partial_move_is_detected_and_completed(research_creds, research, pacs, flaky_study):
    """The research server rejects the first copy of one series (Lua filter): the C-MOVE
    reports a failure or a short count, and the task re-fetches just that series."""
    uid, expected = flaky_study
    result = _run(retrieve_study, research_creds, "pacs", uid)
    assert result.outcome is RetrieveOutcome.COMPLETE
    assert result.received_instances == result.expected_instances == expected
    assert result.refetched_series == 1
    assert len(result.job_ids) == 2  # the study move, then the one series


def test_partial_result_is_honest_when_refetch_is_off(research_creds, research, pacs,
                                                     flaky_study_factory):
    uid, expected = flaky_study_factory()
    result = _run(retrieve_study, research_creds, "pacs", uid, refetch_rounds=0)
    assert result.outcome is RetrieveOutcome.PARTIAL
    assert 0 < result.received_instances < expected == result.expected_instances
    assert not result.complete


@pytest.mark.parametrize("with_limit", [False, True])
def test_unknown_modality_fails_without_retry(research_creds, modality_limit, with_limit):
    """Reported as an unknown modality, with or without a concurrency limit of that name
    (before: "no concurrency limit", then, once it was created, OrthancNotFound)."""
    if with_limit:
        asyncio.run(modality_limit("no-such-pacs", 1))  # the limit exists; the modality not

    states = []

    @flow
    def run():
        states.append(retrieve_study(research_creds, "no-such-pacs", "1.2.3",
                                     return_state=True))

    run()
    (state,) = states
    with pytest.raises(UnknownModality, match="no DICOM modality named 'no-such-pacs'"):
        state.result()
    assert state.state_details.task_run_id is not None
    task_run = asyncio.run(_read_task_run(state.state_details.task_run_id))
    assert task_run.run_count == 1  # a wrong name is not transient: no retry


def _start_when_awaiting_retry(server, timeout=60.0):
    """Start ``server`` as soon as some task run is in AwaitingRetry (bounded wait)."""
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateName,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    async def awaiting() -> bool:
        async with get_client() as client:
            runs = await client.read_task_runs(
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                    name=TaskRunFilterStateName(any_=["AwaitingRetry"]))),
                sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=1)
        return bool(runs)

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not asyncio.run(awaiting()):
            time.sleep(0.2)
    finally:
        server.start()


async def _read_task_run(task_run_id):
    async with get_client() as client:
        return await client.read_task_run(task_run_id)


def test_transient_failure_succeeds_after_retry(lab, research_creds, research, loaded_pacs,
                                                cohort):
    study = cohort.studies[5]
    research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
    # retries enough to outlast the time the server takes to record AwaitingRetry under load
    quick = retrieve_study.with_options(retries=30, retry_delay_seconds=1)

    states = []

    @flow
    def run():
        states.append(quick(research_creds, "pacs", study.study_uid, return_state=True))

    lab.pacs.stop()  # the PACS is down when the task starts, and back once it awaits a retry
    restarter = threading.Thread(target=_start_when_awaiting_retry, args=(lab.pacs,))
    restarter.start()
    try:
        run()
    finally:
        restarter.join()
    (state,) = states
    result = state.result()
    assert result.outcome is RetrieveOutcome.COMPLETE
    task_run = asyncio.run(_read_task_run(state.state_details.task_run_id))
    assert task_run.run_count >= 2


def test_missing_concurrency_limit_is_an_error(pacs_creds, prefect_server):
    with pytest.raises(ModalityLimitMissing) as caught:
        _run(query_modality, pacs_creds, "research", "Study", {})
    assert "prefect-orthanc-limits research=" in str(caught.value)


def test_moves_in_flight_never_exceed_the_limit(research_creds, research, loaded_pacs, cohort,
                                                modality_limit):
    """Four flow runs retrieve four studies at once with a limit of 1 on the PACS: Orthanc's own
    job timestamps show no two C-MOVE jobs ever overlapped."""
    asyncio.run(modality_limit("pacs", 1))
    studies = cohort.studies[:4]
    for study in studies:
        research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
    started = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")

    @flow
    def pull_one(index: int):  # flow parameters are shown in the UI: an index, never a UID
        return retrieve_study(research_creds, "pacs", studies[index].study_uid)

    results = [None] * len(studies)

    def worker(i):
        results[i] = pull_one(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(studies))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    finally:
        asyncio.run(modality_limit("pacs", 2))
    assert all(r is not None and r.outcome is RetrieveOutcome.COMPLETE for r in results)

    jobs = [research.job(j) for r in results for j in r.job_ids]
    assert len(jobs) == 4
    spans = sorted((j.creation_time, j.completion_time) for j in jobs)
    assert all(start >= started for start, _ in spans)
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert end <= next_start, f"two C-MOVE jobs overlapped: {spans}"


def test_anonymize_modify_archive_store_delete(research_creds, research, loaded_pacs, cohort,
                                               tmp_path):
    study = cohort.studies[0]
    research.retrieve_study("pacs", study.study_uid)
    source_id = _study_id(research, study)

    anonymized = _run(anonymize_resource, research_creds, "Study", source_id,
                      replace={"PatientID": "PSEUDO-1", "PatientName": "PSEUDO^1"}, force=True)
    tags = research.tags("Study", anonymized.id, shared=True)
    assert tags["PatientID"] == "PSEUDO-1" and tags["StudyInstanceUID"] != study.study_uid

    modified = _run(modify_resource, research_creds, "Study", anonymized.id,
                    replace={"StudyDescription": "SHARED"})
    assert research.tags("Study", modified.id, shared=True)["StudyDescription"] == "SHARED"

    archive = _run(download_archive, research_creds, [modified.id], tmp_path / "out.zip")
    with zipfile.ZipFile(archive.path) as zipped:
        assert len([n for n in zipped.namelist() if not n.endswith("/")]) == len(study.files)
    assert len(archive.sha256) == 64 and archive.size == archive.path.stat().st_size

    job = _run(store_to_modality, research_creds, "pacs", [modified.id])
    assert job.state is JobState.SUCCESS

    assert _run(delete_resources, research_creds, [anonymized.id, modified.id]) == 2
    assert not research.exists("Study", anonymized.id)


def test_wait_find_metadata_labels(research_creds, research, loaded_pacs, cohort):
    study = cohort.studies[0]
    research.retrieve_study("pacs", study.study_uid)
    study_id = _study_id(research, study)
    job_id = research.archive_job([study_id])
    assert _run(wait_for_job, research_creds, job_id, timeout=60).state is JobState.SUCCESS

    found = _run(find_resource_ids, research_creds, "Study", {"StudyInstanceUID": study.study_uid})
    assert found == [study_id]
    _run(set_metadata, research_creds, "Study", study_id, "PrefectOrthancCollected", "demo")
    assert research.metadata("Study", study_id, "PrefectOrthancCollected") == "demo"
    # labels work on 1.10.1 too (a metadata set); the single-valued project of earlier
    # releases (PrefectOrthancCollected, just set) reads as one more label
    labels = _run(add_labels, research_creds, "Study", study_id, ["cohort"])
    assert {"cohort", "demo"} <= set(labels) and labels == sorted(labels)


def test_changes_cursor_reads_then_advances(pacs_creds, pacs, cohort):
    # Only NewInstance: Stable* changes keep arriving StableAge seconds after any upload.
    new = ("NewInstance",)
    first = _run(read_changes, pacs_creds, "test-cursor", change_types=new)
    assert first.changes == ()  # a new cursor starts at the end of the log
    extra = pacs.upload(cohort.studies[-1].files[0])  # AlreadyStored makes no change...
    pacs.delete("Instance", extra[0].id)
    (back,) = pacs.upload(cohort.studies[-1].files[0])  # ...a re-upload does
    batch = _run(read_changes, pacs_creds, "test-cursor", change_types=new)
    assert [(c.change_type, c.id) for c in batch.changes] == [("NewInstance", back.id)]
    again = _run(read_changes, pacs_creds, "test-cursor", change_types=new)
    assert again.changes == batch.changes  # not advanced: the same batch again
    assert _run(advance_changes_cursor, "test-cursor", batch.next_since) == batch.next_since
    assert _run(read_changes, pacs_creds, "test-cursor", change_types=new).changes == ()
    assert _run(advance_changes_cursor, "test-cursor", 0) == batch.next_since  # never back


