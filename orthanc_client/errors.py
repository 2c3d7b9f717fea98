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
    "AssociationRejected",
    "MoveDestinationUnknown",
    "MoveRefused",
    "OrthancArchiveError",
    "OrthancBadRequest",
    "OrthancConflict",
    "OrthancDimseError",
    "OrthancError",
    "OrthancHTTPError",
    "OrthancJobError",
    "OrthancJobFailed",
    "OrthancJobLost",
    "OrthancJobTimeout",
    "OrthancNotFound",
    "OrthancUnauthorized",
    "OrthancUnavailable",
    "OrthancUnsupported",
    "OrthancUsageError",
    "PacsBusy",
    "PacsUnreachable",
    "QueryRefused",
    "SafeMessageError",
    "StoreRefused",
    "pacs_error",
    "redact",
    "store_failure",
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
    #: whether a later attempt (a Prefect task retry) is worth it when ``transient``: False
    #: when the client already retried the request (one retry layer per failure, see
    #: ``core.retried_here``) or when the request was sent without an answer
    retry_later: bool = True
    #: a short, stable name of what went wrong, for per-row reports
    reason_code: str = "orthanc_error"

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
        return type(other) is type(self) and other.__dict__ == self.__dict__

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


class OrthancConflict(OrthancHTTPError):
    """Orthanc refused a conditional write (HTTP 409): the value changed since it was read
    (a stale ``If-Match``), or the server checks revisions (``CheckRevisions``) and the write
    named none. Read the value again and retry."""


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
    #: a short, stable name of what went wrong, for per-row reports ("dimse_failure" here)
    reason_code: str = "dimse_failure"


# ------------------------------------------------------------------ what the PACS said
#
# Orthanc 1.10.1 reports every failed association with the same HTTP 500 "Error in the network
# protocol" (Orthanc error 9); only its ``Details`` (or a C-MOVE job's ``ErrorDetails``) tell
# what happened. ``pacs_error`` reads them into one of these types, each with a message saying
# what to fix. ``job_id`` is set when the failure came from an Orthanc job (a C-MOVE).


class PacsUnreachable(OrthancDimseError):
    """The PACS did not answer at the host and port configured for it (down, wrong port,
    firewall, timeout). Transient: it may be back soon, which takes a while, so a Prefect task
    retry repeats the operation, not the request. When the connection was made and the
    association aborted ("Peer aborted": the PACS is up and refused for a moment),
    ``retry_later`` is False: the request repeats itself, as for ``AssociationRejected``."""

    transient = True
    reason_code = "pacs_unreachable"


class AssociationRejected(OrthancDimseError):
    """The PACS refused the association: either the called AET configured for it in Orthanc
    is not the PACS's own AET (refused every time), or the PACS had no free association
    (refused for a moment). Orthanc 1.10.1 does not pass on the PACS's reason, so it is retried
    a few times by the request itself (``retry_later`` is False: a task retry would only
    multiply the attempts of a wrong AET)."""

    transient = True
    retry_later = False
    reason_code = "association_rejected"


class MoveDestinationUnknown(OrthancDimseError):
    """The PACS does not know the C-MOVE destination (DIMSE 0xA801): research's AET, host and
    port must be registered at the PACS. Permanent until the PACS is configured."""

    reason_code = "move_destination_unknown"


class QueryRefused(OrthancDimseError):
    """The PACS refused the C-FIND itself (a failure status such as 0xA900 or 0xC000: keys it
    does not support, a level it does not serve, a missing upper-level UID). Permanent."""

    reason_code = "query_refused"


class MoveRefused(OrthancDimseError):
    """The PACS refused the C-MOVE (a failure status other than 0xA801). An Orthanc PACS also
    answers 0xC000 for a destination AET it does not know. Permanent."""

    reason_code = "move_refused"


class StoreRefused(OrthancDimseError):
    """The destination refused a C-STORE with a failure status. Permanent."""

    reason_code = "store_refused"


class PacsBusy(OrthancDimseError):
    """The PACS is out of resources (DIMSE 0xA7xx): nothing was done. Transient."""

    transient = True
    reason_code = "pacs_busy"


