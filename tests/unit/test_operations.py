"""DICOM query/retrieve, labels and version detection, metadata, changes, resources."""

from __future__ import annotations

import json

import httpx
import pytest

from prefect_orthanc.orthanc_client import (
    ChangesPage,
    Level,
    OrthancNotFound,
    OrthancUnsupported,
    OrthancUsageError,
    QueryAnswer,
    QueryResult,
    SystemInfo,
)
from tests.unit._mocks import SYSTEM_1_10, SYSTEM_1_12, orthanc_error

ANSWERS = [
    {"PatientName": "DOE^JANE", "PatientID": "PID-1", "StudyInstanceUID": "1.2.3.1",
     "NumberOfStudyRelatedInstances": "12", "QueryRetrieveLevel": "STUDY"},
    {"PatientName": "ROE^RICHARD", "PatientID": "PID-2", "StudyInstanceUID": "1.2.3.2",
     "NumberOfStudyRelatedInstances": "3", "QueryRetrieveLevel": "STUDY"},
]


# ------------------------------------------------------------------ query / retrieve


def test_query_then_answers(router, orthanc):
    post = router.post("/modalities/pacs/query").mock(
        return_value=httpx.Response(200, json={"ID": "q-1", "Path": "/queries/q-1"}))
    get = router.get("/queries/q-1/answers").mock(return_value=httpx.Response(200, json=ANSWERS))
    result = orthanc.query("pacs", "studies", {"PatientID": "PID-*",
                                               "NumberOfStudyRelatedInstances": ""}, timeout=30)
    sent = json.loads(post.calls.last.request.content)
    assert sent == {"Level": "Study", "Query": {"PatientID": "PID-*",
                                                "NumberOfStudyRelatedInstances": ""},
                    "Timeout": 30}
    params = get.calls.last.request.url.params
    assert "expand" in params and "simplify" in params
    assert isinstance(result, QueryResult)
    assert (result.query_id, result.modality, result.level) == ("q-1", "pacs", Level.STUDY)
    assert len(result) == 2
    assert all(isinstance(a, QueryAnswer) for a in result.answers)
    assert [a.index for a in result.answers] == [0, 1]
    assert result.answers[0].get("StudyInstanceUID") == "1.2.3.1"
    assert result.answers[1].get("Missing", "-") == "-"
    text = repr(result) + str(result) + repr(result.answers[0])
    for value in ("DOE^JANE", "ROE^RICHARD", "PID-1", "PID-2", "1.2.3.1"):
        assert value not in text


def test_query_with_no_answers(router, orthanc):
    router.post("/modalities/pacs/query").mock(
        return_value=httpx.Response(200, json={"ID": "q-0"}))
    router.get("/queries/q-0/answers").mock(return_value=httpx.Response(200, json=[]))
    result = orthanc.query("pacs", Level.SERIES, {"StudyInstanceUID": "1.2"})
    assert len(result) == 0 and result.level is Level.SERIES


def test_modality_names_are_quoted_in_paths(router, orthanc):
    route = router.post("/modalities/my%20pacs%2F1/echo").mock(return_value=httpx.Response(200))
    orthanc.echo("my pacs/1", timeout=3)
    assert route.call_count == 1
    assert route.calls.last.request.url.raw_path == b"/modalities/my%20pacs%2F1/echo"
    assert json.loads(route.calls.last.request.content) == {"Timeout": 3}


def test_retrieve_whole_query(router, orthanc):
    route = router.post("/queries/q-1/retrieve").mock(
        return_value=httpx.Response(200, json={"ID": "job-7", "Path": "/jobs/job-7"}))
    assert orthanc.retrieve("q-1", "RESEARCH") == "job-7"
    sent = json.loads(route.calls.last.request.content)
    assert sent["TargetAet"] == "RESEARCH" and sent["Synchronous"] is False
    assert route.call_count == 1


def test_retrieve_one_answer(router, orthanc):
    whole = router.post("/queries/q-1/retrieve")
    route = router.post("/queries/q-1/answers/1/retrieve").mock(
        return_value=httpx.Response(200, json={"ID": "job-8"}))
    assert orthanc.retrieve("q-1", "RESEARCH", answer=1, priority=5) == "job-8"
    sent = json.loads(route.calls.last.request.content)
    assert sent == {"TargetAet": "RESEARCH", "Synchronous": False, "Priority": 5}
    assert whole.call_count == 0


