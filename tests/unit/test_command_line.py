"""Every command line of the package answers bad input in one line and exit status 1, never a
traceback (``tasks.command_line.answer``): run as a user runs them, in a subprocess. Nothing
listens on PREFECT_API_URL here (port 1), and no Orthanc is needed: each answer comes before
either would be used, or is the answer to their absence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PASSWORD = "pw-Secret-77"
UNREACHABLE = "http://127.0.0.1:1/api"


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("ORTHANC_", "PREFECT_ORTHANC_", "PREFECT_API_URL"))}
    base.update({"PREFECT_API_URL": UNREACHABLE, "PREFECT_HOME": str(cwd / ".prefect"),
                 "PREFECT_ORTHANC_DATA_DIR": str(cwd / "data"), **env})
    base = {k: v for k, v in base.items() if v != "<unset>"}
    command = ([str(Path(sys.executable).with_name("prefect-orthanc-limits"))]
               if args[0] == "limits" else [sys.executable, "-m", "prefect_orthanc.deployments"])
    return subprocess.run(command + args[1 if args[0] == "limits" else 0:], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=120)


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize(("env", "expected"), [
    ({"ORTHANC_URL": "htp://orthanc:8042"},
     "setup: invalid OrthancSettings (ORTHANC_URL: the URL (ORTHANC_URL) must look like"),
    ({"ORTHANC_URL": f"http://user:{PASSWORD}@orthanc:8042"},
     "setup: invalid OrthancSettings (ORTHANC_URL: put credentials in the username and"),
    ({"ORTHANC_READ_TIMEOUT": "abc"},
     "setup: invalid OrthancSettings (ORTHANC_READ_TIMEOUT: Input should be a valid number"),
    ({"PREFECT_ORTHANC_MODALITY_LIMITS": "pacs"},
     "setup: invalid DeploymentSettings (PREFECT_ORTHANC_MODALITY_LIMITS: modality limits are"),
])
def test_setup_names_the_bad_setting_never_its_value(tmp_path, env, expected):
    line = _one_line(_run(["setup"], tmp_path, **env))
    assert line.startswith(expected)
    assert PASSWORD not in line and "htp://orthanc" not in line and "abc" not in line


def test_setup_without_a_prefect_server_refuses_before_anything(tmp_path):
    line = _one_line(_run(["setup"], tmp_path, PREFECT_API_URL="<unset>"))
    assert line.startswith("setup: PREFECT_API_URL is not set, so setup would configure a "
                           "temporary Prefect server that vanishes")
    assert not (tmp_path / "data").exists()  # nothing made


def test_unreachable_prefect_api_is_named(tmp_path):
    line = _one_line(_run(["limits", "--list"], tmp_path))
    assert line == (f"prefect-orthanc-limits: cannot reach the Prefect API (ConnectError; "
                    f"PREFECT_API_URL={UNREACHABLE}): start `prefect server start` or set "
                    f"PREFECT_API_URL to a running server's http://HOST:4200/api")


def test_prefect_api_password_never_echoed(tmp_path):
    url = f"http://admin:{PASSWORD}@127.0.0.1:1/api"
    line = _one_line(_run(["serve"], tmp_path, PREFECT_API_URL=url))
    assert "(ConnectError; PREFECT_API_URL=http://127.0.0.1:1/api)" in line
    assert PASSWORD not in line and "admin" not in line


def test_check_missing_file(tmp_path):
    line = _one_line(_run(["check", "--file", str(tmp_path / "nope.yaml")], tmp_path))
    assert line == f"check: No such file or directory: {tmp_path / 'nope.yaml'}"


def test_check_unreadable_file(tmp_path):
    (tmp_path / "sub").mkdir()
    line = _one_line(_run(["check", "--file", str(tmp_path / "sub")], tmp_path))
    assert line == f"check: Is a directory: {tmp_path / 'sub'}"


def test_check_yaml_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "prefect.yaml").write_text("deployments:\n  - name: [broken\n    x: 1\n")
    line = _one_line(_run(["check", "--file", "prefect.yaml"], tmp_path))
    assert line.startswith("check: not valid YAML (prefect.yaml, line 3, column ")


def test_init_on_a_file_writes_nothing(tmp_path):
    (tmp_path / "somefile").write_text("mine")
    line = _one_line(_run(["init", "somefile"], tmp_path))
    assert line.startswith("init: somefile is a file, not a directory")
    assert (tmp_path / "somefile").read_text() == "mine"


def test_check_reads_the_projects_own_prefect_yaml(tmp_path):
    """Found by a tester: without --file, check and serve read the shipped template even in a
    project with its own prefect.yaml."""
    (tmp_path / "prefect.yaml").write_text("deployments: []\nschedule_typo: 1\n")
    done = _run(["check"], tmp_path)
    assert done.stdout.startswith("reading prefect.yaml\n")
    assert done.returncode == 1 and "unknown keys ['schedule_typo']" in done.stderr


def test_check_without_a_prefect_yaml_reads_the_shipped_template(tmp_path):
    done = _run(["check"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("reading the shipped template ")
    assert "collect-research-cohort/" in done.stdout
