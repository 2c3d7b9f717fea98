"""Exceptions raised by the Orthanc client.

Every error says what went wrong in terms a user can act on (which route, which HTTP and
Orthanc status, which job) and nothing more: messages never hold a query string, a
credential or a DICOM value, because Prefect pickles a failed task's exception into its
result storage and shows it in the UI. Build them only through this module's helpers.

All errors pickle and unpickle to an equal error (they keep their fields in ``__dict__``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "SafeMessageError",
    "OrthancError",
    "OrthancHTTPError",
    "OrthancBadRequest",
    "OrthancUnauthorized",
    "OrthancNotFound",
    "OrthancUnavailable",
    "OrthancDimseError",
    "OrthancJobError",
    "OrthancJobFailed",
    "OrthancJobLost",
    "OrthancJobTimeout",
    "OrthancUnsupported",
    "OrthancArchiveError",
    "OrthancUsageError",
    "redact",
]


class SafeMessageError(Exception):
    """Base class of every error of this project whose message is PHI-free by construction:
    built from field names, counts, Orthanc IDs and settings, never from a DICOM value, a
    cell of a cohort file, a URL's query string or a credential.

    Prefect shows a failed task's message in the UI and pickles the exception into its
    storage; ``tasks.policy`` lets these through with their message and replaces every other
    exception by one that names only its type. Subclass it only for messages you build.
    """


class OrthancError(SafeMessageError):
    """Base class of every error raised by this package.

    ``transient`` tells whether the same request may succeed if simply tried again
    (a restart, a timeout, an overloaded server); callers and Prefect retry policies read it.
    """

    transient: bool = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name, value in fields.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), dict(self.__dict__)))

    def __str__(self) -> str:
        return self.message

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__  # type: ignore[union-attr]

    __hash__ = Exception.__hash__


def _rebuild(cls: type[OrthancError], state: dict[str, Any]) -> OrthancError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class OrthancHTTPError(OrthancError):
    """Orthanc answered with an HTTP error.

    Fields: ``method``, ``route`` (the route template, e.g. ``/studies/{id}/anonymize``),
    ``status_code``, ``orthanc_status`` (Orthanc's numeric error code, when sent),
    ``orthanc_error`` (Orthanc's fixed error name, e.g. "Unknown resource") and
    ``details`` (Orthanc's details, redacted).
    """

    method: str
    route: str
    status_code: int
    orthanc_status: int | None
    orthanc_error: str | None
    details: str | None


class OrthancBadRequest(OrthancHTTPError):
    """The request was refused as malformed (HTTP 400/415): fix the call, do not retry."""


class OrthancUnauthorized(OrthancHTTPError):
    """Missing or wrong credentials (HTTP 401/403). Check ORTHANC_USERNAME/ORTHANC_PASSWORD."""


class OrthancNotFound(OrthancHTTPError):
    """The route or the resource does not exist (HTTP 404)."""


class OrthancUnavailable(OrthancError):
    """Orthanc could not be reached or did not answer in time (refused, reset, timeout, 502-504).

    ``outcome_unknown`` is true when a request that starts work (a move, an upload) was sent
    but no answer came back: the work may have started, so it is not retried automatically.
    """

    transient = True
    method: str
    route: str
    reason: str
    outcome_unknown: bool


class OrthancDimseError(OrthancHTTPError):
    """A DICOM network operation (C-ECHO/C-FIND/C-MOVE/C-STORE) failed at the remote side.

    ``dimse_status`` holds the DIMSE status code (e.g. ``0xA801``) when Orthanc reported one.
    """

    dimse_status: str | None


class OrthancJobError(OrthancError):
    """Base class for errors about an Orthanc job. ``job_id`` is always set."""

    job_id: str


class OrthancJobFailed(OrthancJobError):
    """The job ended in Failure: ``error_code``, ``error_description``, ``error_details``."""

    error_code: int | None
    error_description: str | None
    error_details: str | None
    job_type: str | None


class OrthancJobLost(OrthancJobError):
    """The job disappeared from Orthanc's history before its outcome was read.

    Orthanc keeps only ``JobsHistorySize`` finished jobs; raise it or poll sooner.
    """

    transient = False


class OrthancJobTimeout(OrthancJobError):
    """The job did not finish within the allowed time. It is still running in Orthanc."""

    timeout: float
    state: str | None
    progress: int | None


class OrthancUnsupported(OrthancError):
    """The server's Orthanc version lacks this feature (detected from ``/system``)."""

    feature: str
    server_version: str
    required_version: str


class OrthancArchiveError(OrthancError):
    """An archive download ended short or was refused; no partial file is left behind."""


class OrthancUsageError(OrthancError, ValueError):
    """The call itself is wrong (e.g. asking for the children of an instance)."""


_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
_LONG_DIGITS = re.compile(r"\d{5,}")
_AFTER_VALUE = re.compile(r"(?i)(value|name|id)\s*[:=]\s*\S+")
_DIMSE = re.compile(r"(?i)0x[0-9a-f]{4}")


def redact(text: str | None, limit: int = 200) -> str | None:
    """Return Orthanc's free-text ``Details`` with anything that may be a DICOM value removed.

    Orthanc's details sometimes quote the offending value (a tag, a patient ID, a path); we
    keep the sentence and drop quoted strings, long digit runs and ``value: x`` tails.
    """
    if not text:
        return None
    text = _QUOTED.sub("<redacted>", text)
    text = _AFTER_VALUE.sub(lambda m: f"{m.group(1)}: <redacted>", text)
    text = _LONG_DIGITS.sub("<n>", text)
    return text[:limit]


def dimse_status(text: str | None) -> str | None:
    """Extract a DIMSE status code (``0xA801``) from Orthanc's details, if any."""
    if not text:
        return None
    match = _DIMSE.search(text)
    return match.group(0).upper().replace("0X", "0x") if match else None
