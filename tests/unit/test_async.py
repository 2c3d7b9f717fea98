"""AsyncOrthanc drives the same operations; plain tests wrapping asyncio.run (no plugin)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import time

import httpx
import pytest
import respx

from prefect_orthanc.orthanc_client import (
    AsyncOrthanc,
    JobState,
    OrthancArchiveError,
    OrthancHTTPError,
    OrthancJobFailed,
    OrthancJobTimeout,
    OrthancNotFound,
    OrthancUnavailable,
    SystemInfo,
)
from tests.unit._mocks import BASE, SYSTEM_1_10, ChunkStream, leftovers, run

TOTAL = 2345
IDS = [f"id-{i}" for i in range(TOTAL)]


def capped_find(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    since, limit = body["Since"], body["Limit"]
    return httpx.Response(200, json=IDS[since:since + min(limit, 100)])


def test_async_operations_are_coroutines(make_async):
    client = make_async()
    coro = client.statistics()
    assert inspect.iscoroutine(coro)
    coro.close()
    run(client.aclose())


def test_async_system(router, make_async):
    router.get("/system").mock(return_value=httpx.Response(200, json=SYSTEM_1_10))

    async def main():
        async with make_async() as client:
            return await client.system()

    info = run(main())
    assert isinstance(info, SystemInfo) and info.version == "1.10.1"


def test_async_find_paging(router, make_async):
    route = router.post("/tools/find").mock(side_effect=capped_find)

    async def main():
        async with make_async() as client:
            return await client.find("Study"), await client.find("Study", limit=250)

    everything, limited = run(main())
    assert everything == IDS
    assert limited == IDS[:250]
    assert route.call_count == 25 + 3  # 23 full pages + 1 short + 1 empty; then 3 for 250


def test_async_retry_then_success(router, make_async):
    route = router.get("/statistics").mock(side_effect=[
        httpx.Response(503), httpx.ReadTimeout("slow"), httpx.Response(200, json={"a": 1})])

    async def main():
        async with make_async() as client:
            return await client.statistics()

    assert run(main()) == {"a": 1}
    assert route.call_count == 3


def test_async_unsafe_post_not_retried(router, make_async):
    route = router.post("/queries/q/retrieve").mock(side_effect=httpx.ReadTimeout("slow"))

    async def main():
        async with make_async() as client:
            await client.retrieve("q", "RES")

    with pytest.raises(OrthancUnavailable) as info:
        run(main())
    assert info.value.outcome_unknown is True
    assert route.call_count == 1


def test_async_retries_exhausted(router, make_async):
    route = router.get("/statistics").mock(return_value=httpx.Response(502))

    async def main():
        async with make_async(retries=2) as client:
            await client.statistics()

    with pytest.raises(OrthancHTTPError) as info:
        run(main())
    assert info.value.status_code == 502
    assert route.call_count == 3


def _job(state, **extra):
    return httpx.Response(200, json={"ID": "j", "Type": "Archive", "State": state, **extra})


def test_async_wait_for_job(router, make_async):
    route = router.get("/jobs/j").mock(side_effect=[
        _job("Pending"), _job("Running", Progress=50), _job("Success", Progress=100)])

    async def main():
        async with make_async() as client:
            return await client.wait_for_job("j", timeout=5, interval=0.001)

    info = run(main())
    assert info.state is JobState.SUCCESS and route.call_count == 3


def test_async_wait_for_job_failure_and_timeout(router, make_async):
    router.get("/jobs/failed").mock(return_value=httpx.Response(200, json={
        "ID": "failed", "Type": "Archive", "State": "Failure", "ErrorCode": 2,
        "ErrorDescription": "Not implemented"}))
    running = router.get("/jobs/slow").mock(return_value=_job("Running"))

    async def failed():
        async with make_async() as client:
            await client.wait_for_job("failed", timeout=5)

    async def slow():
        async with make_async() as client:
            await client.wait_for_job("slow", timeout=0.05)

    with pytest.raises(OrthancJobFailed) as info:
        run(failed())
    assert info.value.error_code == 2
    started = time.monotonic()
    with pytest.raises(OrthancJobTimeout):
        run(slow())
    assert time.monotonic() - started < 1.0
    assert 1 <= running.call_count <= 5


def test_async_download_resource_archive(router, make_async, tmp_path):
    body = b"PK" + b"z" * 300_000
    chunks = [body[i:i + 70_000] for i in range(0, len(body), 70_000)]
    router.get("/studies/st/archive").mock(side_effect=lambda request: httpx.Response(
        200, headers={"Content-Length": str(len(body))}, stream=ChunkStream(chunks)))

    async def main():
        async with make_async() as client:
            return await client.download_resource_archive("Study", "st", tmp_path / "st.zip")

    result = run(main())
    assert result.size == len(body)
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert (tmp_path / "st.zip").read_bytes() == body
    assert leftovers(tmp_path) == ["st.zip"]


def test_async_download_pre_read_body(router, make_async, tmp_path):
    router.get("/jobs/j/archive").mock(return_value=httpx.Response(200, content=b"PK-zip"))

    async def main():
        async with make_async() as client:
            return await client.download_job_archive("j", tmp_path / "j.zip")

    assert run(main()).size == 6
    assert leftovers(tmp_path) == ["j.zip"]


def test_async_download_failures_leave_nothing(router, make_async, tmp_path):
    router.get("/studies/short/archive").mock(side_effect=lambda request: httpx.Response(
        200, headers={"Content-Length": "1000"}, stream=ChunkStream([b"PK" * 10])))
    router.get("/studies/gone/archive").mock(return_value=httpx.Response(404))

    async def download(resource_id):
        async with make_async() as client:
            await client.download_resource_archive("Study", resource_id, tmp_path / "x.zip")

    with pytest.raises(OrthancArchiveError):
        run(download("short"))
    with pytest.raises(OrthancNotFound):
        run(download("gone"))
    assert leftovers(tmp_path) == []


def test_async_cancelled_download_leaves_nothing(router, make_async, tmp_path):
    """Cancelling the task mid-stream removes the temporary file."""

    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b"PK" * 100
            await asyncio.sleep(10)
            yield b"never"

    router.get("/studies/st/archive").mock(
        side_effect=lambda request: httpx.Response(200, stream=Slow()))

    async def main():
        async with make_async() as client:
            task = asyncio.create_task(
                client.download_resource_archive("Study", "st", tmp_path / "st.zip"))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    assert leftovers(tmp_path) == []


def _page(seqs, last, done):
    return httpx.Response(200, json={
        "Changes": [{"Seq": s, "ChangeType": "NewInstance", "ResourceType": "Instance",
                     "ID": f"i{s}"} for s in seqs], "Last": last, "Done": done})


def test_async_changes_and_iter_changes(router, make_async):
    pages = {"0": _page([1, 2, 3], 3, False), "3": _page([4], 4, True)}
    route = router.get("/changes").mock(
        side_effect=lambda request: pages[request.url.params["since"]])

    async def main():
        async with make_async() as client:
            first = await client.changes(0, 3)
            seen = [change.seq async for change in client.iter_changes(limit=3)]
            return first, seen

    first, seen = run(main())
    assert [c.seq for c in first.changes] == [1, 2, 3] and first.last == 3 and not first.done
    assert seen == [1, 2, 3, 4]
    assert [c.request.url.params["since"] for c in route.calls] == ["0", "0", "3"]


def test_async_repr_has_no_password(make_async):
    client = make_async(username="robot", password="s3cr3t-pw")
    assert "s3cr3t-pw" not in repr(client)
    assert isinstance(client, AsyncOrthanc)
    run(client.aclose())


def test_async_cancelled_before_headers_leaves_nothing(tmp_path):
    """Cancelled while Orthanc prepares the ZIP (no answer yet), e.g. by a Prefect task
    timeout: no temporary file stays behind (regression)."""
    router = respx.Router(base_url=BASE, assert_all_called=False)

    async def slow_answer(request):
        await asyncio.sleep(10)
        return httpx.Response(200, content=b"PK")

    router.get("/studies/st/archive").mock(side_effect=slow_answer)
    transport = httpx.MockTransport(router.async_handler)

    async def main():
        async with AsyncOrthanc(url=BASE, transport=transport, backoff=0.001) as client:
            task = asyncio.create_task(
                client.download_resource_archive("Study", "st", tmp_path / "st.zip"))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    assert leftovers(tmp_path) == []
