"""What `setup` says about the server's lease storage, and the zombie automation it makes
(deployments.server_setup), from the server's settings document as Prefect returns it."""

from __future__ import annotations

import pytest

from prefect_orthanc.deployments.server_setup import (
    FILESYSTEM_LEASES,
    LEASE_STORAGE_ENV,
    MEMORY_LEASES,
    _zombie_automation,
    lease_storage_report,
)


class SettingsAnswer:
    """The part of a Prefect client that `lease_storage_report` uses: GET /admin/settings."""

    def __init__(self, document: dict | Exception) -> None:
        self.document = document

    def request(self, method: str, path: str):
        assert (method, path) == ("GET", "/admin/settings")
        if isinstance(self.document, Exception):
            raise self.document
        document = self.document
        return type("Answer", (), {"json": lambda _self: document})()


def settings(storage: str | None) -> dict:
    concurrency = {"lease_storage": storage} if storage else {}
    return {"server": {"concurrency": concurrency,
                       "services": {"repossessor": {"loop_seconds": 15.0}}}}


def test_memory_storage_is_reported_with_the_variable_to_set():
    report = lease_storage_report(SettingsAnswer(settings(MEMORY_LEASES)))
    assert "LOST when the server restarts" in report
    assert f"{LEASE_STORAGE_ENV}={FILESYSTEM_LEASES}" in report
    assert "every 15 s" in report
    # an older server without the field uses Prefect's default: memory
    assert "LOST" in lease_storage_report(SettingsAnswer(settings(None)))


def test_filesystem_storage_survives_and_errors_still_say_what_to_set():
    assert "survive a server restart" in lease_storage_report(
        SettingsAnswer(settings(FILESYSTEM_LEASES)))
    report = lease_storage_report(SettingsAnswer(PermissionError("403")))
    assert report.startswith("unknown") and LEASE_STORAGE_ENV in report


def test_the_zombie_automation_expects_a_heartbeat_or_a_final_state_per_run():
    automation = _zombie_automation(90, "orthanc-crash-zombie-flow-runs", "prefect-orthanc")
    trigger = automation.trigger
    # only runs of ours: other flows send a heartbeat every 180 s (Prefect's default)
    assert trigger.match_related.root == {"prefect.resource.role": "tag",
                                          "prefect.resource.id": "prefect.tag.prefect-orthanc"}
    assert trigger.posture.value == "Proactive" and trigger.within.total_seconds() == 90
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert automation.actions[0].state.value == "CRASHED"


def test_the_zombie_bound_is_at_least_two_heartbeats():
    from prefect_orthanc.deployments.settings import DeploymentSettings

    settings = DeploymentSettings()
    assert settings.zombie_seconds == 90 and settings.heartbeat_seconds == 30
    with pytest.raises(ValueError, match="ZOMBIE_SECONDS"):
        DeploymentSettings(heartbeat_seconds=60, zombie_seconds=90)
