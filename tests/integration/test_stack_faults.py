"""Fault injection on the production-shaped stack (deployments/multihost): the Prefect server
on PostgreSQL and each process worker on its own network namespace, the research Orthanc and
the PACS on the machine, prefect.yaml deployed to the work pool.

Each row collects (or shares) a small cohort of its own, breaks one piece mid-run, lets the
stack recover as an operator's service manager would (the killed process is started again at
once; a run that ended Failed/Crashed is run again, as its schedule would), and asserts:
0 studies lost (every study in research, every instance), 0 moved or delivered twice, 0
leftovers (no run still pending/running, no PACS slot held, no research job unfinished,
nothing in staging), and records the time from the fault to that state. The table is printed
at the end of the module and written to ``<pytest tmp>/stack-faults/faults.md``.

Needs root (``ip netns``), PostgreSQL's binaries and a C compiler (the bind shim): skipped
with the reason otherwise.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort

NIGHTLY = ("collect-research-cohort", "nightly")
SHARING = ("share-deidentified", "ad-hoc")
PACS_LIMIT = 2
SLOT_LIMIT = "orthanc-modality-pacs"
#: short bounds for the stack's processes (the settings the slot and heartbeat code reads;
#: the server's lease sweeper runs every 2 s)
STACK_ENV = {
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_LOGGING_LEVEL": "INFO",  # the workers log the runs they start (_worker_of)
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
    "PREFECT_ORTHANC_SLOT_RENEW_SECONDS": "2",
    "PREFECT_ORTHANC_SLOT_STALE_SECONDS": "6",
    "PREFECT_ORTHANC_SLOT_CHECK_SECONDS": "2",
    "PREFECT_ORTHANC_SLOT_SETTLE_SECONDS": "1",
    "PREFECT_ORTHANC_SLOT_POLL_SECONDS": "0.5",
    "PREFECT_ORTHANC_SLOT_WAIT_SECONDS": "120",
    "PREFECT_ORTHANC_ZOMBIE_SECONDS": "60",  # heartbeats every 30 s (Prefect's minimum)
}
RUN_TIMEOUT = 90.0
def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is missing"
    try:
        from prefect_orthanc.deployments.multihost.postgres import postgres_bin

        postgres_bin("initdb")
    except FileNotFoundError as error:
        return str(error)
    if shutil.which("cc") is None:
        return "no C compiler for the bind shim"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


# ------------------------------------------------------------------ the stack


class Api:
    """The stack's Prefect REST API (plain httpx: the session's own Prefect settings, which
    point at the suite's SQLite server, stay untouched)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def call(self, method: str, path: str, **kwargs) -> Any:
        for attempt in range(60):  # the server may be restarting
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if response.status_code >= 500 and attempt < 59:
                time.sleep(0.5)
                continue
            response.raise_for_status()
            return response.json() if response.content else None
        raise RuntimeError(f"the stack's API did not answer {method} {path}")

    def deployment_id(self, flow: str, name: str) -> str:
        return self.call("GET", f"/deployments/name/{flow}/{name}")["id"]

    def run(self, deployment: tuple[str, str], parameters: dict) -> str:
        deployment_id = self.deployment_id(*deployment)
        return self.call("POST", f"/deployments/{deployment_id}/create_flow_run",
                         json={"parameters": parameters})["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.call("GET", f"/flow_runs/{run_id}")

    def state(self, run_id: str) -> str:
        return self.flow_run(run_id)["state"]["type"]

    def wait_final(self, run_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run['name']} still {run['state']['type']} after "
                                   f"{timeout:.0f} s; limits with slots taken: "
                                   f"{self.taken_limits() or 'none'}; its last log lines: "
                                   + " | ".join(self.last_logs(run_id)))
            time.sleep(0.5)

    def taken_limits(self) -> dict[str, int]:
        """Global concurrency limits with slots in use (PACS slots, study locks)."""
        limits = self.call("POST", "/v2/concurrency_limits/filter", json={"limit": 200})
        return {limit["name"]: limit["active_slots"] for limit in limits
                if limit["active_slots"]}

    def last_logs(self, run_id: str, count: int = 4) -> list[str]:
        logs = self.call("POST", "/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC",
            "limit": count})
        return [entry["message"][:200] for entry in reversed(logs)]

    def unfinished_runs(self) -> list[dict]:
        return [run for run in self.call("POST", "/flow_runs/filter", json={
            "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "SCHEDULED",
                                                      "CANCELLING"]}}},
            "limit": 50}) if not run.get("auto_scheduled")]

    def active_slots(self, name: str = SLOT_LIMIT) -> int:
        return int(self.call("GET", f"/v2/concurrency_limits/{name}")["active_slots"])


