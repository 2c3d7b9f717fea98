"""``tasks.server_writes.write``: a 503 (SQLite's "database is locked" on the embedded Prefect
server) is asked again at once through the same Prefect client, without its 2 s back-off;
other answers are the client's as usual. The Prefect client here talks to an
``httpx.MockTransport`` of its own (no server, nothing global)."""

from __future__ import annotations

import httpx
import pytest
from prefect.client.base import PrefectHttpxSyncClient

from prefect_orthanc.tasks import server_writes


class Client:
    """What ``write`` uses of a ``SyncPrefectClient``: its httpx client and ``request``."""

    def __init__(self, answers: list[int]) -> None:
        self.seen: list[str] = []
        self.fallbacks = 0

        def answer(request: httpx.Request) -> httpx.Response:
            self.seen.append(f"{request.method} {request.url.path}")
            status = answers.pop(0) if answers else 201
            return httpx.Response(status, json={"detail": "database is locked"}
                                  if status == 503 else {"ok": True})

        self._client = PrefectHttpxSyncClient(transport=httpx.MockTransport(answer),
                                              base_url="http://prefect.test/api")

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        self.fallbacks += 1
        return httpx.Response(201, request=httpx.Request(method, path))


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(server_writes, "CONFLICT_RETRY_SECONDS", (0.0, 0.0))


def test_a_write_conflict_is_asked_again_through_the_same_client():
    client = Client([503, 503, 201])
    response = server_writes.write(client, "DELETE", "/variables/name/{name}",
                                   path_params={"name": "orthanc_retrieving_0123456789ab"})
    assert response.status_code == 201
    assert client.seen == ["DELETE /api/variables/name/orthanc_retrieving_0123456789ab"] * 3
    assert client.fallbacks == 0


@pytest.mark.parametrize("status", [404, 409, 423])
def test_other_refusals_are_raised_at_once(status):
    client = Client([status])
    with pytest.raises(httpx.HTTPStatusError) as caught:
        server_writes.write(client, "POST", "/variables/", json={"name": "x", "value": 1})
    assert caught.value.response.status_code == status
    assert len(client.seen) == 1 and client.fallbacks == 0


def test_a_conflict_that_lasts_goes_back_to_the_clients_own_retries():
    client = Client([503] * (server_writes.CONFLICT_ATTEMPTS + 5))
    server_writes.write(client, "PATCH", "/variables/name/x", json={"value": 2})
    assert len(client.seen) == server_writes.CONFLICT_ATTEMPTS
    assert client.fallbacks == 1
