"""README's deploy path with a worker elsewhere: ``prefect deploy`` from this checkout, a
process worker started with ``--limit 2`` in another directory, running the package installed
at another path (the wheel, ``pip install --target``, named by ``PYTHONPATH``, as on another
host). Two cohort runs of the shipped collection deployment (its own concurrency limit, pull
step and parameters) run at the same time there, and the code that ran is that install's."""

from __future__ import annotations

import contextlib
import copy
import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from prefect_orthanc.deployments.lab.processes import stop_group

from .conftest import delete_deployment

REPO = Path(__file__).resolve().parents[2]
POOL = "orthanc-scaleout"  # a pool of its own: no other test's runs reach this worker
NAME = "collect-research-cohort/scaleout"
RUN_BOUND = 180  # seconds for both runs to be picked up and finish

pytestmark = pytest.mark.usefixtures("prefect_server")


def _install_elsewhere(wheel: Path, dest: Path) -> Path:
    """What a worker host needs: the package (no checkout, no prefect.yaml, no venv of ours;
    its dependencies are the worker's Python's). Returns the installed package directory."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(dest), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dest / "prefect_orthanc"


def _derived_yaml(tmp: Path) -> Path:
    """The shipped nightly collection as ``scaleout``: unscheduled, on its own pool, reading
    the research Orthanc from the worker's ORTHANC_* environment; all else as shipped."""
    shipped = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [nightly] = [copy.deepcopy(d) for d in shipped["deployments"]
                 if d["entrypoint"].endswith(":collect_cohort")]
    nightly["name"], nightly["schedules"] = "scaleout", []
    nightly["work_pool"] = {**nightly["work_pool"], "name": POOL}
    nightly["parameters"]["credentials_block"] = None
    shipped["deployments"] = [nightly]
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(shipped, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def remote_worker(lab, built_wheel, tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """(the installed package the worker runs, the worker's data directory, its log)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    tmp = tmp_path_factory.mktemp("scaleout")
    site = tmp / "other-host" / "opt" / "prefect-orthanc"
    project = _install_elsewhere(built_wheel, site)
    data, elsewhere = tmp / "site-data", tmp / "worker-cwd"
    (data / "cohorts").mkdir(parents=True)
    elsewhere.mkdir()
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    api = str(PREFECT_API_URL.value())
    prefect = str(Path(sys.executable).with_name("prefect"))
    deploy = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file",
                             str(_derived_yaml(tmp))], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PREFECT_API_URL": api}, timeout=300)
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
    env = {**os.environ, "PREFECT_API_URL": api, "PWD": str(elsewhere),
           "PYTHONPATH": str(site), "PREFECT_ORTHANC_DATA_DIR": str(data),
           "ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username,
           "ORTHANC_PASSWORD": lab.research.password,
           # polls every second (default 10 s): the two runs below are due at one instant
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = tmp / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--limit", "2"],
                                  cwd=elsewhere, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield project, data, log
    finally:
        stop_group(worker)
        with get_client(sync_client=True) as client:
            delete_deployment(client, client.read_deployment_by_name(NAME).id)


def _wait_final(run_ids: list, log: Path) -> list:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_BOUND
    while True:
        with get_client(sync_client=True) as client:
            runs = [client.read_flow_run(run_id) for run_id in run_ids]
        if all(r.state and r.state.is_final() for r in runs):
            return runs
        if time.monotonic() > deadline:
            pytest.fail(f"runs not finished in {RUN_BOUND} s: {[r.state for r in runs]}\n"
                        + log.read_text(errors="replace")[-3000:])
        time.sleep(1)


def _cohort(path: Path, studies) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid"])
        writer.writerows([s.study_uid] for s in studies)


def test_two_cohorts_run_at_once_on_a_worker_elsewhere(remote_worker, research, loaded_pacs,
                                                       cohort):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from prefect_orthanc.tasks.limits import limit_name
    from prefect_orthanc.tasks.slots import hold

    project, data, log = remote_worker
    cohorts = {"a": cohort.studies[0:3], "b": cohort.studies[3:6]}
    for name, studies in cohorts.items():
        for study in studies:
            research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
        _cohort(data / "cohorts" / f"{name}.csv", studies)
    # "at once" without a race: this test holds both of the PACS' slots, so each run, once
    # started, waits at its first C-FIND; the slots are given back only when both runs are
    # Running together on the worker. A worker (or a deployment limit) letting one run at a
    # time never gets there: the second stays Scheduled behind a first that cannot end.
    with contextlib.ExitStack() as slots:
        for _ in range(2):
            slots.enter_context(hold(limit_name("pacs"), wait=60))
        started = [run_deployment(NAME, timeout=0, parameters={
            "cohort_file": f"cohorts/{name}.csv", "project": f"scale-{name}",
            "time_window": None, "concurrency": 1}) for name in cohorts]
        deadline = time.monotonic() + RUN_BOUND
        while True:
            with get_client(sync_client=True) as client:
                states = [client.read_flow_run(r.id).state for r in started]
            if all(s and s.is_running() for s in states):
                break
            assert not any(s and s.is_final() for s in states), states
            if time.monotonic() > deadline:
                pytest.fail(f"the two runs were never Running at once in {RUN_BOUND} s: "
                            f"{states}\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
    runs = _wait_final([r.id for r in started], log)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    first, second = runs
    assert first.start_time < second.end_time and second.start_time < first.end_time, (
        first.start_time, first.end_time, second.start_time, second.end_time)
    for name in cohorts:
        with (data / "cohorts" / f"{name}.report.csv").open() as handle:
            assert [r["result_status"] for r in csv.DictReader(handle)] == ["collected"] * 3

    # the code that ran is that install's: a report_dir inside it is refused as "inside the
    # installed package <there>" (the deploy host's checkout would not refuse it)
    (proof,) = _wait_final([run_deployment(NAME, timeout=0, parameters={
        "cohort_file": "cohorts/a.csv", "report_dir": str(project / "reports")}).id], log)
    assert proof.state.is_failed()
    assert f"is inside the installed package {project}" in proof.state.message, (
        proof.state.message)
    assert "Traceback" not in log.read_text(errors="replace")
