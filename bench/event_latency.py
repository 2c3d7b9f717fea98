"""Benchmark: new-study event latency, "study stable in Orthanc -> Prefect flow run started".

Measures, for the project's two ``orthanc.study.stable`` emitters and a raw baseline, how long
after Orthanc declares a study stable the ``route-new-study/on-stable-study`` flow run is
created and started, all in one run on the same machine:

``lua``
    the Lua emitter in the research Orthanc (``deployments/orthanc/study_events.lua``) posts
    the event from ``OnStableStudy``; the deployment's trigger creates the run.
``raw``
    no Prefect: a plain loop polling research's ``GET /changes?since=...`` every
    ``--poll-interval`` seconds, timing when it sees the ``StableStudy`` change. The floor for
    the changes watcher's detection (the watcher additionally reads LastUpdate and posts).
    Restarted at a random offset for each study, so that the samples cover every phase.
``changes``
    the changes watcher (``watch-orthanc-changes/research-changes``, started with
    ``run_deployment``, polling every ``--poll-interval`` seconds) with the Lua emitter off.

Each mode stores ``--n`` fresh synthetic studies, one after another: upload to the lab's pacs,
C-STORE pacs -> research (synchronous), wait for the ``StableStudy`` change, then (lua,
changes) for the route run to finish before the next study. What is timed, per study:

* stable: the ``Date`` of the ``StableStudy`` entry of research's change log (Orthanc 1.10.1
  writes it in UTC whatever TZ says; 1-second resolution, truncated). Two other estimates are
  reported next to it: the first sighting of that entry by a 0.1-second probe run by this
  script (an upper bound, a few tens of ms late), and the wall clock right after the C-STORE
  returned plus StableAge (a lower bound: Orthanc only checks stability on whole seconds).
* detected/event: when the raw loop saw the change, or when Prefect *received* the event
  (``received`` of the stored event, looked up by its deterministic ID).
* fired: when the deployment's trigger fired (``occurred`` of the automation's
  ``prefect.automation.action.triggered`` event that names our event as triggering-event).
* run created, pending (the runner picked it up) and running (``start_time``: the flow
  process started and entered the flow), from the Prefect API.

Setup, all torn down at the end (also on Ctrl-C): a Prefect server on a free loopback port with
a temporary PREFECT_HOME (or ``--api-url`` to use a running one), an ``OrthancLab`` whose
research server runs the Lua emitter pointed at it, then
``python -m prefect_orthanc.deployments setup`` and
``python -m prefect_orthanc.deployments serve --only on-stable-study --only research-changes`` as
subprocesses (runner poll ``PREFECT_ORTHANC_SERVE_POLL_SECONDS``, 2 s unless
``--serve-poll``). The watcher deployment's interval schedule is switched off while measuring,
so that only the watcher run started here reports studies.

    .venv/bin/python bench/event_latency.py                     # N=10, ~4-5 minutes
    .venv/bin/python bench/event_latency.py --n 20 --modes lua changes --poll-interval 0.5
    PREFECT_LOGGING_LEVEL=INFO PREFECT_LOGGING_SERVER_LEVEL=INFO \
        .venv/bin/python bench/event_latency.py --logs /tmp/el   # keep the server log

Prints markdown tables and writes every sample to bench/results/event_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import itertools
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import httpx

from bench._common import quiet_prefect
from prefect_orthanc.deployments.lab.processes import stop_group  # no Prefect import
from prefect_orthanc.deployments.lab.runs import (
    FINAL_STATES,
    ROUTE_DEPLOYMENT,
    new_study_runs,
    wait_until_final,
    wait_until_served,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

    from prefect_orthanc.deployments.lab.servers import OrthancLab

LUA = ROOT / "deployments" / "orthanc" / "study_events.lua"
SERVER = "research"
ROUTE = ROUTE_DEPLOYMENT
WATCH = "watch-orthanc-changes/research-changes"
WATCH_CURSOR = "orthanc_changes_events_research"
MODES = ("lua", "raw", "changes")  # in this order: the Lua emitter is on at first, then off
PROBE_SECONDS = 0.1


# ------------------------------------------------------------------ time stamps


def orthanc_time(stamp: str) -> float:
    """Orthanc's ``20261123T110605`` (UTC in 1.10.1, also in change-log Dates) as epoch s."""
    moment = dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    return moment.timestamp()


