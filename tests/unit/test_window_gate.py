"""The transfer window as one gate: every request that starts a DICOM exchange is refused
outside the window (nothing reaches the server), everything else goes through; the gate
follows the context into threads started from it; a modality name is checked against
Orthanc's own list before anything else."""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import re
import sys
import threading

import pytest

import prefect_orthanc.flows  # noqa: F401 - installs the log filter
from prefect_orthanc.flows.cohort import TimeWindow
from prefect_orthanc.flows.states import PurposefulFailureFilter
from prefect_orthanc.flows.window import OutsideWindow, admit, is_open, window_gate
from prefect_orthanc.orthanc_client import AsyncOrthanc, Level, dicom_gate
from prefect_orthanc.tasks.network import UnknownModality, require_modality
from tests.unit._mocks import BASE, SYSTEM_1_10


def _window(open_now: bool, outside: str = "stop", max_wait_hours: float = 16) -> TimeWindow:
    """A one-hour window that contains now, or one that opened an hour ago and closed."""
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=30) if open_now else now + dt.timedelta(hours=2)
    end = start + dt.timedelta(hours=1)
    return TimeWindow(start=start.strftime("%H:%M"), end=end.strftime("%H:%M"),
                      timezone="UTC", outside=outside, max_wait_hours=max_wait_hours)


@pytest.fixture
def dicom_routes(router):
    """Every route of the client that makes Orthanc talk DICOM, answered as Orthanc would."""
    router.post("/modalities/pacs/echo").respond(200, json={})
    router.post("/modalities/pacs/query").respond(200, json={"ID": "q1", "Path": "/queries/q1"})
    router.get("/queries/q1/answers").respond(200, json=[])
    router.post("/queries/q1/retrieve").respond(200, json={"ID": "j1", "Path": "/jobs/j1"})
    router.post("/queries/q1/answers/0/retrieve").respond(200, json={"ID": "j2"})
    router.post("/modalities/pacs/move").respond(200, json={})
    router.post("/modalities/pacs/store").respond(200, json={"ID": "j3"})
    router.delete("/queries/q1").respond(200, json={})
    router.get("/modalities").respond(200, json=["pacs", "dcmqr"])
    router.get("/system").respond(200, json=SYSTEM_1_10)
    return router


def _every_exchange(orthanc) -> None:
    orthanc.echo("pacs")
    orthanc.query("pacs", Level.STUDY, {"PatientID": "X"})
    orthanc.retrieve("q1", "RESEARCH")
    orthanc.retrieve("q1", "RESEARCH", answer=0)
    orthanc.move("pacs", Level.STUDY, [{"StudyInstanceUID": "1.2"}], "RESEARCH")
    orthanc.store("pacs", ["abc"])


def test_outside_the_window_no_dicom_exchange_reaches_orthanc(orthanc, dicom_routes):
    closed = _window(open_now=False)
    with window_gate(closed):
        for exchange in (lambda: orthanc.echo("pacs"),
                         lambda: orthanc.query("pacs", Level.STUDY, {"PatientID": "X"}),
                         lambda: orthanc.retrieve("q1", "RESEARCH"),
                         lambda: orthanc.retrieve("q1", "RESEARCH", answer=0),
                         lambda: orthanc.move("pacs", Level.STUDY, [{}], "RESEARCH"),
                         lambda: orthanc.store("pacs", ["abc"]),
                         lambda: orthanc.retrieve_study("pacs", "1.2.3"),
                         lambda: orthanc.expected_instances("pacs", "1.2.3")):
            with pytest.raises(OutsideWindow, match="outside the transfer window"):
                exchange()
        # what is not a DICOM exchange is not gated: the modality list, answers, forgetting
        assert orthanc.modalities() == ["pacs", "dcmqr"]
        orthanc.delete_query("q1")
    assert all(call.request.method != "POST" for call in dicom_routes.calls)


def test_inside_the_window_and_without_one_every_exchange_goes_through(orthanc, dicom_routes):
    with window_gate(_window(open_now=True)):
        _every_exchange(orthanc)
    with window_gate(None):
        _every_exchange(orthanc)
    _every_exchange(orthanc)
    assert sum(call.request.method == "POST" for call in dicom_routes.calls) == 18


