"""``prefect deploy --all`` on a real (test) Prefect server: what lands there is what
prefect.yaml says: schedules, concurrency, work pool, parameters and the event trigger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import delete_deployment

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def deployed(lab):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username,
           "ORTHANC_PASSWORD": lab.research.password}
    setup = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-2000:]
    prefect = Path(sys.executable).with_name("prefect")
    deploy = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
    with get_client(sync_client=True) as client:
        deployments = {name: client.read_deployment_by_name(name) for name in (
            "collect-research-cohort/nightly", "share-deidentified/ad-hoc",
            "route-new-study/on-stable-study", "watch-orthanc-changes/research-changes",
            "sweep-failed-routes/every-15-minutes")}
    yield deployments
    with get_client(sync_client=True) as client:  # leave the names free for serve
        for deployment in deployments.values():
            delete_deployment(client, deployment.id)


def test_setup_made_the_work_pool_limits_and_block(deployed):
    from prefect.client.orchestration import get_client

    from prefect_orthanc.tasks import OrthancCredentials

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("orthanc-process")
        assert pool.type == "process"
        assert client.read_global_concurrency_limit_by_name(
            "orthanc-modality-pacs").limit >= 1
    assert OrthancCredentials.load("research").username == "research"


def test_nightly_collection_schedule_and_concurrency(deployed):
    nightly = deployed["collect-research-cohort/nightly"]
    assert nightly.work_pool_name == "orthanc-process"
    [schedule] = nightly.schedules
    assert schedule.active
    assert schedule.schedule.cron == "0 19 * * *" and schedule.schedule.timezone == "UTC"
    # two cohorts at once (the PACS is capped by its own limit, not by this one)
    assert nightly.global_concurrency_limit.limit == 4
    assert nightly.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert nightly.parameters["time_window"] == {
        "start": "19:00", "end": "07:00", "timezone": "UTC", "outside": "stop"}
    assert nightly.parameters["cohort_file"] == "cohorts/research.csv"
    # nothing of the deploy host (its $PWD, its checkout path) is baked into the deployment
    assert nightly.pull_steps == [{"prefect_orthanc.deployments.pull.set_working_directory": {}}]


def test_sharing_is_ad_hoc_with_a_form(deployed):
    sharing = deployed["share-deidentified/ad-hoc"]
    assert sharing.schedules == []
    assert sharing.enforce_parameter_schema
    form = sharing.parameter_openapi_schema
    # flat parameters, what to share first, each described; named SOP classes in the profile
    order = sorted(form["properties"], key=lambda name: form["properties"][name]["position"])
    assert order[:4] == ["project", "study_ids", "destination", "profile"]
    assert all(p.get("description") for p in form["properties"].values())
    definitions = form.get("definitions", form.get("$defs", {}))
    sop_classes = definitions["DeidProfile"]["properties"]["exclude_sop_classes"]
    assert "SecondaryCaptureImageStorage" in sop_classes["items"]["enum"]
    assert sharing.parameters["project"] == "research"


def test_new_study_trigger_became_an_automation(deployed):
    from prefect.client.orchestration import get_client

    route = deployed["route-new-study/on-stable-study"]
    with get_client(sync_client=True) as client:
        automations = client.request("POST", "/automations/filter", json={}).json()
    mine = [a for a in automations
            if any(action.get("deployment_id") == str(route.id) for action in a["actions"])]
    assert len(mine) == 1
    trigger, action = mine[0]["trigger"], mine[0]["actions"][0]
    assert trigger["expect"] == ["orthanc.study.stable"]
    assert trigger["match"] == {"prefect.resource.id": "orthanc.research.study.*"}
    assert trigger["posture"] == "Reactive" and trigger["threshold"] == 1
    assert action["type"] == "run-deployment"
    assert action["parameters"] == {"study_id": "{{ event.payload.study_id }}"}
    watcher = deployed["watch-orthanc-changes/research-changes"]
    assert watcher.schedules[0].schedule.interval.total_seconds() == 600
    assert watcher.global_concurrency_limit.limit == 1
    sweep = deployed["sweep-failed-routes/every-15-minutes"]
    assert sweep.schedules[0].schedule.interval.total_seconds() == 900
    assert sweep.global_concurrency_limit.limit == 1 and sweep.parameters == {
        "lookback_hours": 24}


def test_serve_refuses_to_take_over_worker_deployments(deployed):
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    served = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "serve",
                             "--only", "nightly"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert served.returncode != 0
    assert "made by `prefect deploy` for a worker" in served.stderr
    assert "collect-research-cohort/nightly (work pool orthanc-process)" in served.stderr


def test_a_worker_elsewhere_runs_a_partial_override_from_its_own_code(deployed, tmp_path):
    """A process worker started outside the checkout: the pull step finds the code the
    worker's Python imports (nothing of the deploy host baked in), the run's one override
    (project) merges with the deployment's other parameters, relative paths land in the
    worker's data directory, and selecting nothing ends Completed with a warning."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from prefect_orthanc.flows.sharing import SECRET_ENV

    from .conftest import DEID_SECRET

    run = run_deployment("share-deidentified/ad-hoc", timeout=0,
                         parameters={"project": "nothing-collected", "secret_block": None})
    data_dir = tmp_path / "worker-data"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           SECRET_ENV: DEID_SECRET, "PREFECT_ORTHANC_DATA_DIR": str(data_dir)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prefect = Path(sys.executable).with_name("prefect")
    worker = subprocess.run([str(prefect), "worker", "start", "--pool", "orthanc-process",
                             "--run-once"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=240)
    with get_client(sync_client=True) as client:
        final = client.read_flow_run(run.id)
    assert final.state.is_completed(), (final.state.message,
                                        (worker.stdout + worker.stderr)[-3000:])
    assert final.state.message.startswith(
        "WARNING: no study selected: project 'nothing-collected'")
    assert final.parameters["project"] == "nothing-collected"
    assert final.parameters["destination"] == {"kind": "directory", "target": "shared"}
    assert final.parameters["linkage_path"] == "linkage/linkage.csv"
    assert not (REPO / "shared").exists() and not (elsewhere / "shared").exists()
