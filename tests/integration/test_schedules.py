"""Scheduled deployments run, on a real Prefect server with its own services.

The server's scheduler (not the test) creates the runs of a cron and an interval schedule a
few seconds ahead; ``python -m prefect_orthanc.deployments serve`` and a process worker
(``prefect deploy`` + ``prefect worker start``) each pick them up and complete them. A run
started through the API with one parameter overridden keeps the deployment's other defaults.

The deployments are the shipped changes watcher of prefect.yaml, renamed, with its schedule
brought forward and short runs (a derived prefect.yaml in a temporary directory); everything
else (entrypoint, pull step, work pool, parameters, concurrency) is as shipped. This is the
test that failed on Prefect 3.8.8 + SQLAlchemy 2.1, whose scheduler created no run at all.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefect_orthanc.deployments.lab.processes import stop_group
from prefect_orthanc.deployments.lab.runs import deployment_runs, wait_until_served

from .conftest import delete_deployment

REPO = Path(__file__).resolve().parents[2]
WATCHER = "watch-orthanc-changes"
#: cron with a seconds field (croniter's sixth field): a run every 5 s, so no test waits minutes
CRON_EVERY_5_S = "* * * * * */5"
RUN_BOUND = 120  # seconds for a scheduled run to be created, picked up and completed

pytestmark = pytest.mark.usefixtures("prefect_server")


def _derived_yaml(tmp: Path, prefix: str) -> Path:
    """The shipped prefect.yaml with only the watcher, three times: ``<prefix>-cron`` and
    ``<prefix>-interval``, each firing every 5 s and running for 1 s, and ``<prefix>-adhoc``
    with no schedule; and the nightly collection as ``<prefix>-nightly``, unscheduled."""
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [watcher] = [d for d in shipped["deployments"] if d["entrypoint"].endswith(":watch_changes")]
    derived = []
    for kind, schedule in (("cron", {"cron": CRON_EVERY_5_S, "timezone": "UTC"}),
                           ("interval", {"interval": 5})):
        deployment = copy.deepcopy(watcher)
        deployment["name"] = f"{prefix}-{kind}"
        deployment["schedules"] = [{**schedule, "active": True}]
        # a server name of its own: its own cursor Variable and event resources
        deployment["parameters"].update(run_for=1, poll_interval=0.5, server=f"sched{prefix}")
        derived.append(deployment)
    ad_hoc = copy.deepcopy(derived[-1])  # no schedule: nothing queues ahead of an ad-hoc run
    ad_hoc["name"], ad_hoc["schedules"] = f"{prefix}-adhoc", []
    [nightly] = [copy.deepcopy(d) for d in shipped["deployments"]
                 if d["entrypoint"].endswith(":collect_cohort")]
    nightly["name"], nightly["schedules"] = f"{prefix}-nightly", []
    shipped["deployments"] = [*derived, ad_hoc, nightly]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(shipped, sort_keys=False))
    return path


def _env(lab) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PWD": str(REPO),
            "PYTHONPATH": str(REPO), "ORTHANC_URL": lab.research.url,
            "ORTHANC_USERNAME": lab.research.username,
            "ORTHANC_PASSWORD": lab.research.password}


@pytest.fixture(scope="module")
def set_up(lab) -> dict[str, str]:
    env = _env(lab)
    setup = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-2000:]
    return env


def _wait(deployment: str, process: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """The first scheduled run of ``deployment`` that completed; the runner's log on failure."""
    from prefect_orthanc.deployments.lab.runs import wait_for_scheduled_run

    if process.poll() is not None:
        pytest.fail(f"the runner exited:\n{log.read_text(errors='replace')[-3000:]}")
    try:
        return wait_for_scheduled_run(deployment, RUN_BOUND)
    except (RuntimeError, TimeoutError) as error:
        pytest.fail(f"{error}\n{log.read_text(errors='replace')[-3000:]}")


