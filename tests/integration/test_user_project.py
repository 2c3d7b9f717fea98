"""The user's situation: ``pip install prefect-orthanc`` into a Prefect project of their own.

The suite builds the wheel and installs it into a fresh virtualenv inside a temporary "user
project" laid out the way Prefect's tutorials lay one out: its own ``tasks.py`` and ``flows/``
package (the names this project's modules once took at the top of site-packages, which made
``from tasks import ...`` and Prefect's collection loader pick up the wrong module). From that
project, with the venv's own Python and Prefect CLI only (no checkout on any path):

- the block and a task import, the ``prefect.collections`` entry point loads
  ``prefect_orthanc.tasks`` (not the user's ``tasks.py``), ``prefect block register`` registers
  the block type;
- ``python -m prefect_orthanc.deployments init | setup | check | serve`` work from the
  wheel, and ``stack`` says in one line that it is checkout tooling;
- ``prefect deploy --all`` of the user's prefect.yaml (the shipped template plus a flow of the
  user's own that calls this project's tasks and the user's ``tasks.py``) and a process worker
  from the venv run both flows against the lab: the cohort's studies arrive in research, and
  the user's flow reports what it found.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from prefect_orthanc.deployments.lab.processes import stop_group
from prefect_orthanc.deployments.lab.runs import wait_until_served

from .conftest import delete_deployment

REPO = Path(__file__).resolve().parents[2]
POOL = "clinic-pool"  # the user's own work pool: no other test's runs reach this worker
BLOCK = "clinic-research"  # the user's OrthancCredentials block, made by `setup`
COLLECT = "collect-research-cohort/clinic-cohorts"
AUDIT = "audit-research/nightly-audit"
RUN_BOUND = 150  # seconds for a run to be picked up and finish
INSTALL_SECONDS: dict[str, float] = {}  # measured, printed by the first test (-s shows it)

pytestmark = pytest.mark.usefixtures("prefect_server")

USER_TASKS = '''\
"""The clinic's own tasks: the module name every Prefect tutorial uses."""
from prefect import task


@task
def summarise(study_ids: list[str], pacs_answered: bool) -> dict:
    return {"studies": len(study_ids), "pacs_answered": pacs_answered,
            "summarised_by": "clinic tasks.py"}
'''

USER_FLOW = '''\
"""A flow of the clinic's own, calling prefect-orthanc's tasks and its own tasks.py."""
import json

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from prefect_orthanc.tasks import OrthancCredentials, echo_modality, find_resource_ids
from tasks import summarise


@flow(name="audit-research")
def audit_research(credentials_block: str, modality: str = "pacs") -> dict:
    credentials = OrthancCredentials.load(credentials_block)
    answered = echo_modality(credentials, modality)
    summary = summarise(find_resource_ids(credentials, "Study"), answered)
    create_markdown_artifact(json.dumps(summary), key="research-audit")
    return summary
'''

# run inside the user's venv, from the user's project directory
IMPORT_CHECK = '''\
import json, os

import flows
import tasks
from prefect.plugins import load_prefect_collections

from prefect_orthanc.deployments.pull import set_working_directory
from prefect_orthanc.tasks import OrthancCredentials, find_resource_ids

