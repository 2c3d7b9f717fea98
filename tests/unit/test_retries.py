"""Retry policy: which requests are retried, how often, and how long the delays may be."""

from __future__ import annotations

import random

import httpx
import pytest

from prefect_orthanc.orthanc_client import (
    OrthancBadRequest,
    OrthancHTTPError,
    OrthancNotFound,
    OrthancUnavailable,
)
from prefect_orthanc.orthanc_client.core import Call, RetryPolicy, Send, Sleep, request
from tests.unit._mocks import BASE, orthanc_error

OK_STATS = {"CountStudies": 1}


def test_delays_bounded_by_cap_and_base_times_power_of_two():
    policy = RetryPolicy(retries=8, base=0.5, cap=10.0)
    bounds = [min(10.0, 0.5 * 2**n) for n in range(8)]
    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    for _ in range(200):
        delays = list(policy.delays())
        assert len(delays) == 8
        assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True))


def test_delays_use_full_jitter_over_the_whole_interval(monkeypatch):
    asked = []

    def uniform(low, high):
        asked.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", uniform)
    assert list(RetryPolicy(retries=6, base=1.0, cap=5.0).delays()) == [1, 2, 4, 5, 5, 5]
    assert asked == [(0, 1), (0, 2), (0, 4), (0, 5), (0, 5), (0, 5)]


def test_no_retries_no_delays():
    assert list(RetryPolicy(retries=0).delays()) == []
    assert list(RetryPolicy(retries=3, base=0).delays()) == [0, 0, 0]


def test_request_steps_sleep_between_attempts_without_sleeping():
    """The sans-IO path yields Sleep steps (so no test ever needs to sleep)."""
    call = Call("GET", "/statistics", "/statistics", safe=True)
    steps = request(call, RetryPolicy(retries=2, base=4.0, cap=6.0), BASE)
    req = httpx.Request("GET", BASE + "/statistics")
    step = next(steps)
    assert step == Send(call)
    sleeps = []
    for _ in range(2):
        step = steps.send(httpx.Response(503, request=req))
        assert isinstance(step, Sleep)
        sleeps.append(step.seconds)
        assert next(steps) == Send(call)
    assert 0 <= sleeps[0] <= 4.0 and 0 <= sleeps[1] <= 6.0
    with pytest.raises(OrthancHTTPError) as info:
        steps.send(httpx.Response(503, request=req))
    assert info.value.status_code == 503 and info.value.transient


def test_get_503_twice_then_ok(router, orthanc):
    route = router.get("/statistics").mock(side_effect=[
        httpx.Response(503), httpx.Response(503), httpx.Response(200, json=OK_STATS)])
    assert orthanc.statistics() == OK_STATS
    assert route.call_count == 3


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_statuses_are_retried(router, orthanc, status):
    route = router.get("/statistics").mock(side_effect=[
        httpx.Response(status), httpx.Response(200, json=OK_STATS)])
    assert orthanc.statistics() == OK_STATS
    assert route.call_count == 2


def test_safe_post_tools_find_503_twice_then_ok(router, orthanc):
    pages = [httpx.Response(503), httpx.Response(503), httpx.Response(200, json=["a", "b"]),
             httpx.Response(200, json=[])]
    route = router.post("/tools/find").mock(side_effect=pages)
    assert orthanc.find("Study") == ["a", "b"]
    assert route.call_count == 4  # 3 for the first page, 1 for the empty page


def test_unsafe_post_store_503_raised_after_one_call(router, orthanc):
    route = router.post("/modalities/x/store").mock(return_value=httpx.Response(503))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.store("x", ["abc"])
    assert route.call_count == 1
    assert info.value.status_code == 503
    assert info.value.transient  # transient, yet never repeated: it starts work


@pytest.mark.parametrize("retries", [0, 1, 4])
def test_retries_stop_after_the_configured_number(router, make_client, retries):
    route = router.get("/statistics").mock(return_value=httpx.Response(503))
    client = make_client(retries=retries)
    with pytest.raises(OrthancHTTPError):
        client.statistics()
    assert route.call_count == retries + 1  # the first attempt plus `retries` retries


@pytest.mark.parametrize("status,cls", [(400, OrthancBadRequest), (404, OrthancNotFound),
                                        (409, OrthancHTTPError), (422, OrthancHTTPError)])
