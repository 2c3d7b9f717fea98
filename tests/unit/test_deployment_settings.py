"""Deployment settings (deployments.settings): PACS limits and names from PREFECT_ORTHANC_*."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prefect_orthanc.deployments.settings import DeploymentSettings


def test_defaults_match_prefect_yaml(monkeypatch):
    for key in ("PREFECT_ORTHANC_WORK_POOL", "PREFECT_ORTHANC_MODALITY_LIMITS"):
        monkeypatch.delenv(key, raising=False)
    settings = DeploymentSettings()
    assert settings.work_pool == "orthanc-process"
    assert settings.limits == {"pacs": 2}
    assert settings.credentials_block == "research" and settings.secret_block == "deid-secret"


def test_limits_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFECT_ORTHANC_MODALITY_LIMITS", "pacs=3, archive=1")
    assert DeploymentSettings().limits == {"pacs": 3, "archive": 1}


@pytest.mark.parametrize("value", ["pacs", "pacs=0", "=2", "pacs=two"])
def test_bad_limits_are_refused(monkeypatch, value):
    monkeypatch.setenv("PREFECT_ORTHANC_MODALITY_LIMITS", value)
    with pytest.raises(ValidationError, match="NAME=N"):
        DeploymentSettings()