def prefect_time(stamp: str | None) -> float | None:
    """A Prefect API timestamp (ISO 8601 with offset) as epoch seconds."""
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else None


# ------------------------------------------------------------------ processes


def _child_setup() -> None:
    """In a child, before exec: SIGINT handled normally (even if this benchmark was started
    with it ignored, as background jobs are), and SIGTERM when the benchmark dies."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(command: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a child in its own session (Ctrl-C reaches only us; we stop it in order).
    Only called from the main thread before any helper thread exists (preexec_fn)."""
    with log.open("ab") as out:
        return subprocess.Popen(list(command), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_child_setup)


# ------------------------------------------------------------------ Orthanc


class ChangeLog:
    """Research's ``GET /changes``, read forward from a cursor."""

    def __init__(self, url: str, auth: tuple[str, str] | None) -> None:
        self.http = httpx.Client(base_url=url, auth=auth, timeout=10)

    def last(self) -> int:
        return int(self.http.get("/changes", params={"last": ""}).json()["Last"])

    def read(self, since: int) -> tuple[list[dict[str, Any]], int]:
        """Every change after ``since`` (all pages) and the new cursor."""
        changes: list[dict[str, Any]] = []
        while True:
            page = self.http.get("/changes", params={"since": since, "limit": 200}).json()
            changes += page["Changes"]
            since = int(page["Last"])
            if page["Done"]:
                return changes, since

    def close(self) -> None:
        self.http.close()


def wait_stable(log: ChangeLog, since: int, study_id: str, timeout: float
                ) -> tuple[float, str]:
    """Poll every 0.1 s until the study's ``StableStudy`` change appears: (seen at, Date)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        changes, since = log.read(since)
        seen = time.time()
        for change in changes:
            if change["ChangeType"] == "StableStudy" and change["ID"] == study_id:
                return seen, change["Date"]
        time.sleep(PROBE_SECONDS)
    raise TimeoutError(f"study {study_id[:8]} not stable after {timeout:.0f} s")


def store_new_study(pacs_url: str, workdir: Path, seed: int, instances: int
                    ) -> tuple[str, float]:
    """A fresh synthetic study uploaded to the pacs, then C-STOREd (synchronously) into
    research. Returns its Orthanc ID and the wall clock when the C-STORE returned."""
    from prefect_orthanc.deployments.lab.synthetic import make_cohort, zip_bytes
    from prefect_orthanc.orthanc_client import Orthanc

    cohort = make_cohort(workdir / f"study-{seed}", patients=1, studies_per_patient=1,
                         series_per_study=1, instances_per_series=instances, seed=seed)
    with Orthanc(url=pacs_url) as pacs:
        stored = pacs.upload(zip_bytes(cohort.files))
        study_id = {item.parent_study for item in stored if item.parent_study}.pop()
        pacs.store(SERVER, [study_id], synchronous=True)
    return study_id, time.time()


class RawPoller(threading.Thread):
    """The baseline: a plain ``/changes`` loop, like the watcher's but without Prefect.

    Polls, notes when each ``StableStudy`` change was first seen, sleeps ``poll_interval``.
    A poll that finds its kept-alive connection closed by Orthanc (it closes idle ones after
    ``KeepAliveTimeout``, 1 s by default: a 1-s loop races it) is retried at once, as any
    client would.
    """

    def __init__(self, url: str, auth: tuple[str, str] | None, poll_interval: float) -> None:
        super().__init__(name="raw-changes-poller", daemon=True)
        self.log = ChangeLog(url, auth)
        self.since = self.log.last()
        self.poll_interval = poll_interval
        self.seen: dict[str, tuple[float, str]] = {}
        self.polls = self.reconnects = self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.polls += 1
                changes: list[dict[str, Any]] = []
                for attempt in range(2):
                    try:
                        changes, self.since = self.log.read(self.since)
                        break
                    except httpx.TransportError:
                        if attempt:
                            self.errors += 1
                        else:
                            self.reconnects += 1
                now = time.time()
                for change in changes:
                    if change["ChangeType"] == "StableStudy":
                        self.seen.setdefault(change["ID"], (now, change["Date"]))
                self._halt.wait(self.poll_interval)
        finally:
            self.log.close()

    def wait_for(self, study_id: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while study_id not in self.seen:
            if time.monotonic() > deadline or not self.is_alive():
                raise TimeoutError(f"the raw loop never saw study {study_id[:8]} stable")
            time.sleep(0.05)
        return self.seen[study_id]

    def halt(self) -> None:
        self._halt.set()
        self.join(10)


# ------------------------------------------------------------------ Prefect


def set_schedules_active(client: SyncPrefectClient, name: str, active: bool) -> int:
    """Switch a deployment's schedules on or off (off deletes its future scheduled runs)."""
    deployment = client.read_deployment_by_name(name)
    schedules = client.read_deployment_schedules(deployment.id)
    for schedule in schedules:
        client.update_deployment_schedule(deployment.id, schedule.id, active=active)
    return len(schedules)


