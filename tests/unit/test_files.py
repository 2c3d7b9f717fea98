"""The package's data files: found through the import system, copied into a project."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_orthanc.deployments.__main__ import main
from prefect_orthanc.deployments.files import (
    PREFECT_YAML,
    STUDY_EVENTS_LUA,
    TemplateExists,
    copy_templates,
)

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_template_is_the_repositorys_prefect_yaml():
    """One source of truth: the package's prefect.yaml is the root's (a symlink in a
    checkout, its content in the wheel: tests/integration/test_user_project.py)."""
    assert PREFECT_YAML.read_bytes() == (REPO / "prefect.yaml").read_bytes()
    assert STUDY_EVENTS_LUA.read_text().startswith("-- prefect-orthanc")


def test_init_writes_the_templates_and_never_over_a_file(tmp_path, capsys):
    assert main(["init", str(tmp_path)]) == 0
    assert (tmp_path / "prefect.yaml").read_bytes() == PREFECT_YAML.read_bytes()
    assert (tmp_path / "orthanc" / "study_events.lua").read_bytes() == \
        STUDY_EVENTS_LUA.read_bytes()
    assert "wrote" in capsys.readouterr().out

    other = tmp_path / "other"
    other.mkdir()
    (other / "prefect.yaml").write_text("name: mine\n")
    with pytest.raises(TemplateExists, match="nothing was written"):
        copy_templates(other)
    assert (other / "prefect.yaml").read_text() == "name: mine\n"
    assert not (other / "orthanc").exists()  # all or nothing
    assert main(["init", str(other)]) == 1
    assert "nothing was written" in capsys.readouterr().err