def _delete(names: list[str]) -> None:
    """Delete the test's deployments (and so their future scheduled runs)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for name in names:
            delete_deployment(client, client.read_deployment_by_name(name).id)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def served(set_up, tmp_path_factory) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    tmp = tmp_path_factory.mktemp("served")
    spec = _derived_yaml(tmp, "served")
    log = tmp / "serve.log"
    process = _start([sys.executable, "-m", "prefect_orthanc.deployments", "serve",
                      "--file", str(spec)], set_up, log)
    names = [*(f"{WATCHER}/served-{kind}" for kind in ("cron", "interval", "adhoc")),
             "collect-research-cohort/served-nightly"]
    try:
        wait_until_served(names, process, log, timeout=90)
        yield process, log
    finally:
        stop_group(process)
        _delete(names)


@pytest.fixture(scope="module")
def worker(set_up, tmp_path_factory) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    tmp = tmp_path_factory.mktemp("worker")
    spec = _derived_yaml(tmp, "worker")
    prefect = str(Path(sys.executable).with_name("prefect"))
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file",
                             str(spec)], cwd=REPO, env=set_up, capture_output=True, text=True,
                            timeout=300)
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
    log = tmp / "worker.log"
    process = _start([prefect, "worker", "start", "--pool", "orthanc-process",
                      "--prefetch-seconds", "10"], set_up, log)
    try:
        yield process, log
    finally:
        stop_group(process)
        _delete([*(f"{WATCHER}/worker-{kind}" for kind in ("cron", "interval", "adhoc")),
                 "collect-research-cohort/worker-nightly"])


@pytest.mark.parametrize("kind", ["cron", "interval"])
def test_a_served_deployment_runs_on_its_schedule(served, kind):
    process, log = served
    run = _wait(f"{WATCHER}/served-{kind}", process, log)
    assert run["parameters"]["run_for"] == 1
    assert run["parameters"]["server"] == "schedserved"


@pytest.mark.parametrize("kind", ["cron", "interval"])
def test_a_worker_runs_a_deployed_schedule(worker, kind):
    process, log = worker
    run = _wait(f"{WATCHER}/worker-{kind}", process, log)
    assert run["work_pool_name"] == "orthanc-process"
    assert run["parameters"]["server"] == "schedworker"


def test_cron_schedule_fires_at_its_seconds(served):
    """The server generated the cron runs on 5-second marks (croniter's seconds field)."""
    import datetime as dt

    starts = [dt.datetime.fromisoformat(r["expected_start_time"].replace("Z", "+00:00"))
              for r in deployment_runs(f"{WATCHER}/served-cron") if r["auto_scheduled"]]
    assert len(starts) >= 3
    assert all(start.second % 5 == 0 and start.microsecond == 0 for start in starts)


def test_an_ad_hoc_run_with_one_parameter_keeps_the_other_defaults(served):
    from prefect.deployments import run_deployment

    run = run_deployment(f"{WATCHER}/served-adhoc", parameters={"run_for": 0.5},
                         timeout=90)
    assert run.state is not None and run.state.is_completed(), run.state
    assert run.parameters["run_for"] == 0.5
    assert run.parameters["server"] == "schedserved"
    assert run.parameters["poll_interval"] == 0.5
    assert run.parameters["credentials_block"] == "research"


def test_a_purposeful_failure_is_logged_in_one_line_without_a_traceback(served):
    """A run that fails on purpose (the nightly collection's cohort file is missing) ends
    Failed with its one-line message; neither the run's logs in Prefect nor the runner's
    output hold a traceback (Prefect 3.9 logs one, with the repr of the state's data, for a
    flow returning ``Failed(data=report)``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment

    _, log = served
    before = log.read_text(errors="replace").count("Traceback")
    run = run_deployment("collect-research-cohort/served-nightly", timeout=90,
                         parameters={"cohort_file": "cohorts/no-such-cohort.csv"})
    assert run.state is not None and run.state.is_failed(), run.state
    assert run.state.message.startswith("collection not started: cohort file not found")
    deadline, text = time.monotonic() + 30, ""
    while "Finished in state Failed" not in text and time.monotonic() < deadline:
        time.sleep(0.5)  # run logs reach the API in batches
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        text = "\n".join(entry.message for entry in logs)
    assert "collection not started: cohort file not found" in text, text
    assert "Traceback" not in text and "Unexpected result" not in text, text[-2000:]
    output = log.read_text(errors="replace")
    assert output.count("Traceback") == before, output[-3000:]
