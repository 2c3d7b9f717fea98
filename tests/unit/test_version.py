"""The version is written once (pyproject.toml) and readable where a user looks for it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import prefect_orthanc.orthanc_client
import prefect_orthanc.tasks

ROOT = Path(__file__).resolve().parents[2]


def test_installed_version_is_pyprojects_and_exposed_by_the_packages():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version("prefect-orthanc") == declared
    assert prefect_orthanc.orthanc_client.__version__ == declared
    assert prefect_orthanc.tasks.__version__ == declared


def test_command_line_prints_the_version():
    done = subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"prefect-orthanc {version('prefect-orthanc')}"


def test_changelog_has_a_section_for_this_version():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines()
                if line.startswith("## [")]
    assert headings[0] == "## [Unreleased]", headings[:1]
    assert any(line.startswith(f"## [{declared}] - ") for line in headings), (declared, headings)