def test_4xx_never_retried(router, orthanc, status, cls):
    route = router.get("/statistics").mock(return_value=orthanc_error(status))
    with pytest.raises(cls):
        orthanc.statistics()
    assert route.call_count == 1


def test_500_not_retried(router, orthanc):
    route = router.get("/statistics").mock(return_value=orthanc_error(500, 1, "Internal error"))
    with pytest.raises(OrthancHTTPError):
        orthanc.statistics()
    assert route.call_count == 1


def test_idempotent_writes_are_retried(router, orthanc):
    delete = router.delete("/studies/s1").mock(side_effect=[
        httpx.Response(503), httpx.Response(200, json={})])
    put = router.put("/studies/s1/metadata/Tag").mock(side_effect=[
        httpx.ConnectError("refused"), httpx.Response(200)])
    assert orthanc.delete("Study", "s1") is True
    orthanc.set_metadata("Study", "s1", "Tag", "v")
    assert delete.call_count == 2 and put.call_count == 2
    assert put.calls.last.request.content == b"v"


# ------------------------------------------------------------------ one layer per failure
# The client repeats a safe request after a blip of Orthanc itself; the Prefect task
# (``tasks.policy.is_transient``) repeats the operation after a peer's or a job's transient
# failure. Each failure is retried by one of them, never both (16 requests before: 4 x 4).
# The same counts through Prefect's engine: tests/integration/test_retry_layers.py.


class _Failed:
    """What ``is_transient`` reads of a failed task run's state."""

    def __init__(self, error: BaseException) -> None:
        self.data = error


def _task_would_retry(error: BaseException) -> bool:
    from prefect_orthanc.tasks.policy import is_transient

    return is_transient(None, None, _Failed(error))  # type: ignore[arg-type]


def test_a_blip_on_a_safe_request_is_retried_by_the_client_only(router, orthanc):
    route = router.post("/tools/find").mock(return_value=httpx.Response(503))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.find("Study", {"PatientID": "*"})
    assert route.call_count == orthanc.settings.retries + 1
    assert info.value.transient and not info.value.retry_later
    assert not _task_would_retry(info.value)


def test_an_unreachable_pacs_is_retried_by_the_task_only(router, orthanc):
    route = router.post("/modalities/pacs/query").mock(return_value=orthanc_error(
        500, 9, "Error in the network protocol",
        'DicomAssociation - connecting to AET "PACS": TCP Initialization Error: '
        "Connection refused"))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.query("pacs", "Study", {"PatientID": "*"})
    assert route.call_count == 1
    assert _task_would_retry(info.value)


def test_an_unsafe_request_is_never_repeated_by_the_client(router, orthanc):
    """A C-STORE answered 503 (not executed): the task may run the operation again."""
    route = router.post("/modalities/x/store").mock(return_value=httpx.Response(503))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.store("x", ["abc"])
    assert route.call_count == 1 and _task_would_retry(info.value)


def test_an_unsafe_request_with_an_unknown_outcome_is_repeated_by_no_layer(router, orthanc):
    """Sent, no answer: it may have been executed, so neither the client nor the task
    repeats it."""
    route = router.post("/modalities/x/store").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(OrthancUnavailable) as info:
        orthanc.store("x", ["abc"])
    assert route.call_count == 1
    assert info.value.outcome_unknown and not _task_would_retry(info.value)


def test_a_refused_connection_on_a_safe_request_is_the_clients(router, orthanc):
    route = router.get("/statistics").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(OrthancUnavailable) as info:
        orthanc.statistics()
    assert route.call_count == orthanc.settings.retries + 1
    assert not _task_would_retry(info.value)


def test_an_aborted_association_is_retried_by_the_client_only(router, orthanc):
    """The PACS is up and refused for a moment (Orthanc 1.10.1's words for an SCP's "rejected
    transient", measured with tests/integration/quirky_scp.py): a quick repeat of the C-FIND."""
    route = router.post("/modalities/pacs/query").mock(return_value=orthanc_error(
        500, 9, "Error in the network protocol",
        'DicomAssociation - connecting to AET "PACS": Peer aborted Association (or never '
        "connected)"))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.query("pacs", "Study", {"PatientID": "*"})
    assert info.value.reason_code == "pacs_unreachable"
    assert route.call_count == orthanc.settings.retries + 1
    assert not _task_would_retry(info.value)
