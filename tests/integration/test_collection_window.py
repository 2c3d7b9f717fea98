"""The transfer window covers every PACS exchange of a collection run, planning included,
counted from the servers' own DICOM logs (Orthanc's verbose log at runtime, via
``PUT /tools/log-level``): the research Orthanc logs each DICOM association it opens (C-ECHO,
C-FIND, C-MOVE alike), and the Orthanc PACS each C-FIND and C-MOVE it receives. dcmqrscp logs
nothing per request unless started verbose, so for it the research Orthanc's record is the
count."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_orthanc.flows.cohort import TimeWindow
from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Orthanc

pytestmark = pytest.mark.usefixtures("prefect_server")

SCU_OPENED = 'Opening a DICOM SCU connection'  # research -> a modality, any DIMSE service
FIND_RECEIVED = "Incoming Find request"  # the Orthanc PACS, per C-FIND
MOVE_RECEIVED = "Incoming Move request"  # the Orthanc PACS, per C-MOVE


class DicomLog:
    """Lines one Orthanc server logs while the block runs, with its log level verbose."""

    def __init__(self, client: Orthanc, path: Path) -> None:
        self.client, self.path, self.text = client, Path(path), ""

    @contextlib.contextmanager
    def recording(self) -> Iterator[DicomLog]:
        self.client.request("PUT", "/tools/log-level", content=b"verbose", expect="none")
        start = self.path.stat().st_size
        try:
            yield self
        finally:
            self.client.request("PUT", "/tools/log-level", content=b"default", expect="none")
            with self.path.open("rb") as handle:
                handle.seek(start)
                self.text = handle.read().decode(errors="replace")

    def count(self, needle: str, aet: str | None = None) -> int:
        return sum(needle in line and (aet is None or f'AET "{aet}"' in line)
                   for line in self.text.splitlines())


def _closed_window(outside: str = "stop") -> TimeWindow:
    """A window that opens in two hours (whatever the time of day the suite runs)."""
    start = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    return TimeWindow(start=start.strftime("%H:%M"),
                      end=(start + dt.timedelta(hours=1)).strftime("%H:%M"), timezone="UTC",
                      outside=outside)


def _open_window() -> TimeWindow:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    return TimeWindow(start=start.strftime("%H:%M"),
                      end=(start + dt.timedelta(hours=3)).strftime("%H:%M"), timezone="UTC")


def _cohort_file(tmp_path: Path, studies) -> Path:
    path = tmp_path / "window.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid"])
        writer.writerows([s.study_uid] for s in studies)
    return path


@pytest.fixture
def logs(lab, research, pacs, pacs_peer):
    """(the research Orthanc's log, the Orthanc PACS's log or None for dcmqrscp, its AET)"""
    aet = lab.PACS_AET if pacs_peer.kind == "orthanc" else lab.DCMQR_AET
    peer_log = DicomLog(pacs, lab.pacs.log_path) if pacs_peer.kind == "orthanc" else None
    return DicomLog(research, lab.research.log_path), peer_log, aet


@contextlib.contextmanager
def _recording(research_log: DicomLog, peer_log: DicomLog | None) -> Iterator[None]:
    with research_log.recording(), (peer_log.recording() if peer_log
                                    else contextlib.nullcontext()):
        yield


def test_started_outside_the_window_nothing_reaches_the_pacs(research_env, research, pacs_peer,
                                                             cohort, logs, tmp_path):
    """``outside: stop`` outside the window: the run ends Cancelled before any exchange (no
    C-FIND, no C-ECHO, no C-MOVE), every row deferred in the report. The same run inside the
    window (a dry run: plans, moves nothing) shows the counters do count."""
    research_log, peer_log, aet = logs
    path = _cohort_file(tmp_path, cohort.studies[:4])
    with _recording(research_log, peer_log):
        state = collect_cohort(cohort_file=str(path), project="window",
                               source_modality=pacs_peer.modality,
                               time_window=_closed_window(), return_state=True)
    sent = research_log.count(SCU_OPENED, aet)
    received = (peer_log.count(FIND_RECEIVED), peer_log.count(MOVE_RECEIVED)) if peer_log else ()
    assert state.is_cancelled(), state
    assert sent == 0 and not any(received), (sent, received)
    assert "outside the transfer window" in state.message and "nothing sent" in state.message
    report = report_of(state)
    assert report.deferred == 4 and [r.status for r in report.rows] == ["deferred"] * 4
    with Path(report.report_path).open() as handle:
        written = list(csv.DictReader(handle))
    assert [r["result_status"] for r in written] == ["deferred"] * 4

    with _recording(research_log, peer_log):  # the control: inside the window, it counts
        dry = collect_cohort(cohort_file=str(path), project="window", dry_run=True,
                             source_modality=pacs_peer.modality,
                             time_window=_open_window(), return_state=True)
    assert dry.is_completed(), dry
    assert research_log.count(SCU_OPENED, aet) >= 4
    if peer_log:
        assert peer_log.count(FIND_RECEIVED) >= 4 and peer_log.count(MOVE_RECEIVED) == 0


def test_a_window_closing_during_planning_stops_at_the_next_cfind(
        research_env, research, pacs_peer, cohort, logs, tmp_path, monkeypatch):
    """The window is read at each exchange: closed after the second C-FIND (a clock that says
    "open" twice more after the run's first check), the run sends exactly two C-FINDs,
    moves nothing and ends Cancelled."""
    research_log, peer_log, aet = logs
    path = _cohort_file(tmp_path, cohort.studies[:4])
    answers = iter([True, True, True])  # admit(), then the first two C-FINDs
    monkeypatch.setattr(TimeWindow, "is_open", lambda self, now: next(answers, False))
    with _recording(research_log, peer_log):
        state = collect_cohort(cohort_file=str(path), project="window",
                               source_modality=pacs_peer.modality,
                               time_window=_closed_window(), return_state=True)
    assert state.is_cancelled(), state
    assert research_log.count(SCU_OPENED, aet) == 2, research_log.text[-3000:]
    if peer_log:
        assert peer_log.count(FIND_RECEIVED) == 2 and peer_log.count(MOVE_RECEIVED) == 0
    assert [r.status for r in report_of(state).rows] == ["deferred"] * 4


def test_a_window_closing_during_retrieval_defers_the_rest_and_moves_nothing_more(
        research_env, research, pacs, lab, loaded_pacs, cohort, tmp_path, monkeypatch):
    """Closed once planning is done and the first study submitted: that study's first
    exchange is refused inside its task, the other studies are never submitted; all four
    are deferred (a re-run collects them), the Orthanc PACS saw the four planning C-FINDs
    and no C-MOVE, and the run ends Cancelled."""
    studies = cohort.studies[:4]
    for study in studies:
        research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
    path = _cohort_file(tmp_path, studies)
    answers = iter([True] * 6)  # admit, 4 planning C-FINDs, the first submission
    monkeypatch.setattr(TimeWindow, "is_open", lambda self, now: next(answers, False))
    research_log, pacs_log = DicomLog(research, lab.research.log_path), DicomLog(
        pacs, lab.pacs.log_path)
    with _recording(research_log, pacs_log):
        state = collect_cohort(cohort_file=str(path), project="window",
                               source_modality="pacs", time_window=_closed_window(),
                               return_state=True)
    assert state.is_cancelled() and "time window closed" in state.message, state
    assert pacs_log.count(FIND_RECEIVED) == 4 and pacs_log.count(MOVE_RECEIVED) == 0
    assert research_log.count(SCU_OPENED, lab.PACS_AET) == 4
    report = report_of(state)
    assert report.deferred == 4 and report.studies_moved == 0
    assert [r.status for r in report.rows] == ["deferred"] * 4
    assert all(not research.find("Study", {"StudyInstanceUID": s.study_uid}) for s in studies)
