"""The sync and async clients: thin drivers of the operations in ``operations``.

>>> with Orthanc(url="http://127.0.0.1:8042") as orthanc:
...     orthanc.system().version
'1.10.1'

>>> async with AsyncOrthanc.from_env() as orthanc:
...     studies = await orthanc.find("Study", {"ModalitiesInStudy": "CT"})
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self, TypeVar

import httpx

from prefect_orthanc.orthanc_client.core import Call, Download, Send, Sleep, Step, Steps, run_sync
from prefect_orthanc.orthanc_client.models import Change
from prefect_orthanc.orthanc_client.operations import Operations
from prefect_orthanc.orthanc_client.settings import OrthancConnection, OrthancSettings

__all__ = ["AsyncOrthanc", "Orthanc"]

R = TypeVar("R")
_CHUNK = 1 << 20


def _settings(settings: OrthancConnection | None, overrides: dict[str, Any]
              ) -> OrthancConnection:
    given = {key: value for key, value in overrides.items() if value is not None}
    if settings is None:
        return OrthancSettings(**given)
    # model_copy(update=...) skips validation: a plain-str password would stay a str (shown
    # by repr, and breaking auth()) and an overriding URL would go unchecked. Re-validate.
    if not given:
        return settings
    checked = type(settings).model_validate({**dict(settings), **given})
    checked._credentials_source = settings.credentials_source
    return checked


def _client_options(settings: OrthancConnection, transport: Any) -> dict[str, Any]:
    options: dict[str, Any] = dict(base_url=settings.url, auth=settings.auth(),
                                   timeout=settings.timeout(), verify=settings.verify(),
                                   # identity: Orthanc gzips every response a client
                                   # accepts gzip for, DICOM files included (~10x the time
                                   # of a 512 KB instance on loopback, on both sides, for
                                   # pixel data that hardly shrinks)
                                   headers={"Accept": "application/json",
                                            "Accept-Encoding": "identity"},
                                   # Orthanc closes idle keep-alive connections after its
                                   # KeepAliveTimeout (1 s by default): a request sent on one
                                   # it just closed is lost ("connection lost"), and one that
                                   # starts work cannot be retried. Drop them sooner.
                                   limits=httpx.Limits(keepalive_expiry=0.5))
    if transport is not None:
        options["transport"] = transport
    return options


def _request_options(call: Call, settings: OrthancConnection) -> dict[str, Any]:
    return dict(method=call.method, url=call.path, params=call.params, json=call.json,
                content=call.content, headers=call.headers,
                timeout=settings.timeout(long=call.long))


class _Client(Operations):
    """What both clients share: settings (explicit arguments override them) and an httpx
    client of the kind the subclass names. ``transport`` is for tests (respx)."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(self, settings: OrthancConnection | None = None, *, url: str | None = None,
                 username: str | None = None, password: str | None = None,
                 transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
                 **options: Any) -> None:
        self.settings = _settings(settings, dict(url=url, username=username, password=password,
                                                 **options))
        self._http: Any = self._http_class(**_client_options(self.settings, transport))

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Settings from ``ORTHANC_*`` environment variables; keyword arguments override."""
        return cls(OrthancSettings(), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.safe_url!r})"


class Orthanc(_Client):
    """Blocking client for one Orthanc server.

    Build it from settings, from ``ORTHANC_*`` environment variables (``from_env``), or from
    explicit arguments, which override the settings.
    """

    _http_class = httpx.Client

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, steps: Steps[R]) -> R:
        return run_sync(steps, self._execute)

    def _execute(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        request = self._http.build_request(**_request_options(step.call, self.settings))
        try:
            if isinstance(step, Send):
                return self._http.send(request)
            return self._stream(request, step)
        except httpx.RequestError as exc:
            return exc

    def _stream(self, request: httpx.Request, step: Download) -> httpx.Response | None:
        try:
            response = self._http.send(request, stream=True)
        except BaseException:
            step.sink.abort()  # cancelled or failed before any answer: no partial file
            raise
        try:
            if response.is_error:
                response.read()
                return response
            if step.sink.begin(response):
                for chunk in response.iter_bytes(_CHUNK):
                    step.sink.write(chunk)
            return None
        except BaseException:
            step.sink.abort()  # a failed write or an interrupt leaves no partial file
            raise
        finally:
            response.close()

    def iter_changes(self, since: int = 0, limit: int = 100) -> Iterator[Change]:
        """Every change after ``since`` until the end of the log, page by page.

        Remember ``change.seq`` of the last change you handled: it is the cursor to resume from.
        """
        while True:
            page = self.changes(since, limit)
            yield from page.changes
            since = page.last
            if page.done:
                return


class AsyncOrthanc(_Client):
    """Asynchronous client for one Orthanc server; same operations as ``Orthanc``, awaited."""

    _http_class = httpx.AsyncClient

    async def __aenter__(self) -> AsyncOrthanc:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, steps: Steps[R]) -> R:
        value: Any = None
        while True:
            try:
                step = steps.send(value)
            except StopIteration as stop:
                return stop.value
            value = await self._execute(step)

    async def _execute(self, step: Step) -> Any:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        request = self._http.build_request(**_request_options(step.call, self.settings))
        try:
            if isinstance(step, Send):
                return await self._http.send(request)
            return await self._stream(request, step)
        except httpx.RequestError as exc:
            return exc

    async def _stream(self, request: httpx.Request, step: Download) -> httpx.Response | None:
        try:
            response = await self._http.send(request, stream=True)
        except BaseException:
            step.sink.abort()  # cancelled or failed before any answer: no partial file
            raise
        try:
            if response.is_error:
                await response.aread()
                return response
            if step.sink.begin(response):
                async for chunk in response.aiter_bytes(_CHUNK):
                    step.sink.write(chunk)
            return None
        except BaseException:
            step.sink.abort()  # a failed write or an interrupt leaves no partial file
            raise
        finally:
            await response.aclose()

    async def iter_changes(self, since: int = 0, limit: int = 100) -> AsyncIterator[Change]:
        """Async version of ``Orthanc.iter_changes``."""
        while True:
            page = await self.changes(since, limit)
            for change in page.changes:
                yield change
            since = page.last
            if page.done:
                return


