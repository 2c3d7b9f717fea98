"""prefect.yaml is checked strictly: what Prefect would only warn about fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prefect_orthanc.deployments.spec import PREFECT_YAML, SpecError, load


@pytest.fixture(scope="module")
def specs():
    return {spec.full_name: spec for spec in load()}


def test_the_project_file_is_valid(specs):
    assert set(specs) == {"collect-research-cohort/nightly", "share-deidentified/ad-hoc",
                          "route-new-study/on-stable-study",
                          "watch-orthanc-changes/research-changes",
                          "sweep-failed-routes/every-15-minutes"}
    nightly = specs["collect-research-cohort/nightly"]
    assert nightly.schedules == [{"cron": "0 19 * * *", "timezone": "UTC", "active": True}]
    assert nightly.prefect_concurrency().limit == 4  # cohorts at once; the PACS has its own cap
    assert nightly.prefect_concurrency().collision_strategy.value == "ENQUEUE"
    assert nightly.parameters["time_window"]["outside"] == "stop"
    sharing = specs["share-deidentified/ad-hoc"]
    assert not sharing.schedules
    # the shipped defaults agree: sharing shares what the nightly collection collects
    assert sharing.parameters["project"] == nightly.parameters["project"]
    route = specs["route-new-study/on-stable-study"]
    trigger = route.prefect_triggers()[0]
    assert trigger.expect == {"orthanc.study.stable"}
    assert trigger.parameters == {"study_id": "{{ event.payload.study_id }}"}
    assert {s.work_pool for s in specs.values()} == {"orthanc-process"}


def _broken(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(PREFECT_YAML.read_text())
    edit(data)
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _first(data, name):
    return next(d for d in data["deployments"] if d["name"] == name)


@pytest.mark.parametrize("edit,message", [
    (lambda d: _first(d, "nightly").update(schedule_s=[{"cron": "0 1 * * *"}]),
     "unknown keys ['schedule_s']"),
    (lambda d: _first(d, "nightly")["schedules"][0].update(interval=60),
     "schedules.0"),
    (lambda d: _first(d, "nightly")["schedules"][0].update(cron="every night"),
     "schedules"),
    (lambda d: _first(d, "nightly")["parameters"].update(concurrency=0),
     "concurrency: Input should be greater than or equal to 1"),
    (lambda d: _first(d, "nightly")["parameters"].update(concurrency="many"),
     "parameters do not fit collect-research-cohort"),
    (lambda d: _first(d, "nightly")["parameters"].update(request={"project": "x"}),
     "parameters do not fit collect-research-cohort"),
    (lambda d: _first(d, "nightly")["parameters"].update(criteria={"last_days": 1}),
     "give exactly one of cohort_file and criteria"),
    (lambda d: _first(d, "nightly")["parameters"]["time_window"].pop("timezone"),
     "time_window.timezone: Field required"),
    (lambda d: _first(d, "nightly")["parameters"]["time_window"].update(end="19:00"),
     "would never be open"),
    (lambda d: _first(d, "ad-hoc")["parameters"].update(linkage_path="shared/linkage.csv"),
     "linkage_path is inside the destination directory"),
    (lambda d: _first(d, "ad-hoc")["parameters"].update(study_ids=["not-an-id"]),
     "1 of the study_ids are not Orthanc study IDs"),
    (lambda d: _first(d, "ad-hoc")["parameters"].update(
        study_ids=["27f7126f-4f66ab19-6d2fbc77-3b9e1bd4-5cbc3bbf"]),
     "give exactly one of project and study_ids"),
    (lambda d: _first(d, "ad-hoc")["parameters"].update(
        profile={"exclude_sop_classes": ["NotAStorageClass"]}),
     "parameters do not fit share-deidentified"),
    (lambda d: _first(d, "nightly").update(entrypoint="flows/collection.py:nope"),
     "does not load"),
    (lambda d: _first(d, "nightly")["concurrency_limit"].update(collision_strategy="DROP"),
     "collision_strategy"),
    (lambda d: _first(d, "on-stable-study")["triggers"][0].update(posture="Sometimes"),
     "trigger 0"),
    (lambda d: _first(d, "on-stable-study")["triggers"][0]["parameters"].update(
        studyid="{{ event.payload.study_id }}"), "parameters do not fit route-new-study"),
    (lambda d: _first(d, "on-stable-study")["parameters"]["rules"][0].update(labels=[]),
     "needs labels"),
    (lambda d: d.update(deploymentz=[]), "unknown keys ['deploymentz']"),
])
def test_mistakes_prefect_would_accept_are_errors(tmp_path, edit, message):
    with pytest.raises(SpecError) as caught:
        load(_broken(tmp_path, edit))
    assert message in str(caught.value)


def test_the_pull_step_bakes_nothing_from_the_deploy_host():
    """``prefect deploy`` fills ``{{ $VAR }}`` in pull steps from the deploy host's
    environment: the shipped pull step has no template and no path at all."""
    data = yaml.safe_load(PREFECT_YAML.read_text())
    assert data["pull"] == [{"prefect_orthanc.deployments.pull.set_working_directory": {}}]
    assert "{{" not in yaml.safe_dump(data["pull"])


def test_the_pull_step_changes_to_the_code_that_is_imported(tmp_path, monkeypatch):
    import os

    from prefect_orthanc.deployments.pull import set_working_directory
    from prefect_orthanc.flows.site import CODE_DIR

    monkeypatch.chdir(tmp_path)
    assert set_working_directory() == {"directory": str(CODE_DIR)}
    assert Path(os.getcwd()) == CODE_DIR and (CODE_DIR / "flows" / "collection.py").is_file()
