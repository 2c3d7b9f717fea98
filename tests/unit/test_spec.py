"""prefect.yaml is checked strictly: what Prefect would only warn about fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.spec import PREFECT_YAML, SpecError, load


@pytest.fixture(scope="module")
def specs():
    return {spec.full_name: spec for spec in load()}


def test_the_project_file_is_valid(specs):
    assert set(specs) == {"collect-research-cohort/nightly", "share-deidentified/ad-hoc",
                          "route-new-study/on-stable-study",
                          "watch-orthanc-changes/research-changes"}
    nightly = specs["collect-research-cohort/nightly"]
    assert nightly.schedules == [{"cron": "0 19 * * *", "timezone": "UTC", "active": True}]
    assert nightly.prefect_concurrency().limit == 1
    assert nightly.prefect_concurrency().collision_strategy.value == "ENQUEUE"
    assert nightly.parameters["request"]["time_window"]["outside"] == "stop"
    assert not specs["share-deidentified/ad-hoc"].schedules
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
    (lambda d: _first(d, "nightly")["parameters"]["request"].update(concurrency=0),
     "parameters do not fit collect-research-cohort"),
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