def test_store_and_move_bodies(router, orthanc):
    store = router.post("/modalities/pacs/store").mock(
        return_value=httpx.Response(200, json={"ID": "job-s"}))
    move = router.post("/modalities/pacs/move").mock(return_value=httpx.Response(200, json={}))
    assert orthanc.store("pacs", ["a", "b"]) == "job-s"
    assert json.loads(store.calls.last.request.content) == {"Resources": ["a", "b"],
                                                             "Synchronous": False}
    assert orthanc.move("pacs", "Study", [{"StudyInstanceUID": "1.2"}], "RES") is None
    assert json.loads(move.calls.last.request.content) == {
        "Level": "Study", "Resources": [{"StudyInstanceUID": "1.2"}], "TargetAet": "RES",
        "Synchronous": True}


# ------------------------------------------------------------------ labels, versions


def test_labels_refused_on_1_10_1(router, orthanc):
    router.get("/system").mock(return_value=httpx.Response(200, json=SYSTEM_1_10))
    put = router.put("/studies/st1/labels/cohort")
    with pytest.raises(OrthancUnsupported) as info:
        orthanc.add_label("Study", "st1", "cohort")
    error = info.value
    assert error.required_version == "1.12.0" and error.server_version == "1.10.1"
    assert error.feature == "labels"
    assert "1.12.0" in str(error) and "1.10.1" in str(error) and "16" in str(error)
    assert put.call_count == 0
    with pytest.raises(OrthancUnsupported):
        orthanc.labels("Study", "st1")
    with pytest.raises(OrthancUnsupported):
        orthanc.remove_label("Study", "st1", "cohort")


def test_labels_sent_on_1_12_1(router, orthanc):
    system = router.get("/system").mock(return_value=httpx.Response(200, json=SYSTEM_1_12))
    put = router.put("/studies/st1/labels/cohort-a").mock(return_value=httpx.Response(200))
    delete = router.delete("/studies/st1/labels/cohort-a").mock(return_value=httpx.Response(200))
    listed = router.get("/studies/st1/labels").mock(
        return_value=httpx.Response(200, json=["cohort-a"]))
    orthanc.add_label("Study", "st1", "cohort-a")
    assert orthanc.labels("studies", "st1") == ["cohort-a"]
    orthanc.remove_label("Study", "st1", "cohort-a")
    assert (put.call_count, delete.call_count, listed.call_count) == (1, 1, 1)
    assert system.call_count == 1  # /system is read once and cached


def test_mainline_counts_as_new(router, orthanc):
    router.get("/system").mock(return_value=httpx.Response(
        200, json={**SYSTEM_1_10, "Version": "mainline", "ApiVersion": 99}))
    put = router.put("/series/se1/labels/x").mock(return_value=httpx.Response(200))
    orthanc.add_label("Series", "se1", "x")
    assert put.call_count == 1


def test_system_info_and_versions(router, orthanc):
    system = router.get("/system").mock(return_value=httpx.Response(200, json=SYSTEM_1_10))
    info = orthanc.system()
    assert isinstance(info, SystemInfo)
    assert (info.version, info.api_version, info.dicom_aet) == ("1.10.1", 16, "PACS")
    assert info.version_tuple == (1, 10, 1)
    assert info.at_least("1.10.0") and info.at_least("1.10.1") and not info.at_least("1.12.0")
    orthanc.system()  # system() always asks again (it refreshes the cache)
    assert system.call_count == 2


# ------------------------------------------------------------------ metadata


def test_metadata_value(router, orthanc):
    router.get("/studies/st1/metadata/Cohort").mock(return_value=httpx.Response(200, text="A"))
    assert orthanc.metadata("Study", "st1", "Cohort") == "A"


def test_metadata_unset_is_none(router, orthanc):
    router.get("/studies/st1/metadata/Cohort").mock(
        return_value=orthanc_error(404, 7, "Inexistent item"))
    assert orthanc.metadata("Study", "st1", "Cohort") is None


def test_metadata_of_unknown_resource_raises(router, orthanc):
    router.get("/studies/nope/metadata/Cohort").mock(
        return_value=orthanc_error(404, 17, "Unknown resource"))
    with pytest.raises(OrthancNotFound) as info:
        orthanc.metadata("Study", "nope", "Cohort")
    assert info.value.orthanc_status == 17
    assert info.value.route == "/studies/{id}/metadata/{name}"


def test_metadata_bare_404_is_unset(router, orthanc):
    """Orthanc 1.10.1 answers an unset metadata name with a 404 and no body."""
    router.get("/studies/st1/metadata/Cohort").mock(return_value=httpx.Response(404))
    assert orthanc.metadata("Study", "st1", "Cohort") is None


# ------------------------------------------------------------------ changes


