"""``serve --replace`` deletes the deployments ``prefect deploy`` made for a worker and the
automations their triggers made, so no automation is left running a deployment that is gone
(found by a tester: ``on-stable-study__automation_1`` failed with a 404 on every event). The
deployment and its automations are made with Prefect 3.9.1's own ``prefect deploy`` code
(``prefect.cli.deploy._triggers``), on the suite's real Prefect server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

FLOW = "route-new-study"
NAME = "replace-test"
TRIGGER = {"type": "event", "enabled": True, "expect": ["orthanc.study.stable"],
           "match": {"prefect.resource.id": "orthanc.research.study.*"},
           "for_each": ["prefect.resource.id"], "posture": "Reactive", "threshold": 1,
           "within": 0, "parameters": {"study_id": "{{ event.payload.study_id }}"}}


async def _deploy_as_prefect_deploy_does() -> tuple[object, object]:
    from prefect.automations import Automation
    from prefect.cli.deploy._triggers import (
        _create_deployment_triggers,
        _initialize_deployment_triggers,
    )
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.events.actions import DoNothing
    from prefect.events.schemas.automations import EventTrigger
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        with contextlib.suppress(ObjectAlreadyExists):
            await client.create_work_pool(WorkPoolCreate(name="replace-test-pool",
                                                         type="process"))
        flow_id = await client.create_flow_from_name(FLOW)
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name=NAME, work_pool_name="replace-test-pool",
            entrypoint="prefect_orthanc.flows.routing:route_new_study")
        triggers = _initialize_deployment_triggers(NAME, [dict(TRIGGER), dict(TRIGGER)])
        await _create_deployment_triggers(client, deployment_id, list(triggers))
    other = await Automation(name="replace-test-unrelated", trigger=EventTrigger(
        expect={"replace.test"}), actions=[DoNothing()]).acreate()
    return deployment_id, other.id


def test_replace_deletes_the_deployments_automations_and_nothing_else():
    from prefect.client.orchestration import get_client

    from prefect_orthanc.deployments.serve import _worker_deployments

    deployment_id, unrelated = asyncio.run(_deploy_as_prefect_deploy_does())
    with get_client(sync_client=True) as client:
        owned = client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")
        assert sorted(a.name for a in owned) == [f"{NAME}__automation_1",
                                                 f"{NAME}__automation_2"]
    found = asyncio.run(_worker_deployments([f"{FLOW}/{NAME}"], delete=True))
    assert found == [f"{FLOW}/{NAME} (work pool replace-test-pool)"]
    with get_client(sync_client=True) as client:
        names = {a.name for a in client.read_automations()}
        assert not {n for n in names if n.startswith(f"{NAME}__automation_")}
        assert client.read_resource_related_automations(
            f"prefect.deployment.{deployment_id}") == []
        assert "replace-test-unrelated" in names  # only the deployment's own went
        client.delete_automation(unrelated)
