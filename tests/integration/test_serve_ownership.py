"""One runner per deployment, whichever comes first: ``prefect deploy`` of a deployment that
``python -m prefect_orthanc.deployments serve`` is serving makes ``serve`` stop, naming it, so the
worker is its only runner (the other order, serve after deploy, is refused at serve's start:
test_prefect_yaml.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import delete_deployment

REPO = Path(__file__).resolve().parents[2]
SHARING = "share-deidentified/ad-hoc"

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_deploy_while_serving_stops_serve(lab, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from prefect_orthanc.deployments.lab.processes import stop_group
    from prefect_orthanc.deployments.lab.runs import wait_until_served

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PREFECT_ORTHANC_OWNERSHIP_CHECK_SECONDS": "1", "ORTHANC_URL": lab.research.url,
           "ORTHANC_USERNAME": lab.research.username,
           "ORTHANC_PASSWORD": lab.research.password, "PYTHONPATH": str(REPO)}
    setup = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-2000:]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        served = subprocess.Popen([sys.executable, "-m", "prefect_orthanc.deployments", "serve",
                                   "--only", "ad-hoc"], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_served([SHARING], served, log, timeout=90)
        prefect = Path(sys.executable).with_name("prefect")
        deploy = subprocess.run([str(prefect), "--no-prompt", "deploy", "--name", "ad-hoc"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
        deadline = time.monotonic() + 60
        while served.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served.returncode is not None, "serve kept serving a worker's deployment"
        assert served.returncode != 0
        text = log.read_text()
        assert (f"stopped serving: {SHARING} (work pool orthanc-process) were deployed for a "
                "worker while served") in text
    finally:
        stop_group(served)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(SHARING)
            assert deployment.work_pool_name == "orthanc-process"
            delete_deployment(client, deployment.id)
