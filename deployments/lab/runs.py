"""Watching served deployments and their runs: the demo, the integration tests and
bench/event_latency.py wait on them (contributor tooling, not in the wheel)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ROUTE_DEPLOYMENT",
    "deployment_runs",
    "new_study_runs",
    "wait_for_scheduled_run",
    "wait_until_final",
    "wait_until_served",
]

#: the deployment the ``orthanc.study.stable`` trigger runs (prefect.yaml)
ROUTE_DEPLOYMENT = "route-new-study/on-stable-study"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_served(names: Sequence[str], process: subprocess.Popen[bytes], log: Path,
                      timeout: float = 90) -> None:
    """Return once every named deployment exists and is READY (a runner is polling it);
    raise ``RuntimeError`` with the end of ``log`` if ``serve`` exits or time runs out."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"`python -m prefect_orthanc.deployments serve` exited:\n"
                                   f"{_tail(log)}")
            try:
                statuses = [client.read_deployment_by_name(n).status for n in names]
                if all(status is not None and status.value == "READY" for status in statuses):
                    return
            except ObjectNotFound:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the served deployments were not READY within {timeout:.0f} s:\n"
                       f"{_tail(log)}")


def deployment_runs(deployment: str) -> list[dict[str, Any]]:
    """The flow runs (API JSON, newest first, at most 200) of one deployment."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        return list(client.request("POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [str(deployment_id)]}},
            "sort": "EXPECTED_START_TIME_DESC", "limit": 200, "offset": 0}).json())


def new_study_runs(study_id: str, deployment: str = ROUTE_DEPLOYMENT) -> list[dict[str, Any]]:
    """The flow runs (API JSON, newest first) the new-study deployment made for one study."""
    return [run for run in deployment_runs(deployment)
            if run["parameters"].get("study_id") == study_id]


def wait_for_scheduled_run(deployment: str, timeout: float) -> dict[str, Any]:
    """The first run of ``deployment`` that the server's scheduler created and that completed
    (API JSON); ``RuntimeError`` if a scheduled run failed, ``TimeoutError`` if none completed
    within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        scheduled = [r for r in deployment_runs(deployment) if r["auto_scheduled"]]
        for run in reversed(scheduled):  # oldest first
            if run["state"]["type"] == "COMPLETED":
                return run
            if run["state"]["type"] in {"FAILED", "CRASHED"}:
                raise RuntimeError(f"scheduled run {run['name']} of {deployment} ended "
                                   f"{run['state']['type']}: {run['state'].get('message')}")
        if time.monotonic() > deadline:
            states = sorted({r["state"]["type"] for r in scheduled})
            raise TimeoutError(f"no scheduled run of {deployment} completed within "
                               f"{timeout:.0f} s ({len(scheduled)} scheduled runs, states "
                               f"{states})")
        time.sleep(0.5)


def wait_until_final(run_id: str, timeout: float = 60) -> dict[str, Any]:
    """The flow run (API JSON) once it is in a final state; ``TimeoutError`` otherwise."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.request("GET", "/flow_runs/{id}", path_params={"id": run_id}).json()
            if run["state"]["type"] in FINAL_STATES:
                return dict(run)
            time.sleep(0.3)
    raise TimeoutError(f"flow run {run_id} did not finish within {timeout:.0f} s")
