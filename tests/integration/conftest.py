"""Clients on the lab's two servers, and the synthetic cohort loaded into the pacs."""

from __future__ import annotations

import pytest

from prefect_orthanc.orthanc_client import Orthanc

from .session_checks import phi_hits, server_log_problems


@pytest.fixture(scope="session")
def pacs(lab):
    with Orthanc(url=lab.pacs.url) as client:
        yield client


@pytest.fixture(scope="session")
def research(lab):
    with Orthanc(url=lab.research.url, username=lab.research.username,
                 password=lab.research.password) as client:
        yield client


@pytest.fixture(scope="session")
def loaded_pacs(pacs, cohort):
    """The cohort stored in the pacs server (idempotent: AlreadyStored is fine)."""
    from prefect_orthanc.deployments.lab.synthetic import zip_bytes

    stored = pacs.upload(zip_bytes(cohort.files))
    assert len(stored) == len(cohort.files)
    return pacs


class PacsPeer:
    """One kind of PACS in the lab, as research sees it: its modality name and a way to store
    DICOM into it (Orthanc's REST API, or C-STORE with DCMTK's storescu for dcmqrscp)."""

    def __init__(self, kind: str, modality: str, store_files, workdir):
        self.kind, self.modality, self._store_files, self._workdir = (kind, modality,
                                                                     store_files, workdir)
        self._count = 0

    def store(self, files) -> None:
        self._store_files([str(f) for f in files])

    def store_datasets(self, datasets) -> None:
        """Store pydicom datasets (written to files first for storescu)."""
        paths = []
        for dataset in datasets:
            self._count += 1
            path = self._workdir / f"extra{self._count:05d}.dcm"
            dataset.save_as(path)
            paths.append(path)
        self.store(paths)

    def __repr__(self) -> str:
        return f"PacsPeer({self.kind})"


@pytest.fixture(scope="session")
def loaded_dcmqr(lab, cohort):
    """The cohort stored in dcmqrscp with DCMTK's storescu."""
    lab.dcmqr.load(cohort.files)
    return lab.dcmqr


@pytest.fixture(scope="session", params=["orthanc", "dcmqrscp"])
def pacs_peer(request, lab, cohort, tmp_path_factory):
    """Each PACS kind of the lab, loaded with the synthetic cohort: the collection flow's
    tests run against both."""
    from prefect_orthanc.deployments.lab.synthetic import load_into

    workdir = tmp_path_factory.mktemp(f"peer-{request.param}")
    if request.param == "orthanc":
        request.getfixturevalue("loaded_pacs")
        return PacsPeer("orthanc", "pacs", lambda files: load_into(lab.pacs.url, files),
                        workdir)
    request.getfixturevalue("loaded_dcmqr")
    return PacsPeer("dcmqrscp", "dcmqr", lab.dcmqr.load, workdir)


# ------------------------------------------------------------------ Prefect


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server for the session (``prefect server start`` on SQLite, with all
    of its services: scheduler, triggers, late runs...), with the pacs modality's concurrency
    limits in place (pacs, dcmqr). Yields the ``LocalPrefectServer``; at the end of the session
    its log must hold no traceback from the server's own services (``session_checks``): the
    session then ends with an error at teardown naming them."""
    import asyncio

    import prefect.context
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_DATABASE_CONNECTION_URL,
        temporary_settings,
    )

    from prefect_orthanc.deployments.lab.prefect_server import LocalPrefectServer
    from prefect_orthanc.tasks.limits import ensure_limits

    server = LocalPrefectServer.start(tmp_path_factory.mktemp("prefect-server"), ui=False)
    try:
        # Threads the tests start do not inherit the context variable temporary_settings
        # sets: make these settings the process-global ones too, as prefect_test_harness
        # does, or a flow run in a thread would start an ephemeral server of its own.
        with temporary_settings(updates={
                PREFECT_API_URL: server.api_url,
                PREFECT_SERVER_DATABASE_CONNECTION_URL: server.database_url}), \
                prefect.context._temporary_global_settings_context(
                    prefect.context.get_settings_context()):
            asyncio.run(ensure_limits({"pacs": 2, "dcmqr": 2}))
            yield server
        problems = server_log_problems(server.log_path)
    finally:
        server.stop()
    if problems:
        pytest.fail(problems, pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_phi_left_in_prefect(prefect_server, lab, cohort):
    """At the end of the session: no synthetic patient's identifier, no password and no
    de-identification secret in any file of the session's Prefect home or server database."""
    yield
    needles = ({v for v in cohort.phi_values() if len(v) >= 4}
               | {lab.research.password, DEID_SECRET}
               | {study.study_uid for study in cohort.studies})
    hits = phi_hits(needles)
    if hits:
        pytest.fail(f"PHI or secret found in {len(hits)} places at the end of the session: "
                    f"{sorted({where for where, _ in hits})[:10]}", pytrace=False)


