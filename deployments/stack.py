"""What the deployments need on the Prefect server, created from settings, and serving them.

``setup()`` is idempotent: it checks and creates the site's data directory
(``PREFECT_ORTHANC_DATA_DIR``, refused inside the checkout: ``flows.site``), creates (or
updates) the process work pool, reports whether the server's concurrency leases survive a
restart and makes the automation that marks runs whose heartbeats stopped Crashed
(``deployments.server_setup``), one global concurrency
limit per PACS (``orthanc-modality-<name>``), the ``OrthancCredentials`` block for the research
Orthanc (from ``ORTHANC_*``) and, when ``PREFECT_ORTHANC_DEID_SECRET`` is set, the Secret block
holding the de-identification secret. ``serve()`` runs every deployment of prefect.yaml from
this process, polling often enough for new-study runs to start within seconds, and leaves the
deployments active when it stops (paused deployments would ignore new-study events).

    python -m prefect_orthanc.deployments setup        # PREFECT_ORTHANC_MODALITY_LIMITS="pacs=2" by default
    python -m prefect_orthanc.deployments serve
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = [
    "ROUTE_DEPLOYMENT",
    "SetupError",
    "StackSettings",
    "deployment_runs",
    "new_study_runs",
    "serve",
    "setup",
    "wait_for_scheduled_run",
    "wait_until_final",
    "wait_until_served",
]

#: the deployment the ``orthanc.study.stable`` trigger runs (prefect.yaml)
ROUTE_DEPLOYMENT = "route-new-study/on-stable-study"
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})


class StackSettings(BaseSettings):
    """``PREFECT_ORTHANC_*`` settings of the deployment stack (names match prefect.yaml)."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_ORTHANC_", extra="ignore")

    work_pool: str = Field("orthanc-process", description="Process work pool for `prefect "
                                                          "deploy` deployments.")
    modality_limits: str = Field("pacs=2", description="Concurrent C-FIND/C-MOVE allowed per "
                                                       "PACS, e.g. 'pacs=2,archive=1'.")
    credentials_block: str = Field("research", description="OrthancCredentials block name.")
    secret_block: str = Field("deid-secret", description="Secret block with the de-id secret.")
    serve_poll_seconds: float = Field(2.0, gt=0, le=60, description="How often `serve` looks "
                                      "for runs to start (new-study latency).")
    ownership_check_seconds: float = Field(5.0, gt=0, le=300, description="How often `serve` "
                                           "checks that `prefect deploy` has not given its "
                                           "deployments to a work pool meanwhile.")
    heartbeat_seconds: int = Field(30, ge=30, le=3600, description="Flow run heartbeat "
                                   "interval of served runs (PREFECT_FLOWS_HEARTBEAT_"
                                   "FREQUENCY; prefect.yaml sets the same for workers).")
    zombie_seconds: float = Field(90.0, ge=60, description="A flow run without heartbeat "
                                  "this long is marked Crashed by the automation `setup` "
                                  "makes (at least 2 heartbeats).")

    @model_validator(mode="after")
    def _zombie_after_two_heartbeats(self) -> StackSettings:
        if self.zombie_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("PREFECT_ORTHANC_ZOMBIE_SECONDS must be at least twice "
                             "PREFECT_ORTHANC_HEARTBEAT_SECONDS (one late heartbeat is no "
                             "crash)")
        return self

    @field_validator("modality_limits")
    @classmethod
    def _check_limits(cls, value: str) -> str:
        cls.parse_limits(value)
        return value

    @staticmethod
    def parse_limits(value: str) -> dict[str, int]:
        limits: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, _, number = item.partition("=")
            if not name.strip() or not number.strip().isdigit() or int(number) < 1:
                raise ValueError("modality limits are NAME=N[,NAME=N] with N >= 1")
            limits[name.strip()] = int(number)
        return limits

    @property
    def limits(self) -> dict[str, int]:
        return self.parse_limits(self.modality_limits)


async def _ensure_work_pool(name: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
            return f"exists (type {pool.type})"
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(
                name=name, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="prefect-orthanc flows (prefect.yaml)"))
            return "created (type process)"


class SetupError(SafeMessageError, ValueError):
    """``setup`` refused its settings; the message says which and what to fix (no value)."""


