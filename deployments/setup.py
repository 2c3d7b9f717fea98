"""``setup()``: what the deployments need on the Prefect server, created from settings.

Idempotent: it checks and creates the site's data directory (``PREFECT_ORTHANC_DATA_DIR``,
refused inside the checkout: ``flows.site``), creates (or updates) the process work pool,
reports whether the server's concurrency leases survive a restart and makes the automation that
marks runs whose heartbeats stopped Crashed (``deployments.server_setup``), one global
concurrency limit per PACS (``orthanc-modality-<name>``), the ``OrthancCredentials`` block for
the research Orthanc (from ``ORTHANC_*``) and, when ``PREFECT_ORTHANC_DEID_SECRET`` is set, the
Secret block holding the de-identification secret. Settings: ``deployments.settings``.

    python -m prefect_orthanc.deployments setup   # limits: PREFECT_ORTHANC_MODALITY_LIMITS=pacs=2
"""

from __future__ import annotations

import asyncio
import os
from typing import cast

from prefect_orthanc.deployments.settings import DeploymentSettings
from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["SetupError", "setup"]


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
        current = cast("Secret[str]", Secret.load(block)).get()  # synchronous: the block
    except (ObjectNotFound, ValueError):
        return
    if current != value and not rotate:
        raise SetupError(f"the Secret block {block} already holds a different secret: "
                         f"replacing it changes every pseudonym and date shift, so new shares "
                         f"no longer match earlier ones or the linkage table; unset "
                         f"{SECRET_ENV}, or run setup with --rotate-secret to replace it")


def setup(settings: DeploymentSettings | None = None, *, rotate_secret: bool = False
          ) -> dict[str, str]:
    """Create or update what the deployments need; returns what was done, by object.

    Checks before it saves anything: that ``PREFECT_API_URL`` names a Prefect server
    (``SetupError`` otherwise: Prefect would start a temporary server for this process, and
    everything setup made would vanish when it exits), the data directory (``SiteError``),
    the research Orthanc's URL and credentials (a ``GET /system`` with them) and the
    de-identification secret (``SetupError``: too short, or different from the saved one without
    ``rotate_secret``)."""
    from prefect.blocks.system import Secret

    from prefect_orthanc.flows.sharing import SECRET_ENV
    from prefect_orthanc.flows.site import SiteSettings
    from prefect_orthanc.orthanc_client import OrthancError
    from prefect_orthanc.tasks import OrthancCredentials, ensure_limits

    _require_api_url()
    settings = settings or DeploymentSettings()
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


def _require_api_url() -> None:
    """``SetupError`` unless a Prefect server is named (environment or Prefect profile)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise SetupError("PREFECT_API_URL is not set, so setup would configure a temporary "
                         "Prefect server that vanishes when it exits: start `prefect server "
                         "start` and set PREFECT_API_URL=http://127.0.0.1:4200/api (or `prefect "
                         "config set PREFECT_API_URL=...`), then run setup again")


def _server_for_crashes(settings: DeploymentSettings) -> dict[str, str]:
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