collections = load_prefect_collections()
print(json.dumps({
    "user_tasks": tasks.__file__, "user_flows": flows.__file__,
    "block": OrthancCredentials.get_block_type_slug(),
    "task": find_resource_ids.name, "task_module": find_resource_ids.fn.__module__,
    "collection": getattr(collections.get("prefect_orthanc"), "__name__", None),
    "collection_file": getattr(collections.get("prefect_orthanc"), "__file__", None),
    "pull": set_working_directory(), "cwd": os.getcwd(),
}))
'''


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def user_project(built_wheel, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the project, its venv's bin directory, the environment its commands run with)"""
    from prefect.settings import PREFECT_API_URL

    project = tmp_path_factory.mktemp("user") / "clinic-etl"
    (project / "flows").mkdir(parents=True)
    (project / "tasks.py").write_text(USER_TASKS)
    (project / "flows" / "__init__.py").write_text("")
    (project / "flows" / "audit.py").write_text(USER_FLOW)
    data = project.parent / "clinic-data"
    (data / "cohorts").mkdir(parents=True)

    # A fresh venv, installed into by the suite's own pip (`--python`: no pip bootstrapped
    # into the venv) from pip's cache, without byte-compiling (Python does it on first
    # import): the same packages a user's `pip install` gets, in about half the time.
    started = time.monotonic()
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(project / ".venv")], project,
             dict(os.environ)))
    bin_dir = project / ".venv" / "bin"
    # nothing of this checkout or of the suite's venv on any path: only the installed wheel
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "VIRTUAL_ENV": str(project / ".venv"),
                "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                "PREFECT_ORTHANC_DATA_DIR": str(data)})
    _ok(_run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install",
              "-q", "--no-compile", str(built_wheel)], project, env, timeout=600))
    INSTALL_SECONDS["venv + pip install"] = round(time.monotonic() - started, 1)
    return project, bin_dir, env


def test_the_wheel_holds_only_the_namespace_and_its_data(built_wheel):
    names = zipfile.ZipFile(built_wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"prefect_orthanc"}, tops
    assert not [n for n in names if n.startswith(("prefect_orthanc/deployments/lab/",
                                                  "prefect_orthanc/deployments/multihost/"))]
    assert not [n for n in names if n.startswith("prefect_orthanc/") and
                n.split("/")[1] not in {"orthanc_client", "tasks", "flows", "deployments"}]
    wheel = zipfile.ZipFile(built_wheel)
    # the template is the repository's prefect.yaml, byte for byte (one source of truth)
    assert wheel.read("prefect_orthanc/deployments/prefect.yaml") == \
        (REPO / "prefect.yaml").read_bytes()
    assert wheel.read("prefect_orthanc/deployments/orthanc/study_events.lua") == \
        (REPO / "deployments" / "orthanc" / "study_events.lua").read_bytes()
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "prefect_orthanc = prefect_orthanc.tasks" in wheel.read(entry_points).decode()
    # PEP 561: a user's type checker reads the annotations of every package
    assert {f"prefect_orthanc/{p}/py.typed" for p in
            ("orthanc_client", "tasks", "flows", "deployments")} <= set(names)


USERS_TYPED_FLOW = """
from prefect import flow

from prefect_orthanc.flows.collection import CollectionReport, collect_cohort
from prefect_orthanc.orthanc_client import RetrieveResult
from prefect_orthanc.tasks import OrthancCredentials, retrieve_study


@flow
def pull(uids: list[str]) -> list[RetrieveResult]:
    creds = OrthancCredentials.from_env()
    futures = [retrieve_study.submit(creds, "pacs", uid) for uid in uids]
    return [future.result() for future in futures]


def nightly() -> int:
    report: CollectionReport = collect_cohort(cohort_file="cohorts/lung.csv",
                                              credentials_block="research")
    return report.studies_complete


def wrong(creds: OrthancCredentials) -> None:
    retrieve_study.submit(creds, 42, "1.2.3")  # wrong: the modality is a name
"""


def test_a_users_type_checker_sees_the_packages_types(user_project):
    """mypy (the suite's) checks a user's module against the installed wheel
    (``--python-executable``: what the user's own mypy would see): tasks keep their
    ``Task[P, R]`` signature through ``.submit``, and calling a flow gives its report."""
    project, bin_dir, env = user_project
    (project / "typed_use.py").write_text(USERS_TYPED_FLOW)
    checked = _run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                    "--python-executable", str(bin_dir / "python"), "typed_use.py"],
                   project, env)
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, checked.stdout
    wrong = USERS_TYPED_FLOW.splitlines().index(
        '    retrieve_study.submit(creds, 42, "1.2.3")  # wrong: the modality is a name') + 1
    assert errors[0].startswith(f"typed_use.py:{wrong}:") and "call-overload" in errors[0], errors


def test_installed_next_to_the_users_tasks_and_flows(user_project, lab):
    project, bin_dir, env = user_project
    print(f"\nuser venv: {INSTALL_SECONDS}")
    python = str(bin_dir / "python")
    found = json.loads(_ok(_run([python, "-c", IMPORT_CHECK], project, env)))
    site = Path(found["collection_file"]).parents[1]
    assert found["user_tasks"] == str(project / "tasks.py")
    assert found["user_flows"] == str(project / "flows" / "__init__.py")
    assert found["collection"] == "prefect_orthanc.tasks"
    assert site.name == "prefect_orthanc" and site.parent.name == "site-packages"
    assert str(project / ".venv") in str(site)
    assert found["block"] == "orthanc-credentials"
    assert found["task_module"].startswith("prefect_orthanc.tasks.")
    # installed, the pull step leaves the run where its worker put it
    assert found["pull"] == {"directory": str(project)} and found["cwd"] == str(project)

    registered = _ok(_run([str(bin_dir / "prefect"), "--no-prompt", "block", "register", "-m",
                           "prefect_orthanc.tasks"], project, env))
    assert "Successfully registered 1 block" in registered, registered
    assert "Orthanc Credentials" in registered, registered

    stack = _run([python, "-m", "prefect_orthanc.deployments", "stack", "status"], project,
                 env)
    assert stack.returncode == 2 and stack.stdout == ""
    assert len(stack.stderr.strip().splitlines()) == 1, stack.stderr
    assert "checkout" in stack.stderr and "Traceback" not in stack.stderr

    written = _ok(_run([python, "-m", "prefect_orthanc.deployments", "init"], project, env))
    assert (project / "prefect.yaml").read_bytes() == (REPO / "prefect.yaml").read_bytes()
    assert (project / "orthanc" / "study_events.lua").is_file(), written


def _users_prefect_yaml(project: Path) -> None:
    """What the user does with the template: keep the collection (their work pool, their
    block, no schedule in this test) and add a deployment of their own flow, whose pull step
    says where their code is on the worker (this project's step cannot know that)."""
    path = project / "prefect.yaml"
    spec = yaml.safe_load(path.read_text())
    [collect] = [d for d in spec["deployments"]
                 if d["entrypoint"] == "prefect_orthanc.flows.collection:collect_cohort"]
    collect.update(name="clinic-cohorts", schedules=[])
    collect["work_pool"] = {**collect["work_pool"], "name": POOL}
    collect["parameters"]["credentials_block"] = BLOCK
    audit = {"name": "nightly-audit", "entrypoint": "flows/audit.py:audit_research",
             "tags": ["prefect-orthanc", "clinic"], "parameters": {"credentials_block": BLOCK},
             "pull": [{"prefect.deployments.steps.set_working_directory":
                       {"directory": str(project)}}],
             "work_pool": {"name": POOL}}
    spec["deployments"] = [collect, audit]
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture(scope="module")
def user_worker(user_project, lab) -> Iterator[Path]:
    """``setup``, ``check`` and ``prefect deploy --all`` from the user's project, then a
    process worker from the user's venv; yields the worker's log."""
    from prefect.client.orchestration import get_client

    project, bin_dir, env = user_project
    if not (project / "prefect.yaml").exists():
        _ok(_run([str(bin_dir / "python"), "-m", "prefect_orthanc.deployments", "init"],
                 project, env))
    _users_prefect_yaml(project)
    python, prefect = str(bin_dir / "python"), str(bin_dir / "prefect")
    setup = _ok(_run([python, "-m", "prefect_orthanc.deployments", "setup"], project, {
        **env, "ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username,
        "ORTHANC_PASSWORD": lab.research.password, "PREFECT_ORTHANC_WORK_POOL": POOL,
        "PREFECT_ORTHANC_CREDENTIALS_BLOCK": BLOCK,
        "PREFECT_ORTHANC_SECRET_BLOCK": "clinic-deid-secret"}))
    assert f"work pool {POOL}: created" in setup, setup
    assert f"block orthanc-credentials/{BLOCK}: saved" in setup, setup
    checked = _ok(_run([python, "-m", "prefect_orthanc.deployments", "check", "--file",
                        "prefect.yaml"], project, env))
    assert COLLECT in checked and AUDIT in checked, checked
    # `serve` from the wheel takes the user's file (their own flow included) until stopped;
    # then `prefect deploy` gives the same deployments to the work pool
    served_log = project.parent / "serve.log"
    with served_log.open("wb") as out:
        served = subprocess.Popen([python, "-m", "prefect_orthanc.deployments", "serve",
                                   "--file", "prefect.yaml"], cwd=project, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_served([COLLECT, AUDIT], served, served_log, timeout=120)
    finally:
        stop_group(served)
    _ok(_run([prefect, "--no-prompt", "deploy", "--all"], project, env))

    log = project.parent / "worker.log"
    with log.open("wb") as out:
        # polling every second (default 10 s) picks each run up at once
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", POOL, "--limit", "2"],
                                  cwd=project, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield log
    finally:
        stop_group(worker)
        with get_client(sync_client=True) as client:
            for name in (COLLECT, AUDIT):
                delete_deployment(client, client.read_deployment_by_name(name).id)


def _final(run_id, log: Path):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_BOUND
    while True:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
        if run.state and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            pytest.fail(f"run not finished in {RUN_BOUND} s: {run.state}\n"
                        + log.read_text(errors="replace")[-3000:])
        time.sleep(1)


def test_the_users_deployments_run_on_the_lab(user_project, user_worker, research,
                                              loaded_pacs, cohort):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.deployments import run_deployment

    _, _, env = user_project
    data = Path(env["PREFECT_ORTHANC_DATA_DIR"])
    studies = cohort.studies[4:6]
    for study in studies:
        research.delete_many(research.find("Study", {"StudyInstanceUID": study.study_uid}))
    with (data / "cohorts" / "clinic.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid"])
        writer.writerows([s.study_uid] for s in studies)

    before = len(research.find("Study", {}))
    # both at once (the worker's --limit 2): the audit counts research while studies arrive
    started = [run_deployment(COLLECT, timeout=0, parameters={
        "cohort_file": "cohorts/clinic.csv", "project": "clinic", "time_window": None}),
        run_deployment(AUDIT, timeout=0)]
    collected, audited = (_final(run.id, user_worker) for run in started)
    assert collected.state.is_completed(), collected.state
    for study in studies:  # the studies arrived in research, every instance
        assert len(research.find("Study", {"StudyInstanceUID": study.study_uid})) == 1
        assert len(research.find("Instance", {"StudyInstanceUID": study.study_uid})) == \
            len(study.files)
    with (data / "cohorts" / "clinic.report.csv").open() as handle:
        assert [r["result_status"] for r in csv.DictReader(handle)] == ["collected"] * 2

    assert audited.state.is_completed(), audited.state
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["research-audit"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[audited.id])))
    summary = json.loads(artifact.data)
    assert summary.pop("studies") in range(before, before + len(studies) + 1)
    assert summary == {"pacs_answered": True, "summarised_by": "clinic tasks.py"}
    assert "Traceback" not in user_worker.read_text(errors="replace")