def _checked_secret(value: str, block: str, rotate: bool) -> None:
    """Refuse a secret every sharing run would reject, and a silent change of the secret."""
    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    from prefect_orthanc.flows.sharing import MIN_SECRET_LENGTH, SECRET_ENV

    if len(value) < MIN_SECRET_LENGTH:
        raise SetupError(f"{SECRET_ENV} is shorter than {MIN_SECRET_LENGTH} characters: "
                         f"sharing refuses it; use a long random value (e.g. `openssl rand "
                         f"-hex 32`)")
    try:
        current = Secret.load(block).get()
    except (ObjectNotFound, ValueError):
        return
    if current != value and not rotate:
        raise SetupError(f"the Secret block {block} already holds a different secret: "
                         f"replacing it changes every pseudonym and date shift, so new shares "
                         f"no longer match earlier ones or the linkage table; unset "
                         f"{SECRET_ENV}, or run setup with --rotate-secret to replace it")


def setup(settings: StackSettings | None = None, *, rotate_secret: bool = False
          ) -> dict[str, str]:
    """Create or update what the deployments need; returns what was done, by object.

    Checks before it saves anything: the data directory (``SiteError``), the research
    Orthanc's URL and credentials (a ``GET /system`` with them) and the de-identification
    secret (``SetupError``: too short, or different from the saved one without
    ``rotate_secret``)."""
    from prefect.blocks.system import Secret

    from prefect_orthanc.flows.sharing import SECRET_ENV
    from prefect_orthanc.flows.site import SiteSettings
    from prefect_orthanc.orthanc_client import OrthancError
    from prefect_orthanc.tasks import OrthancCredentials, ensure_limits

    settings = settings or StackSettings()
    site = SiteSettings.load()  # SiteError before anything is created: outside the checkout
    credentials = OrthancCredentials.from_env()
    try:
        with credentials.get_client() as orthanc:
            version = orthanc.system().version
    except OrthancError as error:
        raise SetupError(f"the research Orthanc (ORTHANC_URL) refused or did not answer, so "
                         f"no block was saved: {error}") from None
    secret = os.environ.get(SECRET_ENV)
    if secret:
        _checked_secret(secret, settings.secret_block, rotate_secret)
    done: dict[str, str] = {"data directory": f"{site.ensure()} (PREFECT_ORTHANC_DATA_DIR)"}
    done[f"work pool {settings.work_pool}"] = asyncio.run(_ensure_work_pool(settings.work_pool))
    done.update(_server_for_crashes(settings))
    for name, what in asyncio.run(ensure_limits(settings.limits)).items():
        done[f"limit {name}"] = what
    OrthancCredentials.register_type_and_schema()
    credentials.save(settings.credentials_block, overwrite=True)
    done[f"block orthanc-credentials/{settings.credentials_block}"] = (
        f"saved from ORTHANC_* (checked: Orthanc {version} answered)")
    if secret:
        Secret(value=secret).save(settings.secret_block, overwrite=True)
        done[f"block secret/{settings.secret_block}"] = f"saved from {SECRET_ENV}"
    else:
        done[f"block secret/{settings.secret_block}"] = f"skipped: {SECRET_ENV} is not set"
    return done


def _server_for_crashes(settings: StackSettings) -> dict[str, str]:
    """The server's lease storage (reported) and the zombie-run automation (made)."""
    from prefect.client.orchestration import get_client

    from prefect_orthanc.deployments.server_setup import (
        ZOMBIE_AUTOMATION,
        ensure_zombie_automation,
        lease_storage_report,
    )

    with get_client(sync_client=True) as client:
        return {"server lease storage": lease_storage_report(client),
                f"automation {ZOMBIE_AUTOMATION}": ensure_zombie_automation(
                    client, settings.zombie_seconds)}


async def _worker_deployments(names: list[str], delete: bool) -> list[str]:
    """Which of these deployments exist on a work pool (made by ``prefect deploy``); with
    ``delete``, remove them so ``serve`` can own the names."""
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


def serve(only: set[str] | None = None, settings: StackSettings | None = None,
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

    settings = settings or StackSettings()
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


# ------------------------------------------------------------------ watching served deployments
# (the demo, the integration tests and bench/event_latency.py all need these)


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
                raise RuntimeError(f"`python -m prefect_orthanc.deployments serve` exited:\n{_tail(log)}")
            try:
                if all(client.read_deployment_by_name(n).status.value == "READY"
                       for n in names):
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