def find_run(study_id: str, after: float, timeout: float) -> dict[str, Any]:
    """The route-new-study run for this study (``study_id`` parameter) created after
    ``after`` (a server given with --api-url may hold runs of an earlier benchmark)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in new_study_runs(study_id):
            if (prefect_time(run["created"]) or 0.0) >= after - 1:
                return run
        time.sleep(0.5)
    raise TimeoutError(f"no route-new-study run for study {study_id[:8]} in {timeout:.0f} s")


def pending_time(client: SyncPrefectClient, run_id: str) -> float | None:
    """When the runner proposed PENDING for the run (it picked the run up)."""
    states = client.request("GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()
    times = [prefect_time(s["timestamp"]) for s in states if s["type"] == "PENDING"]
    return min((t for t in times if t is not None), default=None)


def find_event(client: SyncPrefectClient, query: dict[str, Any], timeout: float = 20
               ) -> dict[str, Any] | None:
    """The first stored event matching an event filter (events are persisted in batches, a
    few seconds late: retry a little)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = client.request("POST", "/events/filter",
                              json={"filter": query, "limit": 5}).json()
        if page["events"]:
            return dict(page["events"][0])
        time.sleep(1)
    return None


# ------------------------------------------------------------------ measurement


@dataclass
class Sample:
    """One study's timings, as epoch seconds (wall clock of this machine)."""

    mode: str
    study: str  # first 8 characters of the Orthanc ID
    stored: float  # right after the synchronous C-STORE returned
    stable_age: int
    stable_date: float  # Date of the StableStudy change (UTC, whole seconds, truncated)
    stable_probe: float  # first sighting of that change by the 0.1-s probe
    detected: float | None = None  # raw: the loop saw it; lua/changes: Prefect received the event
    fired: float | None = None  # the deployment's trigger fired (automation action triggered)
    created: float | None = None
    pending: float | None = None
    started: float | None = None
    ended: float | None = None
    state: str | None = None
    emitter: str | None = None

    def stable(self, reference: str) -> float:
        return {"date": self.stable_date, "probe": self.stable_probe,
                "store": self.stored + self.stable_age}[reference]


@dataclass
class Bench:
    """What the modes share."""

    args: argparse.Namespace
    lab: OrthancLab
    client: SyncPrefectClient
    changes: ChangeLog
    workdir: Path
    seeds: Iterator[int] = field(default_factory=lambda: itertools.count(7100))

    def fresh_study(self, mode: str) -> tuple[str, Sample]:
        """Store a new study, wait (probing) until it is stable; its ID and first timings."""
        since = self.changes.last()
        study_id, stored = store_new_study(self.lab.pacs.url, self.workdir, next(self.seeds),
                                           self.args.instances)
        probe, date = wait_stable(self.changes, since, study_id, self.args.stable_age + 30)
        return study_id, Sample(mode=mode, study=study_id[:8], stored=stored,
                                stable_age=self.args.stable_age,
                                stable_date=orthanc_time(date), stable_probe=probe)


