"""New-study events end to end: a study C-STOREd into a research Orthanc starts exactly one
``route-new-study`` run through the served deployments, from the Lua emitter and from the
changes watcher, and a duplicate event starts none.

A lab of its own (pacs + research, the research server running the shipped Lua emitter
pointed at the test Prefect server), ``python -m prefect_orthanc.deployments setup`` and
``python -m prefect_orthanc.deployments serve`` in a subprocess, as a user would run them.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_orthanc.deployments.lab.processes import stop_group
from prefect_orthanc.deployments.lab.runs import (
    ROUTE_DEPLOYMENT,
    new_study_runs,
    wait_until_final,
    wait_until_served,
)
from prefect_orthanc.flows.events import post_events, study_event, study_event_id
from prefect_orthanc.flows.routing import LABELS_METADATA, ROUTED_METADATA
from prefect_orthanc.orthanc_client import Level, Orthanc

REPO = Path(__file__).resolve().parents[2]
LUA = REPO / "deployments" / "orthanc" / "study_events.lua"
STABLE_AGE = 2
ROUTE = ROUTE_DEPLOYMENT
WATCH = "watch-orthanc-changes/research-changes"
WATCH_CURSOR = "orthanc_changes_events_research"

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def events_lab(api_url: str, tmp_path_factory: pytest.TempPathFactory):
    from prefect_orthanc.deployments.lab.servers import OrthancLab

    lab = OrthancLab.start(tmp_path_factory.mktemp("events-lab"), stable_age=STABLE_AGE,
                           research_lua_scripts=[LUA],
                           research_overrides={"PrefectEvents": {"Url": api_url + "/events",
                                                                 "Server": "research"}})
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def events_research(events_lab) -> Iterator[Orthanc]:
    with Orthanc(url=events_lab.research.url, username=events_lab.research.username,
                 password=events_lab.research.password) as client:
        yield client


@pytest.fixture(scope="module")
def served(events_lab, api_url: str, tmp_path_factory: pytest.TempPathFactory):
    """``setup`` then ``serve`` (the two deployments this module needs) in a subprocess."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "ORTHANC_URL": events_lab.research.url,
           "ORTHANC_USERNAME": events_lab.research.username,
           "ORTHANC_PASSWORD": events_lab.research.password, "PYTHONPATH": str(REPO)}
    setup = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert "block orthanc-credentials/research: saved" in setup.stdout
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect_orthanc.deployments", "serve",
             "--only", "on-stable-study", "--only", "research-changes"], cwd=REPO, env=env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_until_served([ROUTE, WATCH], process, log, timeout=90)
        except RuntimeError as error:
            pytest.fail(str(error))
        yield log
    finally:
        stop_group(process)


_seeds = iter(range(9100, 9200))


def _store_new_study(lab, tmp_path: Path) -> tuple[str, float]:
    """A fresh synthetic study uploaded to the pacs, then C-STOREd into research. Returns its
    Orthanc ID and the monotonic time the C-STORE finished."""
    from prefect_orthanc.deployments.lab.synthetic import make_cohort, zip_bytes

    cohort = make_cohort(tmp_path / f"study-{next(_seeds)}", patients=1, studies_per_patient=1,
                         series_per_study=1, instances_per_series=3, seed=next(_seeds))
    with Orthanc(url=lab.pacs.url) as pacs:
        stored = pacs.upload(zip_bytes(cohort.files))
        study_id = {item.parent_study for item in stored if item.parent_study}.pop()
        pacs.store("research", [study_id], synchronous=True)
    return study_id, time.monotonic()


