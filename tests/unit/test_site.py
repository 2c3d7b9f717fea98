"""The site's data directory: one setting, outside the checkout, relative paths under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_orthanc.flows.site import CODE_DIR, SiteError, SiteSettings, default_data_dir


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("PREFECT_ORTHANC_DATA_DIR", "PREFECT_ORTHANC_ALLOW_DATA_IN_CHECKOUT",
                 "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_default_is_the_users_data_directory(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / ".local" / "share" / "prefect-orthanc"
    assert SiteSettings().data_dir == tmp_path / ".local" / "share" / "prefect-orthanc"
    clean_env.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert SiteSettings.load().data_dir == tmp_path / "xdg" / "prefect-orthanc"
    clean_env.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec: ignore relative
    assert default_data_dir() == tmp_path / ".local" / "share" / "prefect-orthanc"


def test_relative_paths_resolve_under_it_whatever_the_working_directory(clean_env, tmp_path):
    clean_env.setenv("PREFECT_ORTHANC_DATA_DIR", str(tmp_path / "site"))
    clean_env.chdir(CODE_DIR)
    site = SiteSettings.load()
    assert site.path("cohorts/research.csv") == tmp_path / "site" / "cohorts" / "research.csv"
    assert site.path("shared") == tmp_path / "site" / "shared"
    assert site.path("sharing/../linkage/l.csv") == tmp_path / "site" / "linkage" / "l.csv"
    assert site.path("/srv/exports") == Path("/srv/exports")  # absolute: as given
    assert site.ensure() == tmp_path / "site" and (tmp_path / "site").is_dir()


@pytest.mark.parametrize("value", [str(CODE_DIR), str(CODE_DIR / "data"),
                                   str(CODE_DIR / "demo-output" / ".." / "private")])
def test_a_data_directory_in_the_checkout_is_refused(clean_env, value):
    clean_env.setenv("PREFECT_ORTHANC_DATA_DIR", value)
    with pytest.raises(SiteError) as refused:
        SiteSettings.load()
    message = str(refused.value)
    assert "is inside the code checkout" in message and "PREFECT_ORTHANC_DATA_DIR" in message
    assert "\n" not in message


def test_relative_data_directory_is_refused(clean_env):
    clean_env.setenv("PREFECT_ORTHANC_DATA_DIR", "data")
    with pytest.raises(SiteError, match="must be an absolute path"):
        SiteSettings.load()


def test_paths_escaping_into_the_checkout_are_refused(clean_env, tmp_path):
    clean_env.setenv("PREFECT_ORTHANC_DATA_DIR", str(tmp_path))
    site = SiteSettings.load()
    with pytest.raises(SiteError, match=r"parameter linkage_path .* is inside the code checkout"):
        site.path(CODE_DIR / "linkage" / "linkage.csv", "linkage_path")
    escape = os.path.relpath(CODE_DIR / "reports", tmp_path)  # ../../…/checkout/reports
    with pytest.raises(SiteError, match="parameter report_dir"):
        site.path(escape, "report_dir")


def test_synthetic_data_may_live_in_the_checkout_when_allowed(clean_env):
    clean_env.setenv("PREFECT_ORTHANC_DATA_DIR", str(CODE_DIR / "demo-output" / "data"))
    clean_env.setenv("PREFECT_ORTHANC_ALLOW_DATA_IN_CHECKOUT", "true")
    site = SiteSettings.load()
    assert site.path("shared") == CODE_DIR / "demo-output" / "data" / "shared"


def test_setup_refuses_a_data_directory_in_the_checkout_before_touching_prefect(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_ORTHANC_")}
    env.update({"PREFECT_ORTHANC_DATA_DIR": str(CODE_DIR / "linkage"),
                "PREFECT_API_URL": "http://127.0.0.1:9/api"})  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                          cwd=CODE_DIR, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("setup: PREFECT_ORTHANC_DATA_DIR (")
    assert "is inside the code checkout" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