def measure_flow_study(bench: Bench, mode: str) -> Sample:
    """lua/changes: one study from C-STORE to its finished route run."""
    from prefect_orthanc.flows.events import study_event_id

    study_id, sample = bench.fresh_study(mode)
    last_update = bench.changes.http.get(f"/studies/{study_id}/metadata/LastUpdate").text
    run = find_run(study_id, after=sample.stored, timeout=90)
    final = wait_until_final(run["id"], timeout=180)
    sample.created = prefect_time(final["created"])
    sample.started = prefect_time(final["start_time"])
    sample.ended = prefect_time(final["end_time"])
    sample.state = final["state"]["type"]
    sample.pending = pending_time(bench.client, run["id"])
    event_id = str(study_event_id(study_id, last_update))
    event = find_event(bench.client, {"id": {"id": [event_id]}})
    if event is not None:
        sample.detected = prefect_time(event["received"])
        sample.emitter = event["payload"].get("emitter")
    action = find_event(bench.client, {
        "event": {"name": ["prefect.automation.action.triggered"]},
        "related": {"id": [f"prefect.event.{event_id}"]}})
    if action is not None:
        sample.fired = prefect_time(action["occurred"])
    return sample


def run_lua(bench: Bench) -> list[Sample]:
    return [progress(measure_flow_study(bench, "lua")) for _ in range(bench.args.n)]


def disable_lua(bench: Bench) -> None:
    research = bench.lab.research
    if research.config["PrefectEvents"]["Url"]:
        research.config["PrefectEvents"]["Url"] = ""
        research.restart()


def run_raw(bench: Bench) -> list[Sample]:
    """A fresh loop per study, started at a random offset: Orthanc declares studies stable
    just after whole seconds, so one loop with a fixed period would meet every study at
    nearly the same phase and sample a single point of the 0..poll_interval range."""
    disable_lua(bench)
    jitter = random.Random(bench.args.n)
    samples = []
    polls = reconnects = errors = 0
    for _ in range(bench.args.n):
        time.sleep(jitter.uniform(0, bench.args.poll_interval))
        poller = RawPoller(bench.lab.research.url, bench.lab.research.auth,
                           bench.args.poll_interval)
        poller.start()
        try:
            study_id, sample = bench.fresh_study("raw")
            sample.detected, _date = poller.wait_for(study_id, bench.args.poll_interval + 30)
        finally:
            poller.halt()
        polls, reconnects = polls + poller.polls, reconnects + poller.reconnects
        errors += poller.errors
        samples.append(progress(sample))
    print(f"  raw loop: {polls} polls, {reconnects} found the connection closed by Orthanc "
          f"(retried at once), {errors} failed", flush=True)
    return samples


def run_changes(bench: Bench) -> list[Sample]:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling
    from prefect.variables import Variable

    disable_lua(bench)
    Variable.unset(WATCH_CURSOR)  # a new cursor starts at the end of the change log
    run_for = 120 + 40 * bench.args.n  # generous; cancelled when done
    watcher = cast(FlowRun, run_deployment(  # synchronous here
        WATCH, parameters={"run_for": run_for, "poll_interval": bench.args.poll_interval},
        timeout=0))
    watcher_id = str(watcher.id)
    try:
        deadline = time.monotonic() + 120
        while True:
            state = bench.client.request("GET", "/flow_runs/{id}",
                                         path_params={"id": watcher_id}).json()["state"]["type"]
            if state == "RUNNING" and Variable.get(WATCH_CURSOR, default=None) is not None:
                break
            if state in FINAL_STATES or time.monotonic() > deadline:
                raise RuntimeError(f"the watcher run did not start (state {state})")
            time.sleep(0.5)
        return [progress(measure_flow_study(bench, "changes")) for _ in range(bench.args.n)]
    finally:
        with contextlib.suppress(Exception):
            bench.client.set_flow_run_state(watcher.id, Cancelling(), force=True)
            wait_until_final(watcher_id, timeout=30)


def progress(sample: Sample) -> Sample:
    ref = sample.stable_date
    parts = [f"{sample.mode:8s} {sample.study}"]
    for label, value in (("detected", sample.detected), ("created", sample.created),
                         ("started", sample.started)):
        if value is not None:
            parts.append(f"{label} {value - ref:+5.2f}")
    if sample.state and sample.state != "COMPLETED":
        parts.append(sample.state)
    print("  " + "  ".join(parts) + "  (s after the StableStudy Date)", flush=True)
    return sample


# ------------------------------------------------------------------ report


