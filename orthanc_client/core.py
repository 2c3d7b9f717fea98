"""The one request path shared by the sync and async clients.

Operations are written once, as generators that *yield steps* (send this request, sleep this
long, stream this response to a file) and receive the outcome back. The sync client drives a
generator with blocking I/O, the async client with ``await``; neither contains Orthanc logic.
This module holds the steps, the retry policy, error translation and decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from prefect_orthanc.orthanc_client.errors import (
    OrthancArchiveError,
    OrthancBadRequest,
    OrthancConflict,
    OrthancDimseError,
    OrthancError,
    OrthancHTTPError,
    OrthancNotFound,
    OrthancUnauthorized,
    OrthancUnavailable,
    dimse_status,
    pacs_error,
    redact,
)
from prefect_orthanc.orthanc_client.models import ArchiveResult

R = TypeVar("R")

#: "etag": the body as text with the response's ``ETag`` header, as ``(text, etag or None)``
Expect = Literal["json", "bytes", "text", "etag", "none"]


@dataclasses.dataclass(frozen=True)
class Call:
    """One HTTP exchange with Orthanc.

    ``route`` is the route template used in messages (``/studies/{id}``); ``path`` is the
    real path. ``safe`` marks requests that may be retried (reads, and writes whose repeat
    is harmless); a POST that starts work is never safe. ``long`` selects the long timeout.
    """

    method: str
    path: str
    route: str
    params: Mapping[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None
    expect: Expect = "json"
    safe: bool = False
    long: bool = False

    def __repr__(self) -> str:  # never show bodies or query values
        return f"Call({self.method} {self.route})"


@dataclasses.dataclass(frozen=True)
class Send:
    """Step: perform ``call`` once; the driver answers with an ``httpx.Response`` or the
    ``httpx.RequestError`` it caught (as a value, not raised)."""

    call: Call


@dataclasses.dataclass(frozen=True)
class Sleep:
    """Step: wait ``seconds``; the driver answers ``None``."""

    seconds: float


@dataclasses.dataclass(frozen=True)
class Download:
    """Step: stream ``call``'s response body into ``sink``; the driver answers with the
    ``httpx.Response`` (body unread) on an HTTP error, the ``RequestError`` it caught, or
    ``None`` once every chunk has been handed to the sink."""

    call: Call
    sink: ArchiveSink


Step = Send | Sleep | Download
Steps = Generator[Step, Any, R]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)]."""

    retries: int = 3
    base: float = 0.5
    cap: float = 10.0

    def delays(self) -> Iterator[float]:
        for attempt in range(self.retries):
            yield random.uniform(0, min(self.cap, self.base * 2**attempt))


# ---------------------------------------------------------------- error translation

_BY_STATUS: dict[int, type[OrthancHTTPError]] = {
    400: OrthancBadRequest,
    401: OrthancUnauthorized,
    403: OrthancUnauthorized,
    404: OrthancNotFound,
    409: OrthancConflict,
    415: OrthancBadRequest,
}
_TRANSIENT_STATUS = {429, 502, 503, 504}
# Orthanc error codes of a failed DICOM exchange: NetworkProtocol (9), Timeout (16),
# and the DicomFindUnavailable/DicomMoveUnavailable family (2000s) reported for modalities.
_DIMSE_CODES = {9, 16}
_DICOM_ROUTES = ("/modalities/", "/queries/")