_UNREACHABLE = re.compile(r"(?i)TCP Initialization Error|connection refused|timed? ?out|"
                          r"no route to host|network is unreachable|host is unreachable|"
                          r"cannot connect|Peer aborted|Network timeout")
_REJECTED = re.compile(r"(?i)association rejected")
# The TCP connection was made but the association did not complete: the PACS is up and refused
# for a moment (Orthanc 1.10.1 reports an SCP's "rejected transient" this way).
_ABORTED = re.compile(r"(?i)Peer aborted")


def pacs_error(raw_details: str | None, *, operation: str, modality_hint: str = "the PACS",
               **fields: Any) -> OrthancDimseError | None:
    """The specific PACS error that Orthanc's raw ``details`` describe, or None when they say
    nothing recognisable. ``operation`` is "C-FIND", "C-MOVE" or "C-ECHO"; ``fields`` are the
    error's fields (``method``, ``route``, ``status_code``... or ``job_id``).

    >>> pacs_error("C-MOVE SCU to AET \"PACS\" has failed with DIMSE status 0xA801",
    ...            operation="C-MOVE").reason_code
    'move_destination_unknown'
    """
    status = dimse_status(raw_details)
    text = raw_details or ""
    cls: type[OrthancDimseError]
    if status == "0xA801":
        cls, why = MoveDestinationUnknown, (
            f"{modality_hint} does not know the C-MOVE destination (DIMSE 0xA801): register "
            "research's AET, host and port at the PACS (its list of move destinations)")
    elif _REJECTED.search(text):
        cls, why = AssociationRejected, (
            f"{modality_hint} rejected the association: check that the AET configured for it "
            "in research's DicomModalities is the PACS's own AET and that the PACS accepts "
            "research's AET; if it is, the PACS had no free association (its limit): retry later")
    elif _UNREACHABLE.search(text) and not status:
        cls, why = PacsUnreachable, (
            f"{modality_hint} did not answer at the host and port configured for it in "
            "research's DicomModalities (down, wrong port or a firewall)")
    elif status and status.upper().startswith(("0XA", "0XC", "0X01", "0X02")) \
            and status != "0xFE00":
        if status.upper().startswith("0XA7"):
            cls, why = PacsBusy, (
                f"{modality_hint} is out of resources for the {operation} (DIMSE status "
                f"{status}): nothing was done, it may succeed later")
        elif operation == "C-MOVE":
            cls, why = MoveRefused, (
                f"{modality_hint} refused the C-MOVE with DIMSE status {status} (an Orthanc "
                "PACS answers 0xC000 for a destination AET it does not know: register "
                "research's AET at the PACS)")
        elif operation in ("C-STORE", "peer store"):
            cls, why = StoreRefused, (
                f"the destination refused the {operation} with DIMSE status {status} "
                "(a SOP class or transfer syntax it does not accept, or no space left)")
        else:
            cls, why = QueryRefused, (
                f"{modality_hint} refused the {operation} with DIMSE status {status} "
                "(unsupported keys or level, or a missing upper-level UID)")
    else:
        return None
    fields = {"method": None, "route": None, "status_code": None, "orthanc_status": None,
              "orthanc_error": None, "details": redact(raw_details), **fields,
              "dimse_status": status}
    error = cls(f"{operation}: {why}", **fields)
    if cls is PacsUnreachable and _ABORTED.search(text):
        error.retry_later = False  # a moment's refusal: the request's to retry, not the task's
    return error


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


# Orthanc's NetworkProtocol (9) and Timeout (16): the job could not reach its destination
_NETWORK_CODES = (9, 16)


def store_failure(error: OrthancJobFailed, *, operation: str = "C-STORE") -> OrthancError:
    """The error to raise for a failed C-STORE or peer-store job: the specific PACS error when
    the details name one, else the job failure, marked ``transient`` when it was a network
    failure (the destination down or unreachable). Sending again is harmless (an instance
    already there is simply stored again), so a transient one is worth a retry."""
    specific = pacs_error(error.error_details, operation=operation, job_id=error.job_id)
    if specific is not None:
        return specific
    if error.error_code in _NETWORK_CODES:
        error.transient = True
        error.reason_code = "destination_unreachable"
        error.message += "; the destination could not be reached: retried later"
    return error
