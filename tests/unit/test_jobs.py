"""Jobs: polling to an outcome, failure, timeout, lost jobs, and job results."""

from __future__ import annotations

import json
import pickle
import time

import httpx
import pytest

from prefect_orthanc.orthanc_client import (
    JobInfo,
    JobState,
    ModifyResult,
    Orthanc,
    OrthancHTTPError,
    OrthancJobFailed,
    OrthancJobLost,
    OrthancJobTimeout,
    OrthancUsageError,
)
from tests.unit._mocks import orthanc_error

JOB = "0f8b4cd9-job"


def job(state: str, progress: int = 0, **extra) -> httpx.Response:
    return httpx.Response(200, json={
        "ID": JOB, "Type": "ResourceModification", "State": state, "Progress": progress,
        "Priority": 0, "ErrorCode": 0, "ErrorDescription": "Success",
        "CreationTime": "20240101T000000", **extra})


def test_wait_for_job_pending_running_success(router, orthanc):
    content = {"ID": "new-study", "Type": "Study", "PatientID": "ANON-PID-1",
               "Description": "REST API"}
    route = router.get(f"/jobs/{JOB}").mock(side_effect=[
        job("Pending"), job("Running", 40), job("Success", 100, Content=content)])
    info = orthanc.wait_for_job(JOB, timeout=5, interval=0.001)
    assert isinstance(info, JobInfo)
    assert info.state is JobState.SUCCESS and info.state.finished
    assert info.progress == 100
    assert route.call_count == 3
    assert "ANON-PID-1" not in repr(info)  # content is not in repr
    result = Orthanc.modified_resource(info)
    assert result == ModifyResult(ID="new-study", Type="Study", PatientID="ANON-PID-1",
                                  job_id=JOB)
    assert result.level.value == "Study" and result.job_id == JOB
    assert orthanc.modified_resource(info).id == "new-study"
    assert "ANON-PID-1" not in repr(result)


def test_modified_resource_needs_success_with_content(router, orthanc):
    running = JobInfo.model_validate(job("Running").json())
    with pytest.raises(OrthancUsageError, match="Running"):
        Orthanc.modified_resource(running)
    empty = JobInfo.model_validate(job("Success").json())
    with pytest.raises(OrthancUsageError):
        Orthanc.modified_resource(empty)


def test_wait_for_job_failure(router, orthanc):
    router.get(f"/jobs/{JOB}").mock(side_effect=[job("Running"), job(
        "Failure", 30, ErrorCode=9, ErrorDescription="Error in the network protocol",
        ErrorDetails="C-MOVE of patient \"PID-7734521\" to AET RESEARCH failed")])
    with pytest.raises(OrthancJobFailed) as info:
        orthanc.wait_for_job(JOB, timeout=5, interval=0.001)
    error = info.value
    assert error.job_id == JOB
    assert error.job_type == "ResourceModification"
    assert error.error_code == 9
    assert error.error_description == "Error in the network protocol"
    assert error.error_details is not None and "C-MOVE" in error.error_details
    assert "PID-7734521" not in error.error_details
    assert "PID-7734521" not in str(error) and "PID-7734521" not in repr(error)
    assert "Error in the network protocol" in str(error)
    assert pickle.loads(pickle.dumps(error)) == error


def test_wait_for_job_times_out_quickly(router, orthanc):
    route = router.get(f"/jobs/{JOB}").mock(return_value=job("Running", 55))
    started = time.monotonic()
    with pytest.raises(OrthancJobTimeout) as info:
        orthanc.wait_for_job(JOB, timeout=0.05)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert 1 <= route.call_count <= 5  # a few polls, not a busy loop
    error = info.value
    assert (error.job_id, error.timeout, error.state, error.progress) == (
        JOB, 0.05, "Running", 55)
    assert "55%" in str(error)


def test_wait_for_job_zero_timeout_polls_once(router, orthanc):
    route = router.get(f"/jobs/{JOB}").mock(return_value=job("Pending"))
    with pytest.raises(OrthancJobTimeout):
        orthanc.wait_for_job(JOB, timeout=0)
    assert route.call_count == 1


def test_wait_for_job_backs_off_up_to_max_interval(router, orthanc, monkeypatch):
    """Poll delays grow x1.5 up to max_interval, and never exceed the time left."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # the sync driver's only sleep
    states = [job("Running")] * 8 + [job("Success")]
    router.get(f"/jobs/{JOB}").mock(side_effect=states)
    orthanc.wait_for_job(JOB, timeout=1000, interval=0.1, max_interval=0.3)
    assert slept == pytest.approx([0.1, 0.15, 0.225, 0.3, 0.3, 0.3, 0.3, 0.3])


def test_wait_for_unknown_job_is_lost(router, orthanc):
    route = router.get(f"/jobs/{JOB}").mock(return_value=orthanc_error(404, 17, "Unknown resource"))
    with pytest.raises(OrthancJobLost) as info:
        orthanc.wait_for_job(JOB, timeout=5)
    assert info.value.job_id == JOB
    assert "JobsHistorySize" in str(info.value)
    assert route.call_count == 1
    assert info.value.__cause__ is None


def test_job_lost_also_with_empty_404(router, orthanc):
    router.get(f"/jobs/{JOB}").mock(return_value=httpx.Response(404))
    with pytest.raises(OrthancJobLost):
        orthanc.job(JOB)


def test_job_poll_survives_a_transient_error(router, orthanc):
    route = router.get(f"/jobs/{JOB}").mock(side_effect=[
        job("Running"), httpx.Response(503), job("Success")])
    assert orthanc.wait_for_job(JOB, timeout=5, interval=0.001).state is JobState.SUCCESS
    assert route.call_count == 3


def test_anonymize_async_returns_job_id_and_sends_body(router, orthanc):
    route = router.post("/studies/st1/anonymize").mock(
        return_value=httpx.Response(200, json={"ID": JOB, "Path": f"/jobs/{JOB}"}))
    assert orthanc.anonymize("Study", "st1", replace={"PatientName": "ANON"},
                             keep=["StudyDescription"], force=True, priority=3) == JOB
    sent = json.loads(route.calls.last.request.content)
    assert sent["Asynchronous"] is True and "Synchronous" not in sent
    assert sent["Replace"] == {"PatientName": "ANON"} and sent["Keep"] == ["StudyDescription"]
    assert sent["Force"] is True and sent["Priority"] == 3 and sent["KeepSource"] is True


def test_anonymize_synchronous_returns_resource(router, orthanc):
    router.post("/series/se1/modify").mock(return_value=httpx.Response(200, json={
        "ID": "se2", "Type": "Series", "PatientID": "P", "Path": "/series/se2"}))
    result = orthanc.modify("Series", "se1", replace={"SeriesDescription": "x"},
                            asynchronous=False)
    assert result.id == "se2" and result.level.value == "Series"


def test_anonymize_instance_is_usage_error(router, orthanc):
    with pytest.raises(OrthancUsageError):
        orthanc.anonymize("Instance", "i1")
    assert len(router.calls) == 0


@pytest.mark.parametrize("action,safe", [("cancel", True), ("pause", True), ("resume", True),
                                         ("resubmit", False)])
def test_job_actions(router, orthanc, action, safe):
    route = router.post(f"/jobs/{JOB}/{action}").mock(
        side_effect=[httpx.Response(503), httpx.Response(200, json={})])
    method = getattr(orthanc, f"{action}_job")
    if safe:
        assert method(JOB) is None
        assert route.call_count == 2
    else:
        with pytest.raises(OrthancHTTPError):
            method(JOB)
        assert route.call_count == 1
