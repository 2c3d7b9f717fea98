"""Unit-test fixtures: clients whose only transport is a respx router.

respx is scoped to the client's own transport (``httpx.MockTransport(router.handler)``), never
patched globally, so Prefect's API client in the same process is untouched. A request the
router does not know raises ``AllMockedAssertionError`` and fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import respx

from prefect_orthanc.orthanc_client import AsyncOrthanc, Orthanc
from tests.unit._mocks import BASE


@pytest.fixture(autouse=True)
def _no_orthanc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests never see a developer's (or the integration lab's) ORTHANC_* variables."""
    for name in list(os.environ):
        if name.upper().startswith("ORTHANC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(base_url=BASE, assert_all_called=False)


@pytest.fixture
def transport(router: respx.Router) -> httpx.MockTransport:
    # A sync handler serves both httpx.Client and httpx.AsyncClient (httpx 0.28).
    return httpx.MockTransport(router.handler)


@pytest.fixture
def orthanc(transport: httpx.MockTransport) -> Iterator[Orthanc]:
    with Orthanc(url=BASE, transport=transport, backoff=0.001) as client:
        yield client


@pytest.fixture
def make_client(transport: httpx.MockTransport):
    """Build more sync clients on the same router (other retries, credentials...)."""
    made: list[Orthanc] = []

    def make(**options: Any) -> Orthanc:
        options.setdefault("backoff", 0.001)
        client = Orthanc(url=BASE, transport=transport, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def make_async(transport: httpx.MockTransport):
    """Build an AsyncOrthanc on the router; use it inside ``asyncio.run``."""

    def make(**options: Any) -> AsyncOrthanc:
        options.setdefault("backoff", 0.001)
        return AsyncOrthanc(url=BASE, transport=transport, **options)

    return make
