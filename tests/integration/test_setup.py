"""``python -m prefect_orthanc.deployments setup`` checks what it saves: a wrong Orthanc password,
a secret sharing would refuse, or a silent change of the saved secret is one clear line, exit 1, and
nothing already saved is replaced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET_BLOCK = "setup-test-secret"
CREDENTIALS_BLOCK = "setup-test-research"

pytestmark = pytest.mark.usefixtures("prefect_server")


def _setup(lab, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    base = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
            "ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username,
            "ORTHANC_PASSWORD": lab.research.password,
            "PREFECT_ORTHANC_SECRET_BLOCK": SECRET_BLOCK,
            "PREFECT_ORTHANC_CREDENTIALS_BLOCK": CREDENTIALS_BLOCK}
    base.pop("PREFECT_ORTHANC_DEID_SECRET", None)
    return subprocess.run([sys.executable, "-m", "prefect_orthanc.deployments", "setup", *args],
                          cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                          timeout=120)


def test_setup_checks_credentials_and_guards_the_secret(lab):
    from prefect.blocks.system import Secret

    from prefect_orthanc.tasks import OrthancCredentials

    first = _setup(lab, PREFECT_ORTHANC_DEID_SECRET="a" * 40)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"block orthanc-credentials/{CREDENTIALS_BLOCK}: saved from ORTHANC_* (checked" \
        in first.stdout

    wrong = _setup(lab, ORTHANC_PASSWORD="not-the-password")
    assert wrong.returncode == 1
    assert "401" in wrong.stderr and "ORTHANC_PASSWORD" in wrong.stderr
    assert "not-the-password" not in wrong.stderr + wrong.stdout
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert OrthancCredentials.load(CREDENTIALS_BLOCK).password.get_secret_value() == \
        lab.research.password  # the working block was not replaced

    short = _setup(lab, PREFECT_ORTHANC_DEID_SECRET="short-secret")
    assert short.returncode == 1 and "shorter than 16 characters" in short.stderr
    assert "short-secret" not in short.stderr

    other = _setup(lab, PREFECT_ORTHANC_DEID_SECRET="b" * 40)
    assert other.returncode == 1 and "--rotate-secret" in other.stderr
    assert Secret.load(SECRET_BLOCK).get() == "a" * 40

    same = _setup(lab, PREFECT_ORTHANC_DEID_SECRET="a" * 40)
    assert same.returncode == 0, same.stderr[-2000:]
    rotated = _setup(lab, "--rotate-secret", PREFECT_ORTHANC_DEID_SECRET="b" * 40)
    assert rotated.returncode == 0, rotated.stderr[-2000:]
    assert Secret.load(SECRET_BLOCK).get() == "b" * 40
