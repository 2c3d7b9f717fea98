"""find() / find_resources() paging against a server that caps its pages, and Level parsing."""

from __future__ import annotations

import json

import httpx
import pytest

from prefect_orthanc.orthanc_client import Level, OrthancUnsupported, Resource
from tests.unit._mocks import SYSTEM_1_10, SYSTEM_1_12

TOTAL = 2345
CAP = 100
IDS = [f"study-{i:05d}" for i in range(TOTAL)]


class CappedFind:
    """A /tools/find honoring Since/Limit but returning at most CAP results per page, like an
    Orthanc with LimitFindResults=100. Records every page request."""

    def __init__(self, ids=IDS, expand=None):
        self.ids = ids
        self.expand = expand
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        since = body.get("Since", 0)
        limit = body.get("Limit") or len(self.ids)
        page = self.ids[since:since + min(limit, CAP)]
        if body.get("Expand"):
            page = [self.expand(i) for i in page]
        return httpx.Response(200, json=page)


def test_find_returns_every_id_once_in_order(router, orthanc):
    server = CappedFind()
    router.post("/tools/find").mock(side_effect=server)
    found = orthanc.find("Study", {"ModalitiesInStudy": "CT"})
    assert found == IDS
    assert len(set(found)) == TOTAL
    # Since advances by what was actually returned (100), never by the page size asked (1000)
    assert [b["Since"] for b in server.bodies] == [*range(0, TOTAL, CAP), TOTAL]
    assert all(b["Limit"] == 1000 for b in server.bodies)
    first = server.bodies[0]
    assert first["Level"] == "Study"
    assert first["Query"] == {"ModalitiesInStudy": "CT"}
    assert first["Expand"] is False and first["CaseSensitive"] is True
    assert "Labels" not in first


def test_find_with_limit_returns_exactly_limit(router, orthanc):
    server = CappedFind()
    router.post("/tools/find").mock(side_effect=server)
    found = orthanc.find("studies", limit=250)
    assert found == IDS[:250]
    assert [(b["Since"], b["Limit"]) for b in server.bodies] == [(0, 250), (100, 150),
                                                                 (200, 50)]


def test_find_page_size_smaller_than_cap(router, orthanc):
    server = CappedFind(ids=IDS[:130])
    router.post("/tools/find").mock(side_effect=server)
    assert orthanc.find("Study", page_size=50, case_sensitive=False) == IDS[:130]
    assert [(b["Since"], b["Limit"]) for b in server.bodies] == [
        (0, 50), (50, 50), (100, 50), (130, 50)]
    assert server.bodies[0]["CaseSensitive"] is False


def test_find_nothing(router, orthanc):
    route = router.post("/tools/find").mock(return_value=httpx.Response(200, json=[]))
    assert orthanc.find("Series", {"Modality": "MR"}) == []
    assert route.call_count == 1


def _expanded(orthanc_id: str) -> dict:
    return {"ID": orthanc_id, "Type": "Study", "IsStable": True, "LastUpdate": "20240101T000000",
            "ParentPatient": "patient-1", "Series": ["s1", "s2"], "Labels": [],
            "MainDicomTags": {"StudyDescription": "SECRET-DESC", "AccessionNumber": "ACC999"},
            "PatientMainDicomTags": {"PatientName": "DOE^JANE", "PatientID": "PID-1"}}


def test_find_resources_parses_expanded_pages(router, orthanc):
    server = CappedFind(ids=IDS[:205], expand=_expanded)
    router.post("/tools/find").mock(side_effect=server)
    resources = orthanc.find_resources("Study", {"StudyDate": "2024"})
    assert [r.id for r in resources] == IDS[:205]
    assert all(b["Expand"] is True for b in server.bodies)
    first = resources[0]
    assert isinstance(first, Resource)
    assert first.level is Level.STUDY
    assert first.parent_id == "patient-1"
    assert first.children_ids == ("s1", "s2")
    assert first.is_stable is True
    assert first.main_dicom_tags["AccessionNumber"] == "ACC999"
    assert first.patient_main_dicom_tags["PatientName"] == "DOE^JANE"
    text = repr(first) + str(first)
    for value in ("SECRET-DESC", "ACC999", "DOE^JANE", "PID-1"):
        assert value not in text
    assert IDS[0] in text


def test_find_by_label_needs_1_12(router, orthanc):
    router.get("/system").mock(return_value=httpx.Response(200, json=SYSTEM_1_10))
    find = router.post("/tools/find")
    with pytest.raises(OrthancUnsupported):
        orthanc.find("Study", labels=["cohort-a"])
    assert find.call_count == 0


def test_find_by_label_sends_labels(router, orthanc):
    router.get("/system").mock(return_value=httpx.Response(200, json=SYSTEM_1_12))
    server = CappedFind(ids=IDS[:3])
    router.post("/tools/find").mock(side_effect=server)
    assert orthanc.find("Study", labels=["cohort-a"]) == IDS[:3]
    assert server.bodies[0]["Labels"] == ["cohort-a"]


# ------------------------------------------------------------------ Level


@pytest.mark.parametrize("text,level", [
    ("studies", Level.STUDY), ("STUDY", Level.STUDY), ("Study", Level.STUDY),
    ("study", Level.STUDY), (" Studies ", Level.STUDY),
    ("series", Level.SERIES), ("Series", Level.SERIES),
    ("image", Level.INSTANCE), ("images", Level.INSTANCE), ("instances", Level.INSTANCE),
    ("Instance", Level.INSTANCE),
    ("patients", Level.PATIENT), ("PATIENT", Level.PATIENT),
])
def test_level_parsing(text, level):
    assert Level(text) is level


@pytest.mark.parametrize("text", ["", "s", "serieses", "studyy", "frame", "0"])
def test_unknown_level_is_value_error(text):
    with pytest.raises(ValueError):
        Level(text)


def test_unknown_level_non_string() -> None:
    with pytest.raises(ValueError):
        Level(3)


def test_level_navigation():
    assert Level.STUDY.collection == "studies"
    assert Level.SERIES.collection == "series"
    assert Level.PATIENT.child is Level.STUDY and Level.INSTANCE.child is None
    assert Level.INSTANCE.parent is Level.SERIES and Level.PATIENT.parent is None


def test_operations_accept_level_aliases(router, orthanc):
    route = router.get("/series/abc").mock(return_value=httpx.Response(200, json={
        "ID": "abc", "Type": "Series", "ParentStudy": "st", "Instances": ["i1"],
        "MainDicomTags": {}}))
    resource = orthanc.resource("series", "abc")
    assert route.call_count == 1
    assert resource.parent_id == "st" and resource.children_ids == ("i1",)
    with pytest.raises(ValueError):
        orthanc.resource("frames", "abc")
