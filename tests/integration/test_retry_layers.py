"""One retry layer per failure, counted through Prefect's own task engine on the session's
real Prefect server.

The client repeats a safe request after a blip of Orthanc itself (no answer, 502-504);
the Prefect task repeats the whole operation after a remote peer's or a job's transient
failure (a PACS that does not answer). Never both: before this rule a 503 on a read was
sent 16 times (4 attempts of the request x 4 runs of the task).

Requests are counted by a respx router scoped to the client's transport (Prefect's own API
client is untouched), then on the real research Orthanc by a counting transport (C-FINDs) and
a loopback listener standing for a PACS (associations).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import ClassVar

import httpx
import pytest
import respx
from prefect import flow
from prefect.client.orchestration import get_client

from prefect_orthanc.orthanc_client import Orthanc, OrthancHTTPError, PacsUnreachable
from prefect_orthanc.tasks import OrthancCredentials, find_resource_ids, query_modality

pytestmark = pytest.mark.usefixtures("prefect_server")

BASE = "http://orthanc.test:8042"
RETRIES = 3  # the defaults of both layers: OrthancSettings.retries and orthanc_task(retries=3)


class RoutedCredentials(OrthancCredentials):
    """The real block, whose clients send to a respx router instead of the network."""

    _block_type_name = "Routed Orthanc Credentials (test)"
    _block_type_slug = "routed-orthanc-credentials-test"
    transport: ClassVar[httpx.BaseTransport | None] = None

    def get_client(self) -> Orthanc:
        return Orthanc(self.settings(), transport=type(self).transport)


@pytest.fixture
def router():
    router = respx.Router(base_url=BASE, assert_all_called=False)
    RoutedCredentials.transport = httpx.MockTransport(router.handler)
    yield router
    RoutedCredentials.transport = None


def _run_task(task, *args, **options):
    """Run ``task`` (no delay between its retries) in a flow run; return its final state and
    how many times Prefect ran it."""

    states = []

    @flow(name="retry-layers")
    def wrapper() -> None:
        quick = task.with_options(retry_delay_seconds=0, retry_jitter_factor=None, **options)
        states.append(quick(*args, return_state=True))

    wrapper()
    (state,) = states

    async def run_count() -> int:
        async with get_client() as client:
            return (await client.read_task_run(state.state_details.task_run_id)).run_count

    return state, asyncio.run(run_count())


def test_a_503_on_a_read_is_retried_by_the_client_only(router):
    route = router.post("/tools/find").mock(return_value=httpx.Response(503))
    creds = RoutedCredentials(url=BASE, backoff=0.001)
    state, runs = _run_task(find_resource_ids, creds, "Study", {"PatientID": "*"})
    assert state.is_failed()
    with pytest.raises(OrthancHTTPError) as caught:
        state.result()
    assert caught.value.status_code == 503 and caught.value.transient
    assert runs == 1  # the task did not repeat what the client already retried
    assert route.call_count == RETRIES + 1  # 4 requests, not 4 x 4


def test_an_unreachable_pacs_is_retried_by_the_task_only(router):
    router.get("/modalities").mock(return_value=httpx.Response(200, json=["pacs"]))
    route = router.post("/modalities/pacs/query").mock(return_value=httpx.Response(
        500, json={"HttpStatus": 500, "OrthancStatus": 9,
                   "OrthancError": "Error in the network protocol",
                   "Details": 'DicomAssociation - connecting to AET "PACS": TCP '
                              'Initialization Error: Connection refused'}))
    creds = RoutedCredentials(url=BASE, backoff=0.001)
    state, runs = _run_task(query_modality, creds, "pacs", "Study", {"PatientID": "*"})
    with pytest.raises(PacsUnreachable):
        state.result()
    assert runs == RETRIES + 1  # the task retried the operation (longer delays by default)
    assert route.call_count == RETRIES + 1  # one C-FIND per run: not 4 x 4


class _Listener:
    """A loopback port standing for a PACS that closes every association at once: Orthanc
    reports it as "Error in the network protocol". Counts the connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # accept() is not woken by close(): poll a stop flag
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class _CountingTransport(httpx.HTTPTransport):
    """The real network, with a count of the C-FIND requests sent to Orthanc."""

    queries = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/query"):
            type(self).queries += 1
        return super().handle_request(request)


@pytest.fixture
def dropping_pacs(research, modality_limit):
    """Declare a modality on the real research Orthanc for ``port``; removed afterwards."""
    declared = []

    def declare(port: int) -> str:
        name = f"pacs-{port}"
        research.request("PUT", f"/modalities/{name}", expect="none",
                         json={"AET": "NOWHERE", "Host": "127.0.0.1", "Port": port})
        asyncio.run(modality_limit(name, 1))
        declared.append(name)
        return name

    yield declare
    for name in declared:
        research.request("DELETE", f"/modalities/{name}", expect="none")


def test_real_orthanc_each_pacs_failure_is_retried_by_one_layer(lab, dropping_pacs):
    """On the real research Orthanc (one task retry and one request retry, enough to see a
    multiplication): a PACS port where nothing listens is retried by the task alone (one
    C-FIND per task run); a PACS that accepts the connection and aborts the association is
    retried by the request alone (one task run, two associations)."""
    from prefect_orthanc.deployments.lab.servers import free_ports

    RoutedCredentials.transport = _CountingTransport()
    _CountingTransport.queries = 0
    creds = RoutedCredentials(url=lab.research.url, username=lab.research.username,
                              password=lab.research.password, retries=1, backoff=0.01)
    try:
        down = dropping_pacs(free_ports(1)[0])  # connection refused
        state, runs = _run_task(query_modality, creds, down, "Study", {"PatientID": "*"},
                                retries=1)
        with pytest.raises(PacsUnreachable):
            state.result()
        assert (runs, _CountingTransport.queries) == (2, 2)  # the task's: one C-FIND per run

        listener = _Listener()
        try:
            aborting = dropping_pacs(listener.port)
            _CountingTransport.queries = 0
            state, runs = _run_task(query_modality, creds, aborting, "Study",
                                    {"PatientID": "*"}, retries=1)
            with pytest.raises(PacsUnreachable):
                state.result()
        finally:
            listener.close()
        assert (runs, _CountingTransport.queries, listener.accepted) == (1, 2, 2)  # the request's
    finally:
        RoutedCredentials.transport = None