@pytest.fixture
def modality_limit(prefect_server):
    from prefect_orthanc.tasks.limits import ensure_limits

    async def set_limit(modality: str, value: int):
        return await ensure_limits({modality: value})

    return set_limit


@pytest.fixture(scope="session")
def research_creds(lab):
    from prefect_orthanc.tasks import OrthancCredentials

    return OrthancCredentials(url=lab.research.url, username=lab.research.username,
                              password=lab.research.password, retries=1)


@pytest.fixture(scope="session")
def pacs_creds(lab):
    from prefect_orthanc.tasks import OrthancCredentials

    return OrthancCredentials(url=lab.pacs.url)


@pytest.fixture
def flaky_study_factory(pacs, cohort, tmp_path):
    """Upload to the pacs a fresh copy of a cohort study whose first series the research
    server refuses once ("REJECT-ONCE") or always ("REJECT-ALWAYS"), per
    tests/lua/reject_once.lua; returns (StudyInstanceUID, instance count)."""
    import io
    import itertools

    import pydicom
    from pydicom.uid import generate_uid

    counter = itertools.count()

    def make(description: str = "REJECT-ONCE", peer=None):
        """``peer``: a ``PacsPeer`` to store into instead of the Orthanc pacs."""
        datasets = []
        source = cohort.studies[0]
        study_uid, patient_id = generate_uid(), f"FLAKY{next(counter)}"
        series_uids: dict[str, str] = {}
        for path in source.files:
            dataset = pydicom.dcmread(path)
            first_series = dataset.SeriesInstanceUID == source.series[0][0]
            dataset.StudyInstanceUID = study_uid
            dataset.SeriesInstanceUID = series_uids.setdefault(dataset.SeriesInstanceUID,
                                                               generate_uid())
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            dataset.PatientID = patient_id
            if first_series:
                dataset.SeriesDescription = description
            if peer is not None:
                datasets.append(dataset)
                continue
            buffer = io.BytesIO()
            dataset.save_as(buffer)
            pacs.upload(buffer.getvalue())
        if peer is not None:
            peer.store_datasets(datasets)
        return study_uid, len(source.files)

    return make


@pytest.fixture
def flaky_study(flaky_study_factory):
    return flaky_study_factory()


#: the de-identification secret used by the sharing tests (the PHI scan looks for it too)
DEID_SECRET = "test-only-deid-secret-7c41f0a2"


def delete_deployment(client, deployment_id) -> None:
    """Delete a test's deployment the way a test must: first end its runs that are not final
    (a serve or worker stopped by the test can leave them Running), then delete it. A run
    left Running outlives its deployment, and the zombie automation `setup` made crashes it
    later; with the deployment and its concurrency limit gone, Prefect's server answers that
    state change with a 500 and a traceback in its log (``_release_concurrency_lease``)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    unfinished = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
        not_any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED,
                  StateType.CANCELLED])))
    for run in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=unfinished, limit=200):
        client.set_flow_run_state(run.id, Cancelled(message="the test deleting its "
                                                            "deployment"), force=True)
    client.delete_deployment(deployment_id)


@pytest.fixture
def secret_env(monkeypatch):
    """The de-identification secret in the environment, as sharing reads it."""
    from prefect_orthanc.flows.sharing import SECRET_ENV

    monkeypatch.setenv(SECRET_ENV, DEID_SECRET)


@pytest.fixture
def research_env(lab, monkeypatch):
    """Flows read the research Orthanc from ORTHANC_* (no saved block needed)."""
    env = {"ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username,
           "ORTHANC_PASSWORD": lab.research.password}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


# ------------------------------------------------------------------ the wheel


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory):
    """This checkout built as the wheel PyPI would get (``pip wheel --no-deps``; only the
    build backend comes from the package index, pip's cache first). Built from a copy of the
    sources: a build in the checkout leaves build/, whose stale files can land in later
    wheels. Symlinks are copied as their targets (deployments/prefect.yaml)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "prefect.yaml"):
        shutil.copy2(repo / name, source / name)
    for package in ("orthanc_client", "tasks", "flows", "deployments"):
        shutil.copytree(repo / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "--wheel-dir", str(tmp / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("prefect_orthanc-*.whl")
    return wheel
