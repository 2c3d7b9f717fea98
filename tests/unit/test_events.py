"""The orthanc.study.stable contract: deterministic IDs, resource IDs, no tag values."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from prefect_orthanc.flows.events import EVENT, study_event, study_event_id, study_resource_id

STUDY = "8c1ca245-96c7def9-20ab7d76-82a8c0b8-2f874404"


def test_event_id_is_the_one_the_lua_script_posted():
    # captured from deployments/orthanc/study_events.lua running in Orthanc 1.10.1
    assert str(study_event_id(STUDY, "20261123T105659")) == "8c1ca245-96c7-8def-920a-261123105659"


def test_event_id_is_a_uuid_v8_and_deterministic():
    first = study_event_id(STUDY, "20261123T105659")
    assert first == study_event_id(STUDY, "20261123T105659")
    assert first.version == 8 and first.variant == uuid.RFC_4122
    # a study that grew (new LastUpdate) is a new event; another study too
    assert first != study_event_id(STUDY, "20261123T105700")
    other = "9c1ca245-96c7def9-20ab7d76-82a8c0b8-2f874404"
    assert first != study_event_id(other, "20261123T105659")


@pytest.mark.parametrize("digit", "0123456789abcdef")
def test_variant_digit_is_valid_for_every_input(digit):
    study = STUDY[:16] + digit + STUDY[17:]
    assert study_event_id(study, "20261123T105659").variant == uuid.RFC_4122


def test_event_shape_holds_ids_only():
    event = study_event("research", STUDY, "20261123T105659", emitter="changes")
    assert event["event"] == EVENT == "orthanc.study.stable"
    assert event["resource"]["prefect.resource.id"] == f"orthanc.research.study.{STUDY}"
    assert event["resource"]["prefect.resource.id"] == study_resource_id("research", STUDY)
    assert event["payload"] == {"study_id": STUDY, "server": "research",
                                "last_update": "20261123T105659", "emitter": "changes"}
    assert dt.datetime.fromisoformat(event["occurred"].replace("Z", "+00:00")) == dt.datetime(
        2026, 11, 23, 10, 56, 59, tzinfo=dt.UTC)
    # it is what Prefect's own Event model accepts
    from prefect.events import Event

    parsed = Event.model_validate(event)
    assert str(parsed.id) == event["id"]


@pytest.mark.parametrize("server,study,stamp", [
    ("research", "not-an-id", "20261123T105659"),
    ("research", STUDY, "2026-11-23"),
    ("bad server!", STUDY, "20261123T105659"),
    ("research", "SMITH^JOHN", "20261123T105659"),
])
def test_bad_input_is_refused_without_echoing_it(server, study, stamp):
    with pytest.raises(ValueError) as caught:
        study_event(server, study, stamp, emitter="lua")
    assert study not in str(caught.value) and "SMITH" not in str(caught.value)


def test_lua_script_builds_the_same_fields():
    from pathlib import Path

    lua = (Path(__file__).resolve().parents[2] / "deployments" / "orthanc"
           / "study_events.lua").read_text()
    for needle in ('"orthanc.study.stable"', '"orthanc." .. server .. ".study." .. studyId',
                   "study_id = studyId", "last_update = stamp", 'emitter = "lua"'):
        assert needle in lua


@pytest.mark.parametrize("source,retrieved", [
    ("pacs", True), ("PACS_2.main-site", True),  # a modality name (tasks.origin.mark_retrieved)
    (None, False), ("", False),  # received: no mark
    ("copy:deidentified", False),  # a copy this package made: the new-study flow decides
    ('{"HttpStatus": 404}', False), ("x" * 65, False),  # anything else is not a mark
])
def test_a_study_this_package_retrieved_is_reported_under_its_own_name(source, retrieved):
    from prefect_orthanc.flows.events import RETRIEVED_EVENT, retrieved_by_us

    assert retrieved_by_us(source) is retrieved
    event = study_event("research", STUDY, "20261123T105659", emitter="changes",
                        retrieved=retrieved_by_us(source))
    assert event["event"] == (RETRIEVED_EVENT if retrieved else EVENT)
    # same ID and resource either way: both emitters' reports of one study stay one event
    assert event["id"] == str(study_event_id(STUDY, "20261123T105659"))
    assert event["resource"]["prefect.resource.id"] == study_resource_id("research", STUDY)
