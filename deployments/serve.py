"""``serve()``: every deployment of prefect.yaml served from this process.

Polling often enough for new-study runs to start within seconds, and leaving the deployments
active when it stops (paused deployments would ignore new-study events). Settings:
``deployments.settings``.

    python -m prefect_orthanc.deployments serve
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from prefect_orthanc.deployments.settings import DeploymentSettings

__all__ = ["serve"]


async def _worker_deployments(names: list[str], delete: bool) -> list[str]:
    """Which of these deployments exist on a work pool (made by ``prefect deploy``); with
    ``delete``, remove them so ``serve`` can own the names, and the automations their
    triggers made (``prefect deploy`` creates each as ``<deployment>__automation_<n>``, owned
    by the resource ``prefect.deployment.<id>``; deleting the deployment leaves them, each
    event then failing a run-deployment action on a deployment that is gone)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    async with get_client() as client:
        for name in names:
            try:
                deployment = await client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                found.append(f"{name} (work pool {deployment.work_pool_name})")
                if delete:
                    await client.delete_resource_owned_automations(
                        f"prefect.deployment.{deployment.id}")
                    await client.delete_deployment(deployment.id)
    return found


def _watch_ownership(names: list[str], every: float, taken: list[str],
                     stop: threading.Event) -> None:
    """Until ``stop``: every ``every`` seconds, check that no served deployment was taken by a
    work pool (``prefect deploy`` run while serving updates the same deployment in place, and
    both this process and a worker would then pick up its runs). On the first one taken,
    record it and SIGTERM this process: the runner stops gracefully."""
    while not stop.wait(every):
        try:
            found = asyncio.run(_worker_deployments(names, delete=False))
        except Exception:
            continue
        if found:
            taken.extend(found)
            print("serve: stopping: " + ", ".join(found) + " now belong to a work pool "
                  "(`prefect deploy` ran while this process served them)", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def serve(only: set[str] | None = None, settings: DeploymentSettings | None = None,
          replace: bool = False, path: str | Path | None = None, **runner: Any) -> None:
    """Serve prefect.yaml's deployments (or ``only`` those names) from this process until
    stopped; deployments stay active afterwards (``pause_on_shutdown=False``).

    One runner per deployment, in either order: deployments of the same names made by
    ``prefect deploy`` for a worker are not taken over silently (their runs would look for
    code the worker was meant to fetch): this raises unless ``replace`` deletes them first.
    And when ``prefect deploy`` takes a served deployment for a work pool while this runs,
    serving stops (within ``ownership_check_seconds``) with ``SystemExit`` naming it, leaving
    the worker as its only runner. ``path`` is a prefect.yaml of your
    own (default: the shipped one).
    """
    from prefect import serve as prefect_serve

    from prefect_orthanc.deployments.spec import load, runner_deployments

    settings = settings or DeploymentSettings()
    specs = [s for s in (load(path) if path else load())
             if not only or s.name in only or s.full_name in only]
    if not specs:
        raise SystemExit(f"no deployment named {sorted(only or [])} in prefect.yaml")
    names = [s.full_name for s in specs]
    taken = asyncio.run(_worker_deployments(names, delete=replace))
    if taken and not replace:
        raise SystemExit("these deployments were made by `prefect deploy` for a worker: "
                         + ", ".join(taken) + "; run a worker for them instead, or serve "
                         "with --replace to delete and serve them here")
    deployments = runner_deployments(specs)
    runner.setdefault("query_seconds", settings.serve_poll_seconds)
    runner.setdefault("heartbeat_seconds", settings.heartbeat_seconds)  # zombie detection
    taken_later: list[str] = []
    stop = threading.Event()
    threading.Thread(target=_watch_ownership, name="deployment-ownership", daemon=True,
                     args=(names, settings.ownership_check_seconds, taken_later, stop)).start()
    try:
        prefect_serve(*deployments, pause_on_shutdown=False, **runner)
    finally:
        stop.set()
        if taken_later:
            raise SystemExit("stopped serving: " + ", ".join(taken_later) + " were deployed "
                             "for a worker while served; run a worker for them, or serve "
                             "with --replace to take them back")
