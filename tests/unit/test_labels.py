"""tasks.labels against recorded Orthanc answers: labels on 1.12, a metadata set before.

The router knows only the routes each test expects, so any other request (one GET per study
when selecting, a label call on a server without labels) fails the test.
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from prefect_orthanc.orthanc_client import OrthancConflict, OrthancUsageError
from prefect_orthanc.tasks.labels import (
    LABELS_METADATA,
    LEGACY_PROJECT_METADATA,
    attach_labels,
    find_labelled,
    labels_of,
    project_studies,
)
from tests.unit._orthanc_shapes import (
    CONFLICT_1_10_1,
    SYSTEM_1_10_1,
    SYSTEM_1_12_11,
    SYSTEM_1_12_NO_LABELS,
    bulk_study_1_10_1,
)

STUDY = "8a8cf898-ca27c490-d0c7058c-929d0581-2bbf104d"
META = f"/studies/{STUDY}/metadata/{LABELS_METADATA}"


def _system(router, answer):
    router.get("/system").mock(return_value=httpx.Response(200, json=answer))


# ------------------------------------------------------------------ Orthanc >= 1.12


def test_attach_uses_orthanc_labels_on_1_12(router, orthanc):
    _system(router, SYSTEM_1_12_11)
    a = router.put(f"/studies/{STUDY}/labels/lung-2026").mock(return_value=httpx.Response(200))
    b = router.put(f"/studies/{STUDY}/labels/heart").mock(return_value=httpx.Response(200))
    assert attach_labels(orthanc, "Study", STUDY, ["lung-2026", "heart"]) == "label"
    assert a.call_count == b.call_count == 1
    assert a.calls[0].request.content == b""


def test_labels_of_on_1_12(router, orthanc):
    _system(router, SYSTEM_1_12_11)
    router.get(f"/studies/{STUDY}/labels").mock(
        return_value=httpx.Response(200, json=["heart", "lung-2026"]))
    assert labels_of(orthanc, "Study", STUDY) == {"heart", "lung-2026"}


def test_project_selection_on_1_12_is_one_find(router, orthanc):
    _system(router, SYSTEM_1_12_11)
    ids = [f"{i:08x}-00000000-00000000-00000000-00000000" for i in range(3)]
    pages = iter([ids, []])
    find = router.post("/tools/find").mock(
        side_effect=lambda request: httpx.Response(200, json=next(pages)))
    assert project_studies(orthanc, "lung-2026") == ids
    body = json.loads(find.calls[0].request.content)
    assert body["Level"] == "Study" and body["Query"] == {}
    assert body["Labels"] == ["lung-2026"]
    assert body.get("LabelsConstraint", "All") == "All"


def test_1_12_without_labels_in_its_database_uses_the_metadata_set(router, orthanc):
    _system(router, SYSTEM_1_12_NO_LABELS)
    router.get(f"/studies/{STUDY}/metadata").mock(
        return_value=httpx.Response(200, json={LABELS_METADATA: "a,b"}))
    assert labels_of(orthanc, "Study", STUDY) == {"a", "b"}


def test_malformed_label_refused_before_any_request(router, orthanc):
    for bad in ["@", "a,b", "", "x" * 65, "lung 2026"]:
        with pytest.raises(OrthancUsageError, match="letters, digits"):
            attach_labels(orthanc, "Study", STUDY, [bad])
        with pytest.raises(OrthancUsageError):
            find_labelled(orthanc, "Study", bad)
    assert not router.calls


# ------------------------------------------------------------------ Orthanc 1.10.1


class MetadataStore:
    """One metadata entry with 1.10.1's conditional-write rules (see _orthanc_shapes)."""

    def __init__(self, value: str | None = None, check_revisions: bool = False) -> None:
        self.value = value
        self.check_revisions = check_revisions
        self.before_put: list[str] = []  # values another writer stores before our next PUT

    def etag(self) -> str:
        return f'"0-{hashlib.md5((self.value or "").encode()).hexdigest()}"'

    def get(self, request: httpx.Request) -> httpx.Response:
        if self.value is None:
            return httpx.Response(404)  # 1.10.1: bare 404 for an unset name
        return httpx.Response(200, text=self.value, headers={"ETag": self.etag()})

    def put(self, request: httpx.Request) -> httpx.Response:
        if self.before_put:
            self.value = self.before_put.pop(0)
        wanted = request.headers.get("If-Match")
        if wanted is not None and (self.value is None or wanted != self.etag()):
            return httpx.Response(409, json=CONFLICT_1_10_1)
        if wanted is None and self.value is not None and self.check_revisions:
            return httpx.Response(409, json=CONFLICT_1_10_1)
        self.value = request.content.decode()
        return httpx.Response(200)


def _store(router, store: MetadataStore):
    router.get(META).mock(side_effect=store.get)
    return router.put(META).mock(side_effect=store.put)


def test_first_label_creates_the_set(router, orthanc):
    _system(router, SYSTEM_1_10_1)
    store = MetadataStore()
    put = _store(router, store)
    assert attach_labels(orthanc, "Study", STUDY, ["lung-2026"]) == "metadata"
    assert store.value == "lung-2026"
    assert "If-Match" not in put.calls[0].request.headers


