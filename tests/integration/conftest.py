"""Clients on the lab's two servers, and the synthetic cohort loaded into the pacs."""

from __future__ import annotations

import pytest

from orthanc_client import Orthanc


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
    from deployments.lab.synthetic import zip_bytes

    stored = pacs.upload(zip_bytes(cohort.files))
    assert len(stored) == len(cohort.files)
    return pacs


# ------------------------------------------------------------------ Prefect


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server for the session (``prefect server start`` on SQLite, with all
    of its services: scheduler, triggers, late runs...), with the pacs modality's concurrency
    limit in place. Yields the ``LocalPrefectServer``; its log is checked for tracebacks from
    the server's own services at the end of the session (test_zz_prefect_server_log.py)."""
    import asyncio

    import prefect.context
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL,
                                  temporary_settings)

    from deployments.lab.prefect_server import LocalPrefectServer
    from tasks.limits import ensure_limits

    server = LocalPrefectServer.start(tmp_path_factory.mktemp("prefect-server"), ui=False)
    try:
        with temporary_settings(updates={
                PREFECT_API_URL: server.api_url,
                PREFECT_SERVER_DATABASE_CONNECTION_URL: server.database_url}):
            # Threads the tests start do not inherit the context variable temporary_settings
            # sets: make these settings the process-global ones too, as prefect_test_harness
            # does, or a flow run in a thread would start an ephemeral server of its own.
            with prefect.context._temporary_global_settings_context(
                    prefect.context.get_settings_context()):
                asyncio.run(ensure_limits({"pacs": 2}))
                yield server
    finally:
        server.stop()


@pytest.fixture
def modality_limit(prefect_server):
    from tasks.limits import ensure_limits

    async def set_limit(modality: str, value: int):
        return await ensure_limits({modality: value})

    return set_limit


@pytest.fixture(scope="session")
def research_creds(lab):
    from tasks import OrthancCredentials

    return OrthancCredentials(url=lab.research.url, username=lab.research.username,
                              password=lab.research.password, retries=1)


@pytest.fixture(scope="session")
def pacs_creds(lab):
    from tasks import OrthancCredentials

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

    def make(description: str = "REJECT-ONCE"):
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
            buffer = io.BytesIO()
            dataset.save_as(buffer)
            pacs.upload(buffer.getvalue())
        return study_uid, len(source.files)

    return make


@pytest.fixture
def flaky_study(flaky_study_factory):
    return flaky_study_factory()


#: the de-identification secret used by the sharing tests (the PHI scan looks for it too)
DEID_SECRET = "test-only-deid-secret-7c41f0a2"


@pytest.fixture
def research_env(lab, monkeypatch):
    """Flows read the research Orthanc from ORTHANC_* (no saved block needed)."""
    env = {"ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username,
           "ORTHANC_PASSWORD": lab.research.password}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
