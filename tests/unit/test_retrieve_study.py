"""retrieve_study against a fake PACS behind a respx-mocked Orthanc: counting where the PACS
sends no counts, asynchronous arrivals, moves that moved nothing, permanent refusals."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from prefect_orthanc.orthanc_client import CountSource, RetrieveOutcome, Settle
from tests.unit._mocks import SYSTEM_1_10

STUDY = "1.2.3"
SERIES = {"1.2.3.1": ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.3"],
          "1.2.3.2": ["1.2.3.2.1", "1.2.3.2.2", "1.2.3.2.3"]}
FAST = Settle(quiet=0.05, interval=0.01, max_wait=5)
REJECTED = "DicomAssociation - connecting to AET \"PACS\": DUL Association Rejected"
UNKNOWN_DEST = "C-MOVE SCU to AET \"RESEARCH\" has failed with DIMSE status 0xA801"


class FakePacs:
    """The PACS (what C-FIND answers, how C-MOVE behaves) and the local Orthanc it feeds."""

    def __init__(self, *, study_count: bool = False, series_count: bool = False,
                 answers_per_instance: bool = False, job_failures: list[str] | None = None,
                 deliver: str = "all", lose: int = 0, arrive_per_poll: int = 0) -> None:
        self.study_count, self.series_count = study_count, series_count
        self.answers_per_instance = answers_per_instance
        self.job_failures = list(job_failures or [])
        self.deliver, self.lose, self.arrive_per_poll = deliver, lose, arrive_per_poll
        self.local: dict[str, set[str]] = {}
        self.queries: dict[str, tuple[str, dict[str, str]]] = {}
        self.moves: list[tuple[str, dict[str, str]]] = []  # (level, identifiers)
        self.pending: list[tuple[str, str]] = []  # asynchronous arrivals still to come
        self.jobs: dict[str, dict[str, Any]] = {}

    # -- what the PACS holds
    def _answers(self, level: str, query: dict[str, str]) -> list[dict[str, str]]:
        if query.get("StudyInstanceUID") not in ("", None, STUDY):
            return []
        if level == "Study":
            answer = {"StudyInstanceUID": STUDY}
            if self.study_count:
                answer["NumberOfStudyRelatedInstances"] = "6"
            return [answer] * (6 if self.answers_per_instance else 1)
        if level == "Series":
            out = []
            for uid, sops in SERIES.items():
                answer = {"StudyInstanceUID": STUDY, "SeriesInstanceUID": uid}
                if self.series_count:
                    answer["NumberOfSeriesRelatedInstances"] = str(len(sops))
                out += [answer] * (len(sops) if self.answers_per_instance else 1)
            return out
        sops = SERIES[query["SeriesInstanceUID"]]
        return [{"StudyInstanceUID": STUDY, "SeriesInstanceUID": query["SeriesInstanceUID"],
                 "SOPInstanceUID": sop} for sop in sops]

    def _send(self, instances: list[tuple[str, str]]) -> None:
        if self.arrive_per_poll:
            self.pending += instances
        else:
            for series, sop in instances:
                self.local.setdefault(series, set()).add(sop)

    def _move(self, level: str, identifiers: dict[str, str]) -> None:
        self.moves.append((level, identifiers))
        wanted = [(s, sop) for s, sops in SERIES.items() for sop in sops
                  if identifiers.get("SeriesInstanceUID", s) == s
                  and identifiers.get("SOPInstanceUID", sop) == sop]
        if self.lose:  # a partial transfer reported as success
            wanted, self.lose = wanted[self.lose:], 0
        self._send(wanted)

    # -- Orthanc routes
    def query(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        qid = f"q{len(self.queries)}"
        self.queries[qid] = (body["Level"], body["Query"])
        return httpx.Response(200, json={"ID": qid, "Path": f"/queries/{qid}"})

    def answers(self, request: httpx.Request, qid: str) -> httpx.Response:
        level, query = self.queries[qid]
        return httpx.Response(200, json=self._answers(level, query))

    def retrieve(self, request: httpx.Request, qid: str, index: str) -> httpx.Response:
        job = f"job{len(self.jobs)}"
        failure = self.job_failures.pop(0) if self.job_failures else None
        if failure is None:
            level, query = self.queries[qid]
            answer = self._answers(level, query)[int(index)]
            self._move(level, answer)
        self.jobs[job] = {"ID": job, "Type": "DicomMoveScu", "State": "Failure" if failure
                          else "Success", "Progress": 100, "ErrorCode": 9 if failure else 0,
                          "ErrorDescription": "Error in the network protocol" if failure
                          else "Success", "ErrorDetails": failure or "", "Content": {},
                          "CreationTime": "", "EffectiveRuntime": 0, "Priority": 0}
        return httpx.Response(200, json={"ID": job, "Path": f"/jobs/{job}"})

    def orphan(self, *, study: str = STUDY, aet: str = "PACS", polls: int = 3,
               state: str = "Running", failure: bool = False) -> str:
        """A C-MOVE job already under way in Orthanc (its run died): it ends after ``polls``
        polls, having brought the study (or, with ``failure``, half of it)."""
        job = f"orphan{len(self.jobs)}"
        self.jobs[job] = {"ID": job, "Type": "DicomMoveScu", "State": state, "Progress": 40,
                          "ErrorCode": 0, "ErrorDescription": "Success", "ErrorDetails": "",
                          "Content": {"LocalAet": "RESEARCH", "RemoteAet": aet, "Query": [
                              {"0008,0052": "STUDY", "0020,000D": study}]},
                          "CreationTime": "", "EffectiveRuntime": 0, "Priority": 0,
                          "_polls": polls, "_failure": failure}
        return job

    def job(self, request: httpx.Request, job: str) -> httpx.Response:
        info = self.jobs[job]
        if info.get("_polls"):
            info["_polls"] -= 1
            if not info["_polls"]:  # it ends now, its C-STOREs done
                every = [(s, sop) for s, sops in SERIES.items() for sop in sops]
                self._send(every[:3] if info["_failure"] else every)
                info.update(State="Failure" if info["_failure"] else "Success", Progress=100)
        return httpx.Response(200, json={k: v for k, v in info.items()
                                         if not k.startswith("_")})

    def move(self, request: httpx.Request) -> httpx.Response:
        for resource in json.loads(request.content)["Resources"]:
            self._move("Instance", resource)
        return httpx.Response(200, json={})

    def find(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("Since"):
            return httpx.Response(200, json=[])
        return httpx.Response(200, json=["study-a"] if self.local or self.pending else [])

    def study_series(self, request: httpx.Request) -> httpx.Response:
        for _ in range(self.arrive_per_poll):  # asynchronous C-STOREs land between polls
            if self.pending:
                series, sop = self.pending.pop(0)
                self.local.setdefault(series, set()).add(sop)
        return httpx.Response(200, json=[
            {"ID": f"series-{uid}", "Type": "Series", "ParentStudy": "study-a",
             "MainDicomTags": {"SeriesInstanceUID": uid},
             "Instances": [f"i-{sop}" for sop in sorted(sops)]}
            for uid, sops in self.local.items()])

    def series_instances(self, request: httpx.Request, series: str) -> httpx.Response:
        uid = series.removeprefix("series-")
        return httpx.Response(200, json=[
            {"ID": f"i-{sop}", "Type": "Instance", "ParentSeries": series,
             "MainDicomTags": {"SOPInstanceUID": sop}} for sop in sorted(self.local[uid])])

    def install(self, router) -> None:
        router.get("/system").mock(return_value=httpx.Response(200, json={
            **SYSTEM_1_10, "DicomAet": "RESEARCH"}))
        router.post("/modalities/pacs/query").mock(side_effect=self.query)
        router.get(path__regex=r"^/queries/(?P<qid>[^/]+)/answers$").mock(
            side_effect=self.answers)
        router.delete(path__regex=r"^/queries/[^/]+$").mock(return_value=httpx.Response(200))
        router.post(url__regex=r"/queries/(?P<qid>[^/]+)/answers/(?P<index>\d+)/retrieve").mock(
            side_effect=self.retrieve)
        router.get(path__regex=r"^/jobs/(?P<job>[^/]+)$").mock(side_effect=self.job)
        router.get("/jobs").mock(side_effect=lambda request: httpx.Response(
            200, json=list(self.jobs.values())))
        router.get("/modalities/pacs/configuration").mock(return_value=httpx.Response(
            200, json={"AET": "PACS", "Host": "127.0.0.1", "Port": 104}))
        router.post("/modalities/pacs/move").mock(side_effect=self.move)
        router.post("/tools/find").mock(side_effect=self.find)
        router.get("/studies/study-a/series").mock(side_effect=self.study_series)
        router.get(url__regex=r"/series/(?P<series>[^/]+)/instances").mock(
            side_effect=self.series_instances)


@pytest.fixture
def pacs(router):
    def make(**options: Any) -> FakePacs:
        fake = FakePacs(**options)
        fake.install(router)
        return fake
    return make


@pytest.mark.parametrize("options,source", [
    ({"study_count": True}, CountSource.STUDY),
    ({"series_count": True}, CountSource.SERIES),
    ({}, CountSource.INSTANCES),  # dcmqrscp: no counts at all
    ({"answers_per_instance": True}, CountSource.INSTANCES),
])
def test_complete_wherever_the_count_comes_from(orthanc, pacs, options, source):
    fake = pacs(**options)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert result.outcome is RetrieveOutcome.COMPLETE
    assert (result.expected_instances, result.received_instances) == (6, 6)
    assert result.count_source is source
    assert len(fake.moves) == 1  # one C-MOVE of the study, even with one answer per instance
    again = orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert again.outcome is RetrieveOutcome.ALREADY_PRESENT and not again.moved
    assert len(fake.moves) == 1  # a re-run never re-moves a complete study


def test_half_a_study_without_counts_is_not_complete(orthanc, pacs):
    """No counts from the PACS used to mean 'unverified' for 3 of 6 as for 6 of 6."""
    fake = pacs(lose=3)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, refetch_rounds=0)
    assert result.outcome is RetrieveOutcome.PARTIAL
    assert (result.expected_instances, result.received_instances) == (6, 3)
    assert result.reason == "incomplete" and len(fake.moves) == 1


def test_missing_instances_are_refetched_one_by_one(orthanc, pacs):
    fake = pacs(lose=2)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.refetched_instances == 2
    assert [level for level, _ in fake.moves] == ["Study", "Instance", "Instance"]


def test_missing_series_are_refetched_when_only_series_counts_exist(orthanc, pacs):
    fake = pacs(series_count=True, lose=2)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.refetched_series == 1
    assert [level for level, _ in fake.moves] == ["Study", "Series"]


def test_asynchronous_move_is_waited_for_not_refetched(orthanc, pacs):
    """The C-MOVE job ends before the C-STOREs do: arrivals are waited for until they settle."""
    fake = pacs(study_count=True, arrive_per_poll=1)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert result.outcome is RetrieveOutcome.COMPLETE
    assert result.refetched_series == result.refetched_instances == 0
    assert len(fake.moves) == 1


@pytest.mark.parametrize("details", [REJECTED, "C-MOVE SCU to AET \"PACS\" has failed with "
                                     "DIMSE status 0xA702", None])
def test_a_move_that_moved_nothing_is_retried(orthanc, pacs, details):
    """Rejected association, PACS out of resources, or Success with nothing sent: nothing
    moved, so trying again is safe."""
    fake = pacs(study_count=True, job_failures=[details or "", details or ""])
    if details is None:  # "success" twice, nothing sent
        fake.job_failures = []
        sends = iter([[], []])
        original = fake._send
        fake._send = lambda items: original(next(sends, items))
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, backoff=0.01)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.move_attempts == 3


def test_retries_are_bounded(orthanc, pacs):
    pacs(study_count=True, job_failures=[REJECTED] * 5)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, backoff=0.01, move_attempts=3)
    assert result.outcome is RetrieveOutcome.FAILED and result.move_attempts == 3
    assert result.reason == "association_rejected"
    assert "AET" in result.failure and not result.moved


def test_unknown_destination_is_permanent_and_says_what_to_fix(orthanc, pacs):
    fake = pacs(study_count=True, job_failures=[UNKNOWN_DEST] * 3)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, backoff=0.01)
    assert result.outcome is RetrieveOutcome.FAILED and result.move_attempts == 1
    assert result.reason == "move_destination_unknown"
    assert "register research's AET" in result.failure
    assert not result.moved and len(fake.jobs) == 1


def test_a_partial_move_is_not_repeated_blindly(orthanc, pacs):
    """Something arrived: the study is not moved again, only what is missing is asked for."""
    fake = pacs(study_count=True, series_count=True, lose=4)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.move_attempts == 1
    assert [level for level, _ in fake.moves].count("Study") == 1


# ------------------------------------------------------------------ moves already under way

def test_a_move_under_way_is_waited_for_not_repeated(orthanc, pacs):
    """A run died while its C-MOVE job went on: the next retrieval of the study waits for
    that job (its association is still open) instead of moving the study beside it."""
    fake = pacs(study_count=True)
    orphan = fake.orphan(polls=3)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, adopt_moves=True)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.received_instances == 6
    assert fake.moves == [] and result.job_ids == (orphan,) and result.moved
    assert fake.jobs[orphan]["State"] == "Success"


def test_only_what_a_failed_move_under_way_left_is_moved(orthanc, pacs):
    fake = pacs()  # no counts (dcmqrscp): the missing SOP instances are asked for by UID
    orphan = fake.orphan(polls=2, failure=True)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, adopt_moves=True)
    assert result.outcome is RetrieveOutcome.COMPLETE and result.job_ids[0] == orphan
    assert [level for level, _ in fake.moves] == ["Instance"] * 3  # the 3 still missing


@pytest.mark.parametrize("other", [dict(study="9.9.9"), dict(aet="OTHERPACS"),
                                   dict(state="Success", polls=0)])
def test_other_jobs_are_not_adopted(orthanc, pacs, other):
    """Another study's move, a move from another modality, a move that has ended."""
    fake = pacs(study_count=True)
    fake.orphan(**other)
    result = orthanc.retrieve_study("pacs", STUDY, settle=FAST, adopt_moves=True)
    assert result.outcome is RetrieveOutcome.COMPLETE and len(fake.moves) == 1
    assert len(result.job_ids) == 1 and not result.job_ids[0].startswith("orphan")


def test_moves_under_way_are_looked_for_only_when_asked(orthanc, pacs, router):
    fake = pacs(study_count=True)
    orthanc.retrieve_study("pacs", STUDY, settle=FAST)
    assert not any(call.request.url.path == "/jobs" for call in router.calls)
    assert len(fake.moves) == 1