@pytest.fixture(scope="module")
def stack():
    from prefect_orthanc.deployments.multihost.stack import ProductionStack

    root = Path(tempfile.mkdtemp(prefix="prefect-orthanc-stack-test-"))
    stack = ProductionStack(root, workers=2, worker_limit=1, netns=True, dcmqrscp=True,
                            modality_limits=f"pacs={PACS_LIMIT},dcmqr=2", ui=False,
                            env=STACK_ENV)
    try:
        stack.up()
        api = Api(stack.api_url)
        # the shipped schedules (nightly, the changes watcher, the route sweep) would take
        # worker slots at their own times: this module runs every flow itself
        for deployment in api.call("POST", "/deployments/filter", json={"limit": 50}):
            for schedule in deployment.get("schedules") or []:
                api.call("PATCH", f"/deployments/{deployment['id']}/schedules/{schedule['id']}",
                         json={"active": False})
        stack.api = api
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rows: list[dict] = []
    yield rows
    lines = ["| fault | result | recovery (s) | lost | twice | leftovers | note |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['fault']} | {r['result']} | {r.get('recovery', '')} | {r.get('lost', '')} "
              f"| {r.get('twice', '')} | {r.get('leftovers', '')} | {r.get('note', '')} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    out = tmp_path_factory.mktemp("stack-faults") / "faults.md"
    out.write_text(text)
    print(f"\n\nfault injection on the stack ({out}):\n{text}")


@contextmanager
def row(table: list[dict], fault: str):
    entry = {"fault": fault, "result": "FAILED"}
    table.append(entry)
    try:
        yield entry
        entry["result"] = "recovered"
    except BaseException as error:
        entry["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        raise


# ------------------------------------------------------------------ cohorts and checks


_seeds = iter(range(100, 10_000))


def _cohort(stack, name: str, studies: int = 4):
    """A cohort of its own (new patients), stored in the PACS, and its CSV in the data dir."""
    cohort = make_cohort(stack.root / "dicom" / name, patients=studies, studies_per_patient=1,
                         series_per_study=2, instances_per_series=3, seed=next(_seeds))
    load_into(stack.lab.pacs.url, cohort.files)
    path = stack.data_dir / "cohorts" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number"])
        writer.writerows([s.accession] for s in cohort.studies)
    return cohort


def _collect(stack, name: str) -> str:
    return stack.api.run(NIGHTLY, {"cohort_file": f"cohorts/{name}.csv", "project": name,
                                   "time_window": None})


def _research(stack) -> httpx.Client:
    server = stack.lab.research
    return httpx.Client(base_url=server.url, auth=server.auth, timeout=30)


def _call(client: httpx.Client, method: str, path: str, **kwargs):
    for _ in range(120):  # Orthanc may be restarting
        try:
            response = client.request(method, path, **kwargs)
            response.raise_for_status()
            return response.json()
        except (httpx.TransportError, httpx.HTTPStatusError):
            time.sleep(0.25)
    raise RuntimeError(f"{client.base_url} did not answer {method} {path}")


def _instances_in_research(stack, cohort) -> dict[str, int]:
    """Instances research holds, per study of the cohort (by row index)."""
    found = {}
    with _research(stack) as client:
        for study in cohort.studies:
            ids = _call(client, "POST", "/tools/find", json={
                "Level": "Study", "Query": {"StudyInstanceUID": study.study_uid}})
            found[study.index] = sum(len(_call(client, "GET", f"/studies/{i}/instances"))
                                     for i in ids)
    return found


def _move_jobs(stack) -> list[dict]:
    with _research(stack) as client:
        return [job for job in _call(client, "GET", "/jobs", params={"expand": ""})
                if job["Type"] == "DicomMoveScu"]


def _moved_studies(jobs: list[dict]) -> Counter:
    """StudyInstanceUID -> successful C-MOVEs of the whole study (Orthanc's job records)."""
    moved: Counter = Counter()
    for job in jobs:
        if job["State"] != "Success":
            continue
        for query in job.get("Content", {}).get("Query") or []:
            if "0020,000e" not in query and "SeriesInstanceUID" not in query:
                uid = query.get("0020,000d") or query.get("StudyInstanceUID")
                if uid:
                    moved[uid] += 1
    return moved


def _stamp(value: str) -> float:
    # Orthanc's job times, only compared with each other: the zone is the same for all
    return datetime.strptime(value if "." in value else value + ".0",
                             "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC).timestamp()


def _max_overlap(jobs: list[dict]) -> int:
    """The most C-MOVE jobs research ran against the PACS at once (job creation to
    completion lies inside the time the flow held the PACS slot)."""
    edges = []
    for job in jobs:
        if job.get("CreationTime") and job.get("CompletionTime"):
            edges += [(_stamp(job["CreationTime"]), 1), (_stamp(job["CompletionTime"]), -1)]
    peak = now = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        now += step
        peak = max(peak, now)
    return peak


def _leftovers(stack) -> list[str]:
    found = []
    unfinished = stack.api.unfinished_runs()
    if unfinished:
        found.append(f"{len(unfinished)} run(s) not final: "
                     + ", ".join(f"{r['name']} {r['state']['type']}" for r in unfinished))
    slots = stack.api.active_slots()
    if slots:
        found.append(f"{slots} PACS slot(s) held")
    pending = [j for j in _move_jobs(stack) if j["State"] in {"Pending", "Running", "Retry"}]
    if pending:
        found.append(f"{len(pending)} research job(s) unfinished")
    return found


def _settle(stack, entry: dict, started: float, cohort, timeout: float = 60) -> None:
    """Wait (bounded) until nothing is left over; record and assert lost/twice/leftovers."""
    deadline = time.monotonic() + timeout
    while (left := _leftovers(stack)) and time.monotonic() < deadline:
        time.sleep(0.5)
    entry["recovery"] = f"{time.monotonic() - started:.1f}"
    have = _instances_in_research(stack, cohort)
    lost = sum(max(0, s.instance_count - have[s.index]) for s in cohort.studies)
    extra = sum(max(0, have[s.index] - s.instance_count) for s in cohort.studies)
    moved = _moved_studies(_move_jobs(stack))
    twice = sum(1 for s in cohort.studies if moved[s.study_uid] > 1) + extra
    entry.update(lost=lost, twice=twice, leftovers=len(left))
    assert lost == 0, f"{lost} instance(s) of the cohort never reached research"
    assert twice == 0, f"{twice} study(ies) moved twice or instance(s) extra"
    assert not left, "; ".join(left)


def _when(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.1)


def _partly_collected(stack, cohort) -> bool:
    have = _instances_in_research(stack, cohort)
    total = sum(have.values())
    return 0 < total < sum(s.instance_count for s in cohort.studies)


def _until_completed(stack, run_id: str, name: str) -> str:
    """The run's outcome, and when it did not complete, a new run of the same cohort (what
    the schedule would start) until one completes; returns the completed run's id."""
    for _ in range(3):
        run = stack.api.wait_final(run_id)
        if run["state"]["type"] == "COMPLETED":
            return run_id
        run_id = _collect(stack, name)
    raise AssertionError(f"cohort {name}: no run completed after 3 attempts "
                         f"(last: {run['state']['type']}: {run['state'].get('message')})")


def _began(run: dict) -> float:
    return datetime.fromisoformat(run["start_time"]).timestamp()


def _ended(run: dict) -> float:
    return datetime.fromisoformat(run["end_time"]).timestamp()


def _worker_of(stack, run_id: str):
    """The worker that started the run: both may try to (each logs "submitting flow run
    '<id>'"), the server lets one, the other logs "Aborted submission of flow run '<id>'"."""
    for worker in stack.worker_processes:
        text = worker.log_path.read_text(errors="replace")
        if (f"submitting flow run '{run_id}'" in text
                and f"Aborted submission of flow run '{run_id}'" not in text):
            return worker
    return None


# ------------------------------------------------------------------ rows


def _listeners(netns: str | None = None) -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP socket (``ss -ltnp``)."""
    command = ["ss", "-Hltnp"]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        process = re.search(r'users:\(\("([^"]+)",pid=(\d+)', line)
        found.append((fields[3], f"{process.group(1)}[{process.group(2)}]" if process else "?"))
    return found


def test_every_server_of_the_stack_listens_on_its_own_address_only(stack):
    """Orthanc, dcmqrscp, PostgreSQL and the Prefect server: never 0.0.0.0 or [::]."""
    ours = {str(p) for p in (stack.lab.pacs.pid, stack.lab.research.pid,
                             stack.lab.dcmqr._process.pid)}
    machine = [(a, p) for a, p in _listeners() if p.split("[")[-1].rstrip("]") in ours]
    assert len([a for a, p in machine if p.startswith("Orthanc")]) == 4, machine
    assert len([a for a, p in machine if p.startswith("dcmqrscp")]) == 1, machine
    server = _listeners(stack.network.hosts["server"].netns)
    for address, process in machine + server:
        assert not address.startswith(("0.0.0.0:", "*:", "[::]:")), f"{process} on {address}"
    assert {a for a, p in machine if p.startswith("Orthanc")} <= {
        f"{stack.machine.address}:{port}" for server_ in stack.lab.servers
        for port in (server_.http_port, server_.dicom_port)}
    assert sorted(a.rsplit(":", 1)[0] for a, _ in server) == [
        "127.0.0.1", stack.network.hosts["server"].address]  # PostgreSQL, the Prefect API



def test_two_cohorts_at_once_on_two_workers_keep_the_pacs_cap(stack, table):
    with row(table, "two cohorts at once, two workers (no fault)") as entry:
        first, second = _cohort(stack, "cohort-a"), _cohort(stack, "cohort-b")
        started = time.monotonic()
        runs = [_collect(stack, "cohort-a"), _collect(stack, "cohort-b")]
        finals = [stack.api.wait_final(r) for r in runs]
        assert [f["state"]["type"] for f in finals] == ["COMPLETED", "COMPLETED"], [
            f["state"].get("message") for f in finals]
        workers = sorted({_worker_of(stack, r).name for r in runs})
        jobs = _move_jobs(stack)
        peak = _max_overlap(jobs)
        entry["note"] = f"runs on {workers}; at most {peak} C-MOVEs at once"
        assert 1 <= peak <= PACS_LIMIT, f"{peak} C-MOVEs to the PACS at once (limit 2)"
        for cohort in (first, second):
            _settle(stack, entry, started, cohort)
        overlap = min(_ended(f) for f in finals) - max(_began(f) for f in finals)
        assert workers == ["worker-1", "worker-2"] and overlap > 0, (
            f"the two cohorts did not run at once on two workers (runs on {workers}, "
            f"overlapping {overlap:.1f} s)")


def test_kill_a_worker(stack, table):
    with row(table, "kill a worker (SIGKILL, its flow run goes on)") as entry:
        cohort = _cohort(stack, "kill-worker")
        run_id = _collect(stack, "kill-worker")
        _when(lambda: stack.api.state(run_id) == "RUNNING", what="run started")
        worker = _worker_of(stack, run_id)
        _when(lambda: _partly_collected(stack, cohort), what="collection under way")
        started = time.monotonic()
        worker.kill(flows=False)
        worker.start()
        _until_completed(stack, run_id, "kill-worker")
        _settle(stack, entry, started, cohort)


def test_kill_a_worker_and_its_flow_run(stack, table):
    with row(table, "kill a worker and its flow process (lost host)") as entry:
        automations = stack.api.call("POST", "/automations/filter", json={})
        assert any("heartbeat" in str(a.get("trigger")) for a in automations), (
            "no automation marks a run whose heartbeats stopped as Crashed: `python -m "
            "deployments setup` should create it (issue 13 item 1, tasks/limits owner)")
        cohort = _cohort(stack, "lost-host")
        run_id = _collect(stack, "lost-host")
        _when(lambda: stack.api.state(run_id) == "RUNNING", what="run started")
        worker = _worker_of(stack, run_id)
        _when(lambda: _partly_collected(stack, cohort), what="collection under way")
        started = time.monotonic()
        worker.kill(flows=True)
        worker.start()
        # heartbeats every 30 s (Prefect's minimum): the zombie automation marks it Crashed
        run = stack.api.wait_final(run_id, timeout=180)
        assert run["state"]["type"] == "CRASHED", run["state"]
        entry["note"] = (f"Crashed {time.monotonic() - started:.1f} s after the kill: "
                         f"{(run['state'].get('message') or '')[:90]}")
        _until_completed(stack, _collect(stack, "lost-host"), "lost-host")
        _settle(stack, entry, started, cohort)


@pytest.mark.parametrize("which", ["research", "pacs"])
def test_kill_an_orthanc(stack, table, which):
    name = f"kill-{which}"
    with row(table, f"kill the {'research Orthanc' if which == 'research' else 'PACS'} "
                    f"(SIGKILL, restarted)") as entry:
        cohort = _cohort(stack, name)
        run_id = _collect(stack, name)
        _when(lambda: _partly_collected(stack, cohort), what="collection under way")
        server = getattr(stack.lab, which)
        started = time.monotonic()
        server._process.send_signal(signal.SIGKILL)
        server._process.wait(10)
        server.start()
        _until_completed(stack, run_id, name)
        _settle(stack, entry, started, cohort)


def test_restart_the_prefect_server(stack, table):
    with row(table, "restart the Prefect server (slots held)") as entry:
        cohort = _cohort(stack, "server-restart")
        run_id = _collect(stack, "server-restart")
        _when(lambda: _partly_collected(stack, cohort), what="collection under way")
        started = time.monotonic()
        away = stack.restart_server()
        entry["note"] = f"server away {away:.1f} s"
        _until_completed(stack, run_id, "server-restart")
        _settle(stack, entry, started, cohort)


# ------------------------------------------------------------------ sharing


def _research_study_count(stack) -> int:
    with _research(stack) as client:
        return int(_call(client, "GET", "/statistics")["CountStudies"])


def _dcmqr_stores(stack) -> int:
    """C-STOREs the modality destination (dcmqrscp, verbose log) has received so far."""
    text = stack.lab.dcmqr.log_path.read_text(errors="replace")
    return len(re.findall(r"Message Type\s*: C-STORE RQ", text))


@pytest.mark.parametrize("kind", ["directory", "modality"])
def test_kill_the_sharing_flow_mid_delivery(stack, table, kind):
    with row(table, f"kill the sharing flow mid-delivery ({kind})") as entry:
        project = "cohort-a"
        studies = _research_study_count(stack)
        target = f"shared-{kind}" if kind == "directory" else "dcmqr"
        parameters = {"project": project,
                      "destination": {"kind": kind, "target": target},
                      "linkage_path": f"linkage/{kind}.csv",
                      "staging_dir": f"sharing/staging-{kind}",
                      "ledger_path": f"sharing/ledger-{kind}.jsonl"}
        shared = stack.data_dir / target
        stores_before = _dcmqr_stores(stack) if kind == "modality" else 0

        def delivered_some() -> bool:
            if kind == "directory":
                return shared.is_dir() and any(shared.glob("*.zip"))
            return _dcmqr_stores(stack) > stores_before

        run_id = stack.api.run(SHARING, parameters)

        def delivered_or_ended() -> bool:
            if delivered_some():
                return True
            run = stack.api.flow_run(run_id)
            if run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                raise AssertionError(f"the sharing run ended {run['state']['type']} before "
                                     f"a first delivery: {run['state'].get('message')}; "
                                     + " | ".join(stack.api.last_logs(run_id)))
            return False

        _when(delivered_or_ended, timeout=90, what="a first delivery")
        started = time.monotonic()
        for worker in stack.worker_processes:
            for pid in worker.flow_pids():
                os.kill(pid, signal.SIGKILL)
        run = stack.api.wait_final(run_id)
        assert run["state"]["type"] in {"CRASHED", "FAILED"}, run["state"]
        rerun = stack.api.wait_final(stack.api.run(SHARING, parameters))
        assert rerun["state"]["type"] == "COMPLETED", rerun["state"].get("message")
        # cohort-a (the first row's): 4 studies of 2 series x 3 instances
        expected, per_study = 4, 6
        if kind == "directory":
            delivered = len(list(shared.glob("*.zip")))
        else:  # every C-STORE the recipient received, in studies
            stores = _dcmqr_stores(stack) - stores_before
            assert stores % per_study == 0, f"{stores} instances received: not whole studies"
            delivered = stores // per_study
        linkage = stack.data_dir / "linkage" / f"{kind}.csv"
        with linkage.open() as handle:
            linkage_rows = sum(1 for _ in csv.DictReader(handle))
        staging = stack.data_dir / f"sharing/staging-{kind}"
        staged = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
        entry.update(lost=max(0, expected - delivered), twice=max(0, delivered - expected),
                     leftovers=len(staged) + max(0, _research_study_count(stack) - studies))
        _settle_runs(stack, entry, started)
        assert delivered == expected, f"{delivered} deliveries for {expected} studies"
        assert linkage_rows == expected, f"{linkage_rows} linkage rows for {expected} studies"
        assert not staged, f"{len(staged)} file(s) left in staging"
        assert _research_study_count(stack) == studies, "anonymized copies left in research"


def _settle_runs(stack, entry: dict, started: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (left := _leftovers(stack)) and time.monotonic() < deadline:
        time.sleep(0.5)
    entry["recovery"] = f"{time.monotonic() - started:.1f}"
    assert not left, "; ".join(left)
