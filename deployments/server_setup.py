"""What ``setup`` checks and configures on the Prefect server for crashes and restarts.

- **Lease storage**: Prefect keeps concurrency leases in memory unless the server is started
  with ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=``
  ``prefect.server.concurrency.lease_storage.filesystem``.
  In memory, a restart forgets every lease while ``active_slots`` stays counted; the slots
  are still freed (``tasks.slots`` reclaims them from waiters), but the file-based storage
  lets the server's own repossessor free them too. The server's settings are read from
  ``GET /api/admin/settings``; what ``setup`` prints says which storage is in use and the
  exact variable to set on the server.
- **Zombie runs**: a flow run whose process died with its host stays "Running" forever.
  Flow runs emit ``prefect.flow-run.heartbeat`` events every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
  seconds (``serve`` sets it, and prefect.yaml's work pool ``env`` for workers); the
  automation made here marks a run Crashed when no heartbeat (and no final state) follows
  one within ``zombie_seconds`` (3 heartbeats: 90 s by default). It only watches runs tagged
  ``prefect-orthanc`` (``HEARTBEAT_TAG``: every deployment of prefect.yaml carries it), whose
  heartbeats are known to come every 30 s: other flows on the same server keep Prefect's
  default of one heartbeat every 180 s, and a 90 s bound would crash them mid-run.

    python -m prefect_orthanc.deployments setup
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

__all__ = [
    "FILESYSTEM_LEASES",
    "HEARTBEAT_TAG",
    "LEASE_STORAGE_ENV",
    "MEMORY_LEASES",
    "ZOMBIE_AUTOMATION",
    "ensure_zombie_automation",
    "lease_storage_report",
]

LEASE_STORAGE_ENV = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
MEMORY_LEASES = "prefect.server.concurrency.lease_storage.memory"
ZOMBIE_AUTOMATION = "orthanc-crash-zombie-flow-runs"
#: the tag of the runs the zombie automation watches (prefect.yaml puts it on every
#: deployment, whose runs send a heartbeat every 30 s)
HEARTBEAT_TAG = "prefect-orthanc"


def _server_settings(client: Any) -> dict[str, Any]:
    return dict(client.request("GET", "/admin/settings").json())


def lease_storage_report(client: Any) -> str:
    """One line: which lease storage the server uses and whether leases survive a restart
    (with the variable to set when they do not)."""
    try:
        server = _server_settings(client).get("server") or {}
    except Exception as error:
        return (f"unknown (GET /api/admin/settings failed: {type(error).__name__}); set "
                f"{LEASE_STORAGE_ENV}={FILESYSTEM_LEASES} on the server so leases survive "
                f"a restart")
    storage = str((server.get("concurrency") or {}).get("lease_storage") or MEMORY_LEASES)
    repossessor = ((server.get("services") or {}).get("repossessor") or {}).get("loop_seconds")
    every = f"; its repossessor frees expired leases every {repossessor:g} s" \
        if isinstance(repossessor, (int, float)) else ""
    if storage == FILESYSTEM_LEASES:
        return f"{storage}: leases survive a server restart{every}"
    if storage == MEMORY_LEASES:
        return (f"{storage}: leases are LOST when the server restarts (waiting runs still "
                f"reclaim the slots, see docs/concurrency.md); to keep them, start the "
                f"server with {LEASE_STORAGE_ENV}={FILESYSTEM_LEASES}{every}")
    return f"{storage} (custom storage: check it survives a restart){every}"


def _zombie_automation(within_seconds: float, name: str, tag: str) -> Any:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=name,
        description=("Marks a flow run Crashed when its heartbeats stop (its process or host "
                     f"died): no heartbeat and no final state within {within_seconds:g} s "
                     f"of a heartbeat, for runs tagged {tag!r} (heartbeats every 30 s). "
                     "Made by `python -m prefect_orthanc.deployments setup`."),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag",
                                                 "prefect.resource.id": f"prefect.tag.{tag}"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {within_seconds:g} s: its process or host died "
                    f"(marked by the automation {name}).")],
    )


def ensure_zombie_automation(client: Any, within_seconds: float,
                             name: str = ZOMBIE_AUTOMATION, tag: str = HEARTBEAT_TAG) -> str:
    """Create the zombie-run automation, or bring an existing one (same name) up to date;
    returns what was done."""
    automation = _zombie_automation(within_seconds, name, tag)
    found = client.read_automations_by_name(name)
    if not found:
        client.create_automation(automation)
        return f"created: a run without heartbeat for {within_seconds:g} s is marked Crashed"
    client.update_automation(found[0].id, automation)
    for extra in found[1:]:  # two concurrent setups made two: keep one
        client.delete_automation(extra.id)
    return f"up to date: a run without heartbeat for {within_seconds:g} s is marked Crashed"