def _wait_for_run(study_id: str, deadline: float) -> dict:
    while True:
        runs = new_study_runs(study_id)
        if runs:
            return runs[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no route-new-study run for study {study_id[:8]} in time")
        time.sleep(0.2)


def _wait_final(run_id: str, timeout: float = 60) -> dict:
    try:
        return wait_until_final(run_id, timeout)
    except TimeoutError:
        pytest.fail("the run did not finish in time")


def _barrier() -> None:
    """Post an event for a study no server has and wait for its run: events are evaluated in
    order, so anything posted before it has been evaluated by then."""
    fake = "-".join(os.urandom(4).hex() for _ in range(5))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    post_events([study_event("research", fake, stamp, emitter="barrier")])
    run = _wait_for_run(fake, time.monotonic() + 20)
    assert _wait_final(run["id"])["state"]["type"] == "COMPLETED"  # "no longer in Orthanc"


def test_lua_emitter_starts_exactly_one_run(served, events_lab, events_research, tmp_path):
    study_id, stored_at = _store_new_study(events_lab, tmp_path)
    run = _wait_for_run(study_id, stored_at + STABLE_AGE + 10)
    created = time.monotonic()
    final = _wait_final(run["id"])
    assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
    assert "1/1 rules matched, 1 done" in final["state"]["message"]
    # the rule ran: labelled (metadata on 1.10.1) and marked routed at this LastUpdate
    last_update = events_research.resource(Level.STUDY, study_id).last_update
    assert events_research.metadata(Level.STUDY, study_id, LABELS_METADATA) == "new"
    assert events_research.metadata(Level.STUDY, study_id, ROUTED_METADATA) == last_update
    print(f"lua: run created {created - stored_at:.1f} s after the C-STORE")

    # A duplicate (same deterministic ID, computed here in Python, so it also proves the Lua
    # script and flows/events.py agree) starts no second run.
    duplicate = study_event("research", study_id, last_update, emitter="duplicate")
    assert duplicate["id"] == str(study_event_id(study_id, last_update))
    post_events([duplicate, duplicate])
    _barrier()
    assert len(new_study_runs(study_id)) == 1


def _events_of(study_id: str, deadline: float) -> list[str]:
    """The names of the events Prefect received for one study of research (waits for one)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    while True:
        answer = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json={
            "filter": {"resource": {"id": [f"orthanc.research.study.{study_id}"]},
                       "occurred": {"since": (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
                                              ).isoformat()}}, "limit": 50}, timeout=10)
        answer.raise_for_status()
        names = [event["event"] for event in answer.json()["events"]]
        if names:
            return names
        if time.monotonic() > deadline:
            pytest.fail(f"no event for study {study_id[:8]} in time")
        time.sleep(0.3)


def test_collected_studies_start_no_run(served, events_lab, events_research, monkeypatch,
                                        tmp_path):
    """Studies the collection flow C-MOVEs in become stable like any study, but the Lua
    emitter reports them as ``orthanc.study.stable.retrieved`` (they carry the retrieval's
    mark): the new-study trigger starts no run for them (before: one run per study, each
    skipping it). ``include_retrieved`` (a partial parameter override of the deployment)
    still routes one on request."""
    import csv

    from prefect.deployments import run_deployment

    from prefect_orthanc.deployments.lab.synthetic import make_cohort, zip_bytes
    from prefect_orthanc.flows.collection import collect_cohort
    from prefect_orthanc.flows.events import RETRIEVED_EVENT
    from prefect_orthanc.tasks.labels import labels_of

    cohort = make_cohort(tmp_path / "collected", patients=1, studies_per_patient=2,
                         series_per_study=1, instances_per_series=2, seed=next(_seeds))
    with Orthanc(url=events_lab.pacs.url) as pacs:
        pacs.upload(zip_bytes(cohort.files))
    path = tmp_path / "cohort.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([["study_instance_uid"],
                                      *[[s.study_uid] for s in cohort.studies]])
    for key in ("url", "username", "password"):
        monkeypatch.setenv(f"ORTHANC_{key.upper()}", getattr(events_lab.research, key))
    state = collect_cohort(cohort_file=str(path), project="events", return_state=True)
    assert state.is_completed(), state.message
    collected_at = time.monotonic()
    ids = [i for s in cohort.studies
           for i in events_research.find("Study", {"StudyInstanceUID": s.study_uid})]
    assert len(ids) == 2
    for study_id in ids:
        assert _events_of(study_id, collected_at + STABLE_AGE + 20) == [RETRIEVED_EVENT]
    _barrier()  # every event posted before has been evaluated by the trigger
    for study_id in ids:
        assert new_study_runs(study_id) == []
        assert labels_of(events_research, Level.STUDY, study_id) == {"events"}  # the project
        assert events_research.metadata(Level.STUDY, study_id, ROUTED_METADATA) is None

    run = run_deployment(ROUTE, parameters={"study_id": ids[0], "include_retrieved": True},
                         timeout=0)
    final = _wait_final(str(run.id))
    assert "1/1 rules matched, 1 done" in final["state"]["message"], final["state"]["message"]
    assert labels_of(events_research, Level.STUDY, ids[0]) == {"events", "new"}


def test_changes_watcher_starts_exactly_one_run(served, events_lab, events_research, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.variables import Variable

    # this time the research server has no emitter: only the watcher can report the study
    events_lab.research.config["PrefectEvents"]["Url"] = ""
    events_lab.research.restart()
    Variable.unset(WATCH_CURSOR)
    watcher = run_deployment(WATCH, parameters={"run_for": 15, "poll_interval": 0.5},
                             timeout=0)
    deadline = time.monotonic() + 60
    while Variable.get(WATCH_CURSOR, default=None) is None:
        assert time.monotonic() < deadline, "the watcher never started"
        time.sleep(0.3)
    start = int(Variable.get(WATCH_CURSOR))

    study_id, stored_at = _store_new_study(events_lab, tmp_path)
    run = _wait_for_run(study_id, stored_at + STABLE_AGE + 10)
    print(f"watcher: run created {time.monotonic() - stored_at:.1f} s after the C-STORE")
    final = _wait_final(run["id"])
    assert final["state"]["type"] == "COMPLETED", final["state"]["message"]
    report = _wait_final(str(watcher.id))
    assert report["state"]["type"] == "COMPLETED", report["state"]["message"]
    assert report["state"]["message"].startswith("1 events")
    assert int(Variable.get(WATCH_CURSOR)) > start

    # A watcher that crashed before saving its cursor re-sends the batch when it runs again:
    # replay it from the old cursor. Same event IDs, so no second run.
    Variable.set(WATCH_CURSOR, start, overwrite=True)
    replay = run_deployment(WATCH, parameters={"run_for": 2, "poll_interval": 0.5}, timeout=0)
    report = _wait_final(str(replay.id))
    assert report["state"]["message"].startswith("1 events"), report["state"]["message"]
    _barrier()
    assert len(new_study_runs(study_id)) == 1



def test_watcher_on_an_unreachable_orthanc_fails_clearly(monkeypatch):
    from prefect_orthanc.deployments.lab.servers import free_ports
    from prefect_orthanc.flows.watcher import watch_changes

    monkeypatch.setenv("ORTHANC_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("ORTHANC_USERNAME", "research")
    monkeypatch.setenv("ORTHANC_PASSWORD", "watcher-test-password")
    monkeypatch.setenv("ORTHANC_RETRIES", "0")
    state = watch_changes(server="unreachable", run_for=1, return_state=True)
    assert state.is_failed()
    message = state.message or ""
    with pytest.raises(Exception) as caught:
        state.result()
    text = f"{message} {caught.value}"
    assert "OrthancUnavailable" in text or "unavailable" in text.lower()
    assert "watcher-test-password" not in text