def test_a_second_project_is_added_not_overwritten(router, orthanc):
    _system(router, SYSTEM_1_10_1)
    store = MetadataStore("lung-2026")
    put = _store(router, store)
    etag = store.etag()
    attach_labels(orthanc, "Study", STUDY, ["heart"])
    assert store.value == "heart,lung-2026"
    assert put.calls[0].request.headers["If-Match"] == etag


def test_nothing_written_when_already_there(router, orthanc):
    _system(router, SYSTEM_1_10_1)
    put = _store(router, MetadataStore("heart,lung-2026"))
    attach_labels(orthanc, "Study", STUDY, ["lung-2026"])
    assert put.call_count == 0


def test_concurrent_writer_is_kept(router, orthanc):
    """Another flow adds "other" between our read and our write: Orthanc refuses our stale
    write (409) and the retry merges both."""
    _system(router, SYSTEM_1_10_1)
    store = MetadataStore("lung-2026")
    store.before_put = ["lung-2026,other"]
    put = _store(router, store)
    attach_labels(orthanc, "Study", STUDY, ["heart"])
    assert store.value == "heart,lung-2026,other"
    assert put.call_count == 2


def test_first_write_overwritten_by_a_concurrent_creator_is_redone(router, orthanc):
    """Both writers saw no set; the other's create lands after ours (no CheckRevisions): the
    read-back notices and the label is added to the other's set."""
    _system(router, SYSTEM_1_10_1)
    store = MetadataStore()
    gets = iter([None, "other", "other", "heart,other"])

    def get(request):
        value = next(gets)
        if value is not None:
            store.value = value
        return store.get(request)

    router.get(META).mock(side_effect=get)
    router.put(META).mock(side_effect=store.put)
    attach_labels(orthanc, "Study", STUDY, ["heart"])
    assert store.value == "heart,other"


def test_first_write_refused_under_check_revisions_is_retried(router, orthanc):
    _system(router, {**SYSTEM_1_10_1, "CheckRevisions": True})
    store = MetadataStore(check_revisions=True)
    store.before_put = ["other"]  # the other writer created it just before us
    _store(router, store)
    attach_labels(orthanc, "Study", STUDY, ["heart"])
    assert store.value == "heart,other"


def test_endless_conflicts_end_in_a_clear_error(router, orthanc):
    _system(router, SYSTEM_1_10_1)
    router.get(META).mock(return_value=httpx.Response(200, text="a", headers={"ETag": '"0-x"'}))
    router.put(META).mock(return_value=httpx.Response(409, json=CONFLICT_1_10_1))
    with pytest.raises(OrthancConflict, match="kept changing"):
        attach_labels(orthanc, "Study", STUDY, ["b"])


def test_labels_of_reads_the_set_and_the_legacy_project(router, orthanc):
    _system(router, SYSTEM_1_10_1)
    router.get(f"/studies/{STUDY}/metadata").mock(return_value=httpx.Response(
        200, json={"LastUpdate": "20261129T152630", LABELS_METADATA: "heart,new",
                   LEGACY_PROJECT_METADATA: "lung-2026"}))
    assert labels_of(orthanc, "Study", STUDY) == {"heart", "new", "lung-2026"}


def test_selection_on_1_10_1_reads_metadata_in_bulk_not_per_study(router, orthanc):
    _system(router, SYSTEM_1_10_1)
    ids = [f"{i:08x}-00000000-00000000-00000000-00000000" for i in range(1200)]
    pages = iter([ids[:1000], ids[1000:], []])
    router.post("/tools/find").mock(
        side_effect=lambda request: httpx.Response(200, json=next(pages)))
    member = {i: {LABELS_METADATA: "heart,lung-2026"} for i in ids[::7]}
    member |= {i: {LEGACY_PROJECT_METADATA: "lung-2026"} for i in ids[3::100]}
    member |= {i: {LABELS_METADATA: "lung-2026x"} for i in ids[5::100]}  # not a member

    def bulk(request):
        body = json.loads(request.content)
        assert body["Level"] == "Study" and body["Metadata"] is True
        return httpx.Response(200, json=[bulk_study_1_10_1(i, member.get(i, {}))
                                         for i in body["Resources"]])

    bulk_route = router.post("/tools/bulk-content").mock(side_effect=bulk)
    found = project_studies(orthanc, "lung-2026")
    assert found == [i for i in ids if i in member and not member[i].get(
        LABELS_METADATA, "").endswith("x")]
    assert bulk_route.call_count == 3  # 500 per request, never one per study
    assert len(router.calls) == 1 + 3 + 3  # /system, find pages, bulk pages


def test_plain_set_metadata_overwrites_under_check_revisions(router, orthanc):
    """``set_metadata`` without ``if_match`` keeps overwriting on a server that checks
    revisions (its 409 is answered with the current ETag), e.g. ``PrefectOrthancRouted``."""
    store = MetadataStore("old", check_revisions=True)
    put = _store(router, store)
    orthanc.set_metadata("Study", STUDY, LABELS_METADATA, "new")
    assert store.value == "new"
    assert put.call_count == 2 and "If-Match" in put.calls[1].request.headers