def test_the_gate_follows_the_context_into_threads_and_coroutines(transport, dicom_routes):
    """Prefect's thread-pool task runner runs each task in a copy of the submitting context:
    the gate applies to the tasks a flow submits, and to the async client too."""
    import asyncio

    from prefect_orthanc.orthanc_client import Orthanc

    refused: list[BaseException] = []

    def in_a_task() -> None:
        with Orthanc(url=BASE, transport=transport) as orthanc:
            try:
                orthanc.echo("pacs")
            except OutsideWindow as error:
                refused.append(error)

    async def async_echo() -> None:
        async with AsyncOrthanc(url=BASE, transport=transport) as orthanc:
            await orthanc.echo("pacs")

    with window_gate(_window(open_now=False)):
        context = contextvars.copy_context()
        worker = threading.Thread(target=context.run, args=(in_a_task,))
        worker.start()
        worker.join(10)
        with pytest.raises(OutsideWindow):
            asyncio.run(async_echo())
    assert len(refused) == 1 and not dicom_routes.calls


def test_a_gate_that_opens_lets_the_next_exchange_through(orthanc, dicom_routes):
    """The gate is evaluated at each exchange, not once: a window closing mid-run stops the
    next exchange (here a gate driven by a flag stands for the clock)."""
    state = {"open": True}

    def check(route: str) -> None:
        if not state["open"]:
            raise OutsideWindow(f"closed: {route}")

    with dicom_gate(check):
        orthanc.echo("pacs")
        state["open"] = False
        with pytest.raises(OutsideWindow, match=re.escape("/modalities/{name}/query")):
            orthanc.query("pacs", Level.STUDY, {})
        state["open"] = True
        orthanc.echo("pacs")
    assert [c.request.url.path for c in dicom_routes.calls] == ["/modalities/pacs/echo"] * 2


def test_admit_stops_or_refuses_a_wait_beyond_the_bound():
    assert admit(None) is None and admit(_window(open_now=True)) is None
    with pytest.raises(OutsideWindow, match="outside: stop"):
        admit(_window(open_now=False))
    with pytest.raises(OutsideWindow, match="max_wait_hours=1"):
        admit(_window(open_now=False, outside="wait", max_wait_hours=1))  # opens in ~2 h
    assert is_open(None) and not is_open(_window(open_now=False))


def test_unknown_modality_names_the_known_ones_and_how_to_register(orthanc, router):
    router.get("/modalities").respond(200, json=["pacs", "dcmqr"])
    require_modality(orthanc, "pacs")
    with pytest.raises(UnknownModality) as caught:
        require_modality(orthanc, "pcas")
    message = str(caught.value)
    assert "no DICOM modality named 'pcas'" in message and "dcmqr, pacs" in message
    assert "DicomModalities" in message and "PUT /modalities/pcas" in message
    assert "prefect-orthanc-limits pcas=2" in message  # the limit comes after registering
    with pytest.raises(UnknownModality):
        require_modality(orthanc, "PACS")  # Orthanc's names are case-sensitive
    assert all(c.request.url.path == "/modalities" for c in router.calls)
    import pickle

    again = pickle.loads(pickle.dumps(caught.value))
    assert str(again) == message


def test_a_task_refused_by_the_window_logs_one_line_without_traceback():
    try:
        raise OutsideWindow("outside the transfer window 19:00-07:00 UTC")
    except OutsideWindow:
        info = sys.exc_info()
    (check,) = [f for f in logging.getLogger("prefect.task_runs").filters
                if isinstance(f, PurposefulFailureFilter)]
    record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1,
                               "Task run failed with exception: %r", (info[1],), info)
    assert check.filter(record) and record.exc_info is None
    assert "Traceback" not in logging.Formatter().format(record)
    try:
        raise ValueError("a real bug")
    except ValueError:
        bug = sys.exc_info()
    record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed",
                               None, bug)
    assert check.filter(record) and "Traceback" in logging.Formatter().format(record)


def test_admit_waits_for_a_window_that_opens_within_the_bound(monkeypatch):
    """``outside="wait"``: one sleep until the opening, then admitted (the sleep is recorded,
    not slept)."""
    import prefect_orthanc.flows.window as window_module

    slept: list[float] = []
    monkeypatch.setattr(window_module.time, "sleep", slept.append)
    admit(_window(open_now=False, outside="wait", max_wait_hours=3))
    (delay,) = slept
    assert 3600 < delay <= 2 * 3600 + 60  # opens in about two hours
