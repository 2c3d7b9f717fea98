"""The deployed flows' parameters: flat (a run's override of one keeps the deployment's
others), ordered by what a user decides first, described, and checked before anything runs."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from prefect_orthanc.deployments.spec import PREFECT_YAML
from prefect_orthanc.flows.cohort import CollectionRequest, Criteria, TimeWindow
from prefect_orthanc.flows.collection import collect_cohort
from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.parameters import request_from, request_model
from prefect_orthanc.flows.sharing import SharingRequest, share_studies

FLOWS: list[tuple[Any, type[BaseModel]]] = [(collect_cohort, CollectionRequest),
                                            (share_studies, SharingRequest)]


def _deployment(name: str) -> dict:
    data = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in data["deployments"] if d["name"] == name)["parameters"]


@pytest.mark.parametrize("flow,model", FLOWS)
def test_flat_parameters_are_the_models_fields_with_its_defaults(flow, model):
    assert request_model(flow) is model
    signature = inspect.signature(flow.fn)
    assert set(signature.parameters) - {"credentials_block"} == set(model.model_fields)
    for name, parameter in signature.parameters.items():
        if name in model.model_fields and not model.model_fields[name].is_required():
            default = model.model_fields[name].get_default(call_default_factory=True)
            assert parameter.default in (default, None) or (
                parameter.default == [] and default == []), name


@pytest.mark.parametrize("flow,model", FLOWS)
def test_every_parameter_has_its_models_description_in_the_form(flow, model):
    schema = flow.parameters.model_dump()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
        if name in model.model_fields:
            assert prop["description"] == " ".join(model.model_fields[name].description.split())


def test_forms_start_with_what_a_user_decides_first():
    def order(flow):
        props = flow.parameters.model_dump()["properties"]
        return sorted(props, key=lambda name: props[name]["position"])

    assert order(collect_cohort)[:3] == ["cohort_file", "criteria", "project"]
    assert order(share_studies)[:4] == ["project", "study_ids", "destination", "profile"]
    assert order(collect_cohort)[-1] == order(share_studies)[-1] == "credentials_block"


@pytest.mark.parametrize("name,flow,override,kept", [
    ("nightly", collect_cohort, {"cohort_file": "cohorts/lung.csv"},
     ["time_window", "project", "report_dir", "credentials_block"]),
    ("nightly", collect_cohort, {"project": "lung-2026", "dry_run": True},
     ["cohort_file", "time_window"]),
    ("ad-hoc", share_studies, {"project": "lung-2026"},
     ["destination", "linkage_path", "staging_dir", "ledger_path", "secret_block"]),
])
def test_a_partial_override_keeps_the_deployments_other_defaults(name, flow, override, kept):
    """What Prefect does with a run's parameters: the deployment's, updated at the top level
    by the override. The merged set is valid and the kept values are the deployment's."""
    defaults = _deployment(name)
    merged = {**defaults, **override}
    validated = flow.validate_parameters(merged)
    request = request_from(request_model(flow), validated)
    for key, value in override.items():
        assert getattr(request, key) == value
    for key in kept:
        if key == "credentials_block":
            assert validated[key] == defaults[key]
            continue
        value = getattr(request, key)
        assert (value.model_dump(exclude_defaults=False) if hasattr(value, "model_dump")
                else value) == defaults[key] or key == "time_window"
    if "time_window" in kept:
        assert request.time_window == TimeWindow(**defaults["time_window"])