def spread(values: Sequence[float]) -> tuple[float, float, float] | None:
    """Median, p90 (nearest rank) and max."""
    if not values:
        return None
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return statistics.median(ordered), p90, ordered[-1]


def cell(values: Sequence[float]) -> str:
    stats = spread(values)
    return "–" if stats is None else " / ".join(f"{v:.2f}" for v in stats)


def median_cell(values: Sequence[float]) -> str:
    return "–" if not values else f"{statistics.median(values):.2f}"


def deltas(samples: Sequence[Sample], end: str, start: str | None = None,
           reference: str = "date") -> list[float]:
    """``end - start`` per sample (``start`` None: the stable moment by ``reference``)."""
    out = []
    for s in samples:
        a = getattr(s, end)
        b = s.stable(reference) if start is None else getattr(s, start)
        if a is not None and b is not None:
            out.append(a - b)
    return out


def report(results: dict[str, list[Sample]], args: argparse.Namespace) -> str:
    flows = {mode: samples for mode, samples in results.items() if mode != "raw"}
    lines = [
        (f"StableAge {args.stable_age} s, poll interval {args.poll_interval} s (raw loop and "
         f"watcher), runner poll {args.serve_poll or 2.0} s, {args.instances} instances/study."),
        "",
        "Seconds after the StableStudy change's Date, median / p90 / max:",
        "",
        ("| mode | n | stable → detected (raw) / event received | stable → run created "
         "| stable → run started |"),
        "|---|---|---|---|---|",
    ]
    for mode, samples in results.items():
        lines.append(f"| {mode} | {len(samples)} | {cell(deltas(samples, 'detected'))} "
                     f"| {cell(deltas(samples, 'created'))} | {cell(deltas(samples, 'started'))} |")
    lines += [
        "",
        ("Where the time goes (medians, s): event = Prefect received it; fired = the "
         "trigger fired (its automation action was triggered); created = the action created "
         "the run; pending = the runner picked it up; running = the flow process entered the "
         "flow."),
        "",
        ("| mode | stable → event | event → fired (trigger) | fired → created (action) "
         "| created → pending (runner poll) | pending → running (process start) "
         "| run duration |"),
        "|---|---|---|---|---|---|---|",
    ]
    for mode, samples in flows.items():
        lines.append(f"| {mode} | {median_cell(deltas(samples, 'detected'))} "
                     f"| {median_cell(deltas(samples, 'fired', 'detected'))} "
                     f"| {median_cell(deltas(samples, 'created', 'fired'))} "
                     f"| {median_cell(deltas(samples, 'pending', 'created'))} "
                     f"| {median_cell(deltas(samples, 'started', 'pending'))} "
                     f"| {median_cell(deltas(samples, 'ended', 'started'))} |")
    lines += [
        "",
        ("The stable moment three ways (medians, s). Date: Orthanc's stamp, whole seconds, "
         "truncated (up to 1 s of quantization, ±0.5 s around its midpoint); probe: first seen "
         f"by a {PROBE_SECONDS:.1f}-s poll of /changes (a little late); C-STORE+StableAge: wall "
         "clock when the synchronous C-STORE returned plus StableAge (early: Orthanc counts "
         "StableAge in whole seconds, so a study is stable StableAge to StableAge+1 s after "
         "its last instance)."),
        "",
        ("| mode | probe − Date | probe − (C-STORE+StableAge) | metric | from Date "
         "| from probe | from C-STORE+StableAge |"),
        "|---|---|---|---|---|---|---|",
    ]
    for mode, samples in results.items():
        metric = "detected" if mode == "raw" else "started"
        by_reference = [median_cell(deltas(samples, metric, reference=r))
                        for r in ("date", "probe", "store")]
        lines.append(f"| {mode} | {median_cell(deltas(samples, 'stable_probe', 'stable_date'))} "
                     f"| {median_cell([s.stable_probe - s.stable('store') for s in samples])} "
                     f"| stable → {metric} | {' | '.join(by_reference)} |")
    odd = [f"{s.mode} {s.study}: {s.state}" for ss in results.values() for s in ss
           if s.state not in (None, "COMPLETED")]
    odd += [f"{s.mode} {s.study}: event from {s.emitter!r}" for ss in results.values()
            for s in ss if s.mode != "raw" and s.emitter != s.mode]
    if odd:
        lines += ["", "Anomalies: " + "; ".join(odd)]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10, help="studies per mode (default 10)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--stable-age", type=int, default=2, help="Orthanc StableAge, s")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="the watcher's and the raw loop's poll interval, s (default 1.0)")
    parser.add_argument("--serve-poll", type=float, default=None,
                        help="PREFECT_ORTHANC_SERVE_POLL_SECONDS for serve (default: its 2 s)")
    parser.add_argument("--instances", type=int, default=3, help="instances per study")
    parser.add_argument("--logs", type=Path, help="keep the Prefect server's and serve's "
                                                  "logs in this directory")
    parser.add_argument("--api-url", help="use this Prefect API instead of starting a server "
                                          "(its 'research' block and deployments are replaced)")
    args = parser.parse_args()

    def terminate(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-events-")))
        os.environ.setdefault("PREFECT_HOME", str(home / "client-home"))
        quiet_prefect()
        logs = args.logs or home
        logs.mkdir(parents=True, exist_ok=True)
        if args.api_url:
            api = args.api_url.rstrip("/")
        else:
            from prefect_orthanc.deployments.lab.prefect_server import LocalPrefectServer

            print("starting a Prefect server ...", flush=True)
            server = LocalPrefectServer.start(logs / "prefect-home", ui=False)
            stack.callback(server.stop)
            api = server.api_url
        os.environ["PREFECT_API_URL"] = api  # before Prefect is imported

        from prefect.client.orchestration import get_client

        from prefect_orthanc.deployments.lab.servers import OrthancLab

        lab = OrthancLab.start(home / "lab", stable_age=args.stable_age,
                               research_lua_scripts=[LUA],
                               research_overrides={"PrefectEvents": {"Url": api + "/events",
                                                                     "Server": SERVER}})
        stack.callback(lab.stop)
        env = {**os.environ, "PREFECT_API_URL": api, "ORTHANC_URL": lab.research.url,
               "ORTHANC_USERNAME": lab.research.username or "",
               "ORTHANC_PASSWORD": lab.research.password or "", "PYTHONPATH": str(ROOT)}
        if args.serve_poll:
            env["PREFECT_ORTHANC_SERVE_POLL_SECONDS"] = str(args.serve_poll)
        setup = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
                               check=False)
        if setup.returncode != 0:
            raise SystemExit("`python -m prefect_orthanc.deployments setup` failed:\n"
                             + setup.stderr[-3000:])
        serve_log = logs / "serve.log"
        serve = spawn([sys.executable, "-m", "prefect_orthanc.deployments", "serve",
                       "--only", "on-stable-study", "--only", "research-changes"], env, serve_log)
        stack.callback(stop_group, serve)
        client = stack.enter_context(get_client(sync_client=True))
        wait_until_served([ROUTE, WATCH], serve, serve_log, timeout=120)
        if set_schedules_active(client, WATCH, False) and args.api_url:
            stack.callback(set_schedules_active, client, WATCH, True)
        changes = ChangeLog(lab.research.url, lab.research.auth)
        stack.callback(changes.close)
        bench = Bench(args=args, lab=lab, client=client,
                      changes=changes,
                      workdir=home / "studies")
        print(f"ready after {time.monotonic() - began:.0f} s (Prefect {api})", flush=True)

        runners = {"lua": run_lua, "raw": run_raw, "changes": run_changes}
        results: dict[str, list[Sample]] = {}
        for mode in MODES:
            if mode in args.modes:
                print(f"{mode}: {args.n} studies", flush=True)
                started = time.monotonic()
                results[mode] = runners[mode](bench)
                print(f"  {time.monotonic() - started:.0f} s", flush=True)
        measured = time.monotonic() - began
        print("stopping ...", flush=True)

    total = time.monotonic() - began
    text = report(results, args)
    print("\n" + text + f"\n\nTotal runtime {total:.0f} s ({measured:.0f} s until measured).")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "event_latency.json").write_text(json.dumps({
        "config": {k: v for k, v in vars(args).items() if k not in ("api_url", "logs")},
        "total_seconds": total,
        "samples": {mode: [asdict(s) for s in samples] for mode, samples in results.items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
