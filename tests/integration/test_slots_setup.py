"""What ``setup`` does on the server for crashes and restarts (deployments.server_setup): it
says whether leases survive a restart, makes the zombie-run automation once, and that
automation marks a run Crashed when its heartbeats stop (real server, real trigger)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_setup_reports_the_lease_storage_and_makes_the_zombie_automation_once():
    from prefect.client.orchestration import get_client

    from prefect_orthanc.deployments.server_setup import (
        FILESYSTEM_LEASES,
        LEASE_STORAGE_ENV,
        ZOMBIE_AUTOMATION,
        lease_storage_report,
    )
    from prefect_orthanc.deployments.settings import DeploymentSettings
    from prefect_orthanc.deployments.setup import _server_for_crashes

    with get_client(sync_client=True) as client:
        report = lease_storage_report(client)
        # the suite's server keeps leases in memory (Prefect's default)
        assert "LOST when the server restarts" in report
        assert f"{LEASE_STORAGE_ENV}={FILESYSTEM_LEASES}" in report
        assert "every 15 s" in report  # the repossessor's loop, read from the server
        first = _server_for_crashes(DeploymentSettings())
        again = _server_for_crashes(DeploymentSettings())
        assert first[f"automation {ZOMBIE_AUTOMATION}"].startswith(("created", "up to date"))
        assert again[f"automation {ZOMBIE_AUTOMATION}"].startswith("up to date")
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        assert len(found) == 1 and found[0].enabled
        assert found[0].trigger.within.total_seconds() == 90
        assert found[0].actions[0].state.value == "CRASHED"


def test_the_zombie_automation_crashes_a_run_whose_heartbeats_stopped():
    """A run of ours (tagged) that sent one heartbeat and then nothing (its host died) is
    Crashed within the automation's bound (10 s here, Prefect's minimum; 90 s in
    production); another flow's run on the same server (untagged: Prefect's default
    heartbeat is every 180 s) is left alone."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Running

    from prefect_orthanc.deployments.server_setup import ensure_zombie_automation

    @flow(name="slot-zombie-probe")
    def probe() -> None:
        pass

    name = f"zombie-test-{uuid.uuid4().hex[:8]}"
    tag = f"{name}-tag"  # this test's own: no other run on the session's server is watched
    with get_client(sync_client=True) as client:
        ensure_zombie_automation(client, 10, name=name, tag=tag)
        try:
            ours = client.create_flow_run(probe, tags=[tag])
            other = client.create_flow_run(probe, tags=["someone-else"])
            for run in (ours, other):
                client.set_flow_run_state(run.id, Running(), force=True)
            time.sleep(1)  # the automation's trigger is loaded by the server's triggers service
            client.request("POST", "/events", json=[{
                "id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(),
                "event": "prefect.flow-run.heartbeat",
                "resource": {"prefect.resource.id": f"prefect.flow-run.{run.id}"},
                "related": [{"prefect.resource.id": f"prefect.tag.{t}",
                             "prefect.resource.role": "tag"} for t in run.tags],
                "payload": {}} for run in (ours, other)])
            beat = time.monotonic()
            state = None
            while time.monotonic() - beat < 45:
                state = client.read_flow_run(ours.id).state
                if state.type.value == "CRASHED":
                    break
                time.sleep(0.5)
            crashed_after = time.monotonic() - beat
            print(f"\nzombie run marked Crashed {crashed_after:.1f} s after its last heartbeat "
                  f"(automation bound 10 s)")
            assert state is not None and state.type.value == "CRASHED", state
            assert "No heartbeat for 10 s" in (state.message or "")
            assert crashed_after >= 9
            time.sleep(3)  # the other run's bound passed as long ago as ours, plus 3 s
            assert client.read_flow_run(other.id).state.type.value == "RUNNING"
        finally:
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)
            for run in (locals().get("ours"), locals().get("other")):
                if run is not None:
                    client.set_flow_run_state(run.id, Cancelled(), force=True)
