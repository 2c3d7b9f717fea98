"""Helpers shared by the unit tests: Orthanc-shaped answers and streamed bodies."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

BASE = "http://orthanc.test:8042"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def orthanc_error(status: int, orthanc_status: int | None = None, error: str | None = None,
                  details: str | None = None, *, method: str = "GET",
                  uri: str = "/") -> httpx.Response:
    """An error answer shaped like Orthanc's JSON error body."""
    body: dict[str, Any] = {"HttpError": "x", "HttpStatus": status, "Method": method,
                            "Message": error or "", "Uri": uri}
    if orthanc_status is not None:
        body["OrthancStatus"] = orthanc_status
    if error is not None:
        body["OrthancError"] = error
    if details is not None:
        body["Details"] = details
    return httpx.Response(status, json=body)


SYSTEM_1_10 = {"Name": "PACS", "Version": "1.10.1", "ApiVersion": 16, "DicomAet": "PACS",
               "DicomPort": 4242, "HttpPort": 8042, "DatabaseVersion": 6,
               "PluginsEnabled": True}
SYSTEM_1_12 = {**SYSTEM_1_10, "Version": "1.12.1", "ApiVersion": 21}


class ChunkStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body delivered in chunks, as a real transport does (not pre-read), that
    can fail with ``error`` after the chunks, like a connection dropped mid-body."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.error is not None:
            raise self.error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error


def leftovers(directory: os.PathLike[str] | str) -> list[str]:
    """Names in ``directory`` (to check that no ``.partial-*`` file stayed behind)."""
    return sorted(os.listdir(directory))
