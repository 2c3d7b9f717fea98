"""Archive streaming: atomic files with size and SHA-256, nothing left behind on failure."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from prefect_orthanc.orthanc_client import (
    ArchiveResult,
    OrthancArchiveError,
    OrthancNotFound,
    OrthancUnavailable,
)
from tests.unit._mocks import ChunkStream, leftovers

ZIP = b"PK\x03\x04" + bytes(range(256)) * 4000  # ~1 MB, several chunks
CHUNKS = [ZIP[i:i + 65536] for i in range(0, len(ZIP), 65536)]


def streamed(chunks=CHUNKS, *, length: int | None = None, error=None) -> httpx.Response:
    headers = {"Content-Type": "application/zip"}
    if length is not None:
        headers["Content-Length"] = str(length)
    return httpx.Response(200, headers=headers, stream=ChunkStream(list(chunks), error))


def test_download_resource_archive_streams_to_file(router, orthanc, tmp_path):
    route = router.get("/studies/st1/archive").mock(
        side_effect=lambda request: streamed(length=len(ZIP)))
    dest = tmp_path / "out" / "study.zip"  # parent directories are created
    result = orthanc.download_resource_archive("Study", "st1", dest)
    assert isinstance(result, ArchiveResult)
    assert result.path == dest
    assert result.size == len(ZIP) == dest.stat().st_size
    assert result.sha256 == hashlib.sha256(ZIP).hexdigest()
    assert dest.read_bytes() == ZIP
    assert leftovers(dest.parent) == ["study.zip"]
    assert route.call_count == 1


def test_download_without_content_length(router, orthanc, tmp_path):
    """Orthanc streams archives chunked (no Content-Length): size is what arrived."""
    router.get("/series/se1/media").mock(side_effect=lambda request: streamed())
    dest = tmp_path / "media.zip"
    result = orthanc.download_resource_archive("Series", "se1", dest, media=True)
    assert result.size == len(ZIP)
    assert result.sha256 == hashlib.sha256(ZIP).hexdigest()
    assert leftovers(tmp_path) == ["media.zip"]


def test_download_of_a_pre_read_body(router, orthanc, tmp_path):
    """respx/MockTransport hand back bodies already read; the download still works
    (regression: it raised httpx.StreamConsumed)."""
    router.get("/studies/st1/archive").mock(return_value=httpx.Response(200, content=ZIP))
    result = orthanc.download_resource_archive("Study", "st1", tmp_path / "a.zip")
    assert result.size == len(ZIP) and (tmp_path / "a.zip").read_bytes() == ZIP
    assert leftovers(tmp_path) == ["a.zip"]


def test_download_job_archive(router, orthanc, tmp_path):
    router.get("/jobs/job-1/archive").mock(side_effect=lambda request: streamed(length=len(ZIP)))
    result = orthanc.download_job_archive("job-1", str(tmp_path / "job.zip"))
    assert result.sha256 == hashlib.sha256(ZIP).hexdigest()
    assert leftovers(tmp_path) == ["job.zip"]


def test_http_error_leaves_no_file(router, orthanc, tmp_path):
    route = router.get("/studies/gone/archive").mock(
        return_value=httpx.Response(404, json={"OrthancStatus": 17,
                                               "OrthancError": "Unknown resource"}))
    dest = tmp_path / "gone.zip"
    with pytest.raises(OrthancNotFound) as info:
        orthanc.download_resource_archive("Study", "gone", dest)
    assert info.value.route == "/studies/{id}/archive"
    assert not dest.exists()
    assert leftovers(tmp_path) == []
    assert route.call_count == 1


def test_truncated_body_leaves_no_file(router, orthanc, tmp_path):
    """Content-Length promises more than arrives: refused, and nothing stays on disk."""
    router.get("/studies/st1/archive").mock(
        side_effect=lambda request: streamed(CHUNKS[:3], length=len(ZIP)))
    dest = tmp_path / "short.zip"
    with pytest.raises((OrthancArchiveError, OrthancUnavailable)) as info:
        orthanc.download_resource_archive("Study", "st1", dest)
    assert "short" in str(info.value) or "lost" in str(info.value)
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_truncated_pre_read_body_leaves_no_file(router, orthanc, tmp_path):
    router.get("/jobs/j/archive").mock(return_value=httpx.Response(
        200, content=ZIP[:1000], headers={"Content-Length": str(len(ZIP))}))
    with pytest.raises(OrthancArchiveError) as info:
        orthanc.download_job_archive("j", tmp_path / "j.zip")
    assert (info.value.size, info.value.expected) == (1000, len(ZIP))
    assert leftovers(tmp_path) == []


def test_connection_dropped_mid_body_is_retried(router, orthanc, tmp_path):
    answers = [streamed(CHUNKS[:2], error=httpx.RemoteProtocolError("peer closed")),
               streamed(length=len(ZIP))]
    route = router.get("/studies/st1/archive").mock(side_effect=answers)
    result = orthanc.download_resource_archive("Study", "st1", tmp_path / "s.zip")
    assert route.call_count == 2
    assert result.size == len(ZIP) and (tmp_path / "s.zip").read_bytes() == ZIP
    assert leftovers(tmp_path) == ["s.zip"]


def test_connection_dropped_every_time(router, make_client, tmp_path):
    route = router.get("/studies/st1/archive").mock(side_effect=lambda request: streamed(
        CHUNKS[:2], error=httpx.ReadError("reset")))
    client = make_client(retries=1)
    with pytest.raises(OrthancUnavailable) as info:
        client.download_resource_archive("Study", "st1", tmp_path / "s.zip")
    assert route.call_count == 2
    assert info.value.outcome_unknown is False
    assert leftovers(tmp_path) == []


def test_failed_download_keeps_an_existing_file(router, orthanc, tmp_path):
    dest = tmp_path / "study.zip"
    dest.write_bytes(b"previous good archive")
    router.get("/studies/st1/archive").mock(
        side_effect=lambda request: streamed(CHUNKS[:1], length=len(ZIP)))
    with pytest.raises(OrthancArchiveError):
        orthanc.download_resource_archive("Study", "st1", dest)
    assert dest.read_bytes() == b"previous good archive"
    assert leftovers(tmp_path) == ["study.zip"]


def test_interrupted_write_leaves_no_partial_file(router, orthanc, tmp_path):
    """Anything raised while streaming (here: a KeyboardInterrupt) removes the temp file."""
    router.get("/studies/st1/archive").mock(side_effect=lambda request: streamed(
        CHUNKS[:2], error=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        orthanc.download_resource_archive("Study", "st1", tmp_path / "s.zip")
    assert leftovers(tmp_path) == []


def test_archive_runs_a_job_then_downloads(router, orthanc, tmp_path):
    create = router.post("/tools/create-archive").mock(
        return_value=httpx.Response(200, json={"ID": "job-9", "Path": "/jobs/job-9"}))
    router.get("/jobs/job-9").mock(side_effect=[
        httpx.Response(200, json={"ID": "job-9", "Type": "Archive", "State": "Running"}),
        httpx.Response(200, json={"ID": "job-9", "Type": "Archive", "State": "Success"})])
    router.get("/jobs/job-9/archive").mock(side_effect=lambda request: streamed())
    result = orthanc.download_archive(["st1", "st2"], tmp_path / "many.zip", timeout=5)
    sent = json.loads(create.calls.last.request.content)
    assert sent == {"Resources": ["st1", "st2"], "Synchronous": False, "Priority": 0}
    assert result.size == len(ZIP)
    assert leftovers(tmp_path) == ["many.zip"]


def test_interrupted_before_answer_leaves_no_partial_file(router, orthanc, tmp_path):
    """Interrupted while waiting for the answer's headers: no temp file (regression)."""
    def interrupted(request):
        raise KeyboardInterrupt

    router.get("/studies/st1/archive").mock(side_effect=interrupted)
    with pytest.raises(KeyboardInterrupt):
        orthanc.download_resource_archive("Study", "st1", tmp_path / "s.zip")
    assert leftovers(tmp_path) == []


def test_refused_connection_leaves_no_partial_file(router, make_client, tmp_path):
    route = router.get("/studies/st1/archive").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(OrthancUnavailable):
        make_client(retries=1).download_resource_archive("Study", "st1", tmp_path / "s.zip")
    assert route.call_count == 2
    assert leftovers(tmp_path) == []