def _page(seqs, last, done):
    return httpx.Response(200, json={
        "Changes": [{"Seq": s, "ChangeType": "StableStudy", "ResourceType": "Study",
                     "ID": f"st{s}", "Path": f"/studies/st{s}", "Date": "20240101T000000"}
                    for s in seqs],
        "Last": last, "Done": done})


def test_changes_page(router, orthanc):
    route = router.get("/changes").mock(return_value=_page([5, 6], 6, False))
    page = orthanc.changes(4, 2)
    assert isinstance(page, ChangesPage)
    assert [c.seq for c in page.changes] == [5, 6] and page.last == 6 and not page.done
    params = route.calls.last.request.url.params
    assert (params["since"], params["limit"]) == ("4", "2")


def test_iter_changes_follows_last_until_done(router, orthanc):
    pages = {"0": _page([1, 2], 2, False), "2": _page([3, 4], 4, False),
             "4": _page([5], 5, True)}
    route = router.get("/changes").mock(
        side_effect=lambda request: pages[request.url.params["since"]])
    changes = list(orthanc.iter_changes(limit=2))
    assert [c.seq for c in changes] == [1, 2, 3, 4, 5]
    assert [c.id for c in changes] == ["st1", "st2", "st3", "st4", "st5"]
    assert [call.request.url.params["since"] for call in route.calls] == ["0", "2", "4"]
    assert all(call.request.url.params["limit"] == "2" for call in route.calls)


def test_iter_changes_empty_log(router, orthanc):
    route = router.get("/changes").mock(return_value=_page([], 0, True))
    assert list(orthanc.iter_changes(since=0)) == []
    assert route.call_count == 1


# ------------------------------------------------------------------ resources


def test_exists_and_count(router, orthanc):
    router.get("/studies/yes").mock(return_value=httpx.Response(200, json={
        "ID": "yes", "Type": "Study"}))
    router.get("/studies/no").mock(return_value=httpx.Response(404))
    router.get("/studies/yes/statistics").mock(return_value=httpx.Response(200, json={
        "CountInstances": 12, "CountSeries": 2, "DiskSize": "10", "UncompressedSize": "20"}))
    router.get("/studies/no/statistics").mock(return_value=httpx.Response(404))
    assert orthanc.exists("Study", "yes") is True
    assert orthanc.exists("Study", "no") is False
    assert orthanc.count_instances("Study", "yes") == 12
    assert orthanc.count_instances("Study", "no") == 0


def test_children_parent_instances(router, orthanc):
    router.get("/studies/st/series").mock(return_value=httpx.Response(200, json=[
        {"ID": "se1", "Type": "Series", "ParentStudy": "st", "Instances": ["i1", "i2"]}]))
    router.get("/series/se1/study").mock(return_value=httpx.Response(200, json={
        "ID": "st", "Type": "Study", "ParentPatient": "p"}))
    router.get("/studies/st/instances").mock(return_value=httpx.Response(200, json=[
        {"ID": "i1"}, {"ID": "i2"}]))
    [series] = orthanc.children("Study", "st")
    assert series.children_ids == ("i1", "i2") and series.parent_id == "st"
    assert orthanc.parent("Series", "se1").parent_id == "p"
    assert orthanc.instances("Study", "st") == ["i1", "i2"]
    assert orthanc.instances("Instance", "i9") == ["i9"]
    with pytest.raises(OrthancUsageError):
        orthanc.children("Instance", "i1")
    with pytest.raises(OrthancUsageError):
        orthanc.parent("Patient", "p")


def test_tags_needs_shared_above_instance(router, orthanc):
    route = router.get("/instances/i1/tags").mock(
        return_value=httpx.Response(200, json={"PatientName": "X"}))
    assert orthanc.tags("Instance", "i1") == {"PatientName": "X"}
    assert "simplify" in route.calls.last.request.url.params
    with pytest.raises(OrthancUsageError):
        orthanc.tags("Study", "st")


def test_upload_and_delete(router, orthanc):
    upload = router.post("/instances").mock(return_value=httpx.Response(200, json={
        "ID": "i1", "Status": "AlreadyStored", "ParentStudy": "st"}))
    gone = router.delete("/studies/gone").mock(return_value=httpx.Response(404))
    [stored] = orthanc.upload(b"DICM-bytes")
    assert (stored.id, stored.status) == ("i1", "AlreadyStored")
    request = upload.calls.last.request
    assert request.content == b"DICM-bytes"
    assert request.headers["Content-Type"] == "application/dicom"
    assert orthanc.delete("Study", "gone", missing_ok=True) is False
    with pytest.raises(OrthancNotFound):
        orthanc.delete("Study", "gone")
    assert gone.call_count == 2