@pytest.mark.parametrize("values,message", [
    ({}, "give exactly one of cohort_file and criteria"),
    ({"cohort_file": "a.csv", "criteria": {"last_days": 1}},
     "give exactly one of cohort_file and criteria"),
    ({"criteria": {}}, "criteria: Value error, give either date_from and date_to, or last_days"
     .replace("Value error, ", "")),
    ({"criteria": {"last_days": 1, "modality": "CT"}}, "criteria.modality: Extra inputs"),
    ({"cohort_file": "a.xlsx"}, "cohort_file: cohort_file is a CSV file"),
    ({"cohort_file": "a.csv", "time_window": {"start": "19:00", "end": "07:00"}},
     "time_window.timezone: Field required"),
    ({"cohort_file": "a.csv", "time_window": {"start": "19:00", "end": "19:00",
                                              "timezone": "UTC"}}, "would never be open"),
    ({"cohort_file": "a.csv", "time_window": {"start": "19:00", "end": "07:00",
                                              "timezone": "Mars/Olympus"}},
     "unknown time zone"),
    ({"cohort_file": "a.csv", "concurrency": 0}, "concurrency: Input should be greater"),
    ({"cohort_file": "a.csv", "source_modality": " "}, "source_modality names the PACS"),
    ({"cohort_file": "a.csv", "project": "DOE^JOHN"}, "project is 1-64 letters"),
])
def test_collection_requests_that_could_only_fail_later_are_refused(values, message):
    with pytest.raises(ValueError) as refused:
        request_from(CollectionRequest, values)
    text = str(refused.value)
    assert message in text and "\n" not in text
    assert "DOE^JOHN" not in text  # names the parameter, never its value


@pytest.mark.parametrize("values,message", [
    ({}, "give exactly one of project and study_ids"),
    ({"project": "p", "destination": {"kind": "directory", "target": " "}},
     "destination.target: target is a directory path"),
    ({"project": "p", "destination": {"kind": "modality", "target": "a/b"}},
     "a modality target is the modality's name"),
    ({"project": "p", "destination": {"kind": "directory", "target": "shared"},
      "staging_dir": "shared/staging"}, "staging_dir is inside the destination directory"),
    ({"project": "p", "destination": {"kind": "directory", "target": "shared"},
      "ledger_path": "shared/ledger.jsonl"}, "ledger_path is inside the destination"),
    ({"project": "p", "destination": {"kind": "directory", "target": "sharing/staging/out"}},
     "the destination directory is inside staging_dir"),
    ({"study_ids": ["123-ABC"]}, "1 of the study_ids are not Orthanc study IDs"),
    ({"project": "p", "profile": {"exclude_sop_classes": ["CT Image"]}},
     "'CT Image' is not a storage SOP class keyword or UID"),
])
def test_sharing_requests_that_could_only_fail_later_are_refused(values, message):
    with pytest.raises(ValueError) as refused:
        request_from(SharingRequest, values)
    assert message in str(refused.value)


def test_the_default_destination_is_shared_under_the_data_directory():
    request = request_from(SharingRequest, {"project": "research"})
    assert request.destination.kind == "directory" and request.destination.target == "shared"
    assert request.linkage_path == "linkage/linkage.csv"


def test_sop_classes_are_named_by_keyword_and_uids_are_named_for_you():
    profile = DeidProfile(exclude_sop_classes=["1.2.840.10008.5.1.4.1.1.7", "CTImageStorage"])
    assert profile.exclude_sop_classes == ("SecondaryCaptureImageStorage", "CTImageStorage")
    assert profile.excludes("CT", "1.2.840.10008.5.1.4.1.1.2")
    assert DeidProfile().excludes("MR", "1.2.840.10008.5.1.4.1.1.104.1")  # Encapsulated PDF
    assert not DeidProfile().excludes("MR", "1.2.840.10008.5.1.4.1.1.4")  # MR Image
    form = DeidProfile.model_json_schema()["properties"]["exclude_sop_classes"]
    assert "EncapsulatedPDFStorage" in form["items"]["enum"]
    assert all(not name[0].isdigit() for name in form["items"]["enum"])
    assert form["description"]


def test_criteria_and_windows_reject_typos():
    with pytest.raises(ValueError):
        Criteria(last_days=1, modalitys=["CT"])
    with pytest.raises(ValueError):
        TimeWindow(start="19:00", end="07:00", timezone="UTC", outsde="wait")


def test_every_field_of_every_deployed_form_is_described():
    """Top-level parameters and every field of the models inside them (criteria, window,
    destination, profile, routing rules): a person filling the form sees what each means."""
    from prefect_orthanc.deployments.spec import load

    missing = []
    for spec in load():
        schema = spec.load_flow().parameters.model_dump()
        for name, prop in schema["properties"].items():
            if not prop.get("description"):
                missing.append(f"{spec.full_name}: {name}")
        for model, definition in schema.get("definitions", {}).items():
            for name, prop in definition.get("properties", {}).items():
                if not prop.get("description"):
                    missing.append(f"{spec.full_name}: {model}.{name}")
    assert missing == []