def _orthanc_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = json.loads(response.content or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def http_error(call: Call, response: httpx.Response,
               credentials: str = "the ORTHANC_USERNAME / ORTHANC_PASSWORD environment "
                                  "variables") -> OrthancHTTPError:
    """Build the error for an HTTP error answer, from Orthanc's JSON body when present."""
    body = _orthanc_body(response)
    status = response.status_code
    orthanc_status = body.get("OrthancStatus")
    orthanc_error = body.get("OrthancError") if isinstance(body.get("OrthancError"), str) else None
    raw_details = body.get("Details") if isinstance(body.get("Details"), str) else None
    cls: type[OrthancHTTPError] = _BY_STATUS.get(status, OrthancHTTPError)
    is_dicom_route = call.route.startswith(_DICOM_ROUTES)
    if is_dicom_route and status not in (400, 401, 403, 404) and (
        status == 422 or orthanc_status in _DIMSE_CODES or (orthanc_status or 0) >= 2000
        or dimse_status(raw_details)
    ):
        cls = OrthancDimseError
    reason = orthanc_error or response.reason_phrase or "error"
    message = f"{call.method} {call.route} failed: HTTP {status} ({reason})"
    fields: dict[str, Any] = dict(
        method=call.method, route=call.route, status_code=status,
        orthanc_status=orthanc_status, orthanc_error=orthanc_error, details=redact(raw_details),
    )
    if cls is OrthancDimseError:
        fields["dimse_status"] = dimse_status(raw_details)
        if fields["dimse_status"]:
            message += f", DIMSE status {fields['dimse_status']}"
    if cls is OrthancUnauthorized:
        message += f": check the username and password of {credentials}"
    elif cls is OrthancNotFound and call.route == "/system":  # every Orthanc has /system
        message += (": no Orthanc REST API at this URL: check its host, port and path prefix "
                    "(a reverse proxy's, e.g. https://host/orthanc)")
    elif cls is OrthancNotFound and call.route.startswith(("/modalities/{name}", "/peers/{name}")):
        kind = "modality" if call.route.startswith("/modalities") else "peer"
        message += f": Orthanc has no {kind} of that name in its configuration"
    if cls is OrthancDimseError:
        specific = pacs_error(raw_details, operation=_dicom_operation(call.route), **fields)
        if specific is not None:
            specific.message = f"{call.method} {call.route} failed: {specific.message}"
            return specific
    error = cls(message, **fields)
    # A DICOM peer that could not be reached (association refused, timeout: no DIMSE status)
    # may be back soon; a DIMSE status is the peer's considered answer and is final.
    unreachable_peer = cls is OrthancDimseError and not fields["dimse_status"] and status != 422
    error.transient = status in _TRANSIENT_STATUS or unreachable_peer
    return error


def _dicom_operation(route: str) -> str:
    for suffix, name in (("/echo", "C-ECHO"), ("/query", "C-FIND"), ("/retrieve", "C-MOVE"),
                         ("/move", "C-MOVE"), ("/store", "C-STORE")):
        if route.endswith(suffix):
            return name
    return "DICOM request"


def transport_error(call: Call, exc: httpx.RequestError, base_url: str) -> OrthancUnavailable:
    """Build the error for a request that got no HTTP answer at all."""
    if isinstance(exc, httpx.TimeoutException):
        connecting = isinstance(exc, httpx.ConnectTimeout)
        reason = "timed out" + (" while connecting" if connecting else "")
    elif isinstance(exc, httpx.ConnectError):
        reason = "connection refused or host unreachable"
    else:
        reason = f"connection lost ({type(exc).__name__})"
    sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    outcome_unknown = sent and not call.safe
    message = f"{call.method} {call.route} to Orthanc at {base_url}: {reason}"
    if outcome_unknown:
        message += "; the request may have been executed, so it was not retried"
    return OrthancUnavailable(
        message, method=call.method, route=call.route, reason=reason,
        outcome_unknown=outcome_unknown,
    )


def decode(call: Call, response: httpx.Response) -> Any:
    if call.expect == "none":
        return None
    if call.expect == "bytes":
        return response.content
    if call.expect == "text":
        return response.text
    if call.expect == "etag":
        return response.text, response.headers.get("ETag")
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise OrthancHTTPError(
            f"{call.method} {call.route}: Orthanc sent a body that is not JSON",
            method=call.method, route=call.route, status_code=response.status_code,
            orthanc_status=None, orthanc_error=None, details=None,
        ) from None


# ---------------------------------------------------------------- the request path


def retried_here(call: Call, error: OrthancError) -> bool:
    """Whether the request layer retries ``error`` (and no other layer does).

    One layer retries each failure, never two multiplied. This one repeats a *safe* request
    (``Call.safe``: a read, or a write whose repeat is harmless) after a blip of the exchange
    with Orthanc itself: no answer (``OrthancUnavailable``), HTTP 429/502/503/504, or an error
    marked for an immediate repeat (``retry_later`` False: a rejected association). A remote
    peer's or a job's transient failure (``PacsUnreachable``, ``PacsBusy``, a C-STORE job that
    could not reach its destination) is Orthanc's considered answer about something that
    takes longer to come back: it is left to the operation's caller, a Prefect task retry with
    longer delays (``tasks.policy``). A request that is not safe is never repeated here.
    """
    if not (call.safe and error.transient):
        return False
    return (isinstance(error, OrthancUnavailable) or not error.retry_later
            or getattr(error, "status_code", None) in _TRANSIENT_STATUS)


def _give_up(error: OrthancError, retried: bool) -> OrthancError:
    """``error`` as raised: marked ``retry_later = False`` when this layer owned its retries
    (a task retry would multiply them) or when repeating the request is unsafe (sent, no
    answer: it may have been executed)."""
    if retried or getattr(error, "outcome_unknown", False):
        error.retry_later = False
    return error


def request(call: Call, policy: RetryPolicy, base_url: str, credentials: str = "") -> Steps[Any]:
    """Send ``call``; retry it on the failures ``retried_here`` owns; translate errors; decode.

    Errors raised after this layer's retries carry ``retry_later = False``, so a Prefect task
    retry does not repeat them (see ``tasks.policy.is_transient``).
    """
    delays = policy.delays()
    while True:
        outcome = yield Send(call)
        error = _failure(call, outcome, base_url, credentials)
        if error is None:
            return decode(call, outcome)
        owned = retried_here(call, error)
        delay = next(delays, None) if owned else None
        if delay is None:
            raise _give_up(error, owned)
        yield Sleep(delay)


def _failure(call: Call, outcome: Any, base_url: str, credentials: str) -> OrthancError | None:
    if isinstance(outcome, httpx.RequestError):  # transport, decoding, redirect loops
        return transport_error(call, outcome, base_url)
    assert isinstance(outcome, httpx.Response)
    if outcome.is_error:
        return http_error(call, outcome, *([credentials] if credentials else []))
    return None


def download(call: Call, dest: Path, policy: RetryPolicy, base_url: str,
             credentials: str = "") -> Steps[ArchiveResult]:
    """Stream ``call``'s body to ``dest`` atomically, with byte count and SHA-256.

    The body goes to a temporary file beside ``dest`` and is renamed only when complete, so a
    failed or interrupted download never leaves a file that looks finished.
    """
    delays = policy.delays()
    # A ZIP gains nothing from gzip, and Orthanc would spend CPU on it: ask for it as is.
    call = dataclasses.replace(call, headers={**(call.headers or {}),
                                              "Accept-Encoding": "identity"})
    while True:
        sink = ArchiveSink(dest)
        outcome = yield Download(call, sink)
        if outcome is None:
            return sink.commit()
        sink.abort()
        error = _failure(call, outcome, base_url, credentials)
        if error is None:  # a 2xx answer with no body streamed cannot happen; be explicit
            raise OrthancArchiveError(f"{call.method} {call.route}: download ended without data")
        owned = retried_here(call, error)
        delay = next(delays, None) if owned else None
        if delay is None:
            raise _give_up(error, owned)
        yield Sleep(delay)


class ArchiveSink:
    """Receives a streamed body: writes to a temp file, hashes, renames on commit."""

    def __init__(self, dest: Path) -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".partial-", dir=self.dest.parent)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._hash = hashlib.sha256()
        self.size = 0
        self.expected: int | None = None

    def begin(self, response: httpx.Response) -> bool:
        """The answer's headers are in: note the length to expect (known only when the body is
        not encoded). False when the body is already read (a mock transport such as respx):
        it is written here and there is nothing to stream; True otherwise."""
        length = response.headers.get("Content-Length")
        identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
        self.expected = int(length) if identity and length and length.isdigit() else None
        if response.is_stream_consumed:
            self.write(response.content)
            return False
        return True

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def commit(self) -> ArchiveResult:
        self._file.close()
        if self.expected is not None and self.expected != self.size:
            self._tmp.unlink(missing_ok=True)
            raise OrthancArchiveError(
                f"archive ended short: {self.size} of {self.expected} bytes; nothing was kept",
                size=self.size, expected=self.expected,
            )
        os.replace(self._tmp, self.dest)
        return ArchiveResult(path=self.dest, size=self.size, sha256=self._hash.hexdigest())

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def run_sync(steps: Steps[R], execute: Callable[[Step], Any]) -> R:
    """Drive an operation with a blocking executor of steps."""
    value: Any = None
    while True:
        try:
            step = steps.send(value)
        except StopIteration as stop:
            return stop.value
        value = execute(step)
