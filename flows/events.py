"""The ``orthanc.study.stable`` event contract, shared by both emitters and the trigger.

An Orthanc study is *stable* when no instance arrived for ``StableAge`` seconds. Two emitters
report it to Prefect: the Lua script ``deployments/orthanc/study_events.lua`` (inside Orthanc)
and the changes watcher (``flows/watcher.py``, for servers where scripts cannot be installed).
Both build the same event::

    event     orthanc.study.stable
    id        UUIDv8 from the Orthanc study ID and the study's LastUpdate (deterministic)
    occurred  the study's LastUpdate (UTC)
    resource  prefect.resource.id  = orthanc.<server>.study.<Orthanc study ID>
              prefect.resource.name = study <first 8 characters of the ID>
              orthanc.server, orthanc.level = study
    payload   study_id, server, last_update, emitter ("lua" or "changes")

A study this package retrieved itself (the collection flow's C-MOVEs mark it with the
``PrefectOrthancSource`` metadata, ``tasks.origin``) is reported under another name,
``orthanc.study.stable.retrieved`` (``RETRIEVED_EVENT``), same resource, ID and payload: it is
not a new study, so the new-study trigger (which expects ``orthanc.study.stable``) does not
start a run for it; a deployment that wants them (``include_retrieved``) expects both names,
or ``orthanc.study.stable*``. A study marked only after it became stable (a retrieval slower
than ``StableAge``) is still reported as ``orthanc.study.stable``; the new-study flow then
skips it as before.

No DICOM tag value is in it. Because the ID depends only on the study and its LastUpdate, the
same stable study reported twice (by one emitter retrying, or by both) has one ID, and Prefect
fires a trigger once for it (its server remembers event IDs for 30 minutes; the new-study flow
also skips a study it already handled at that LastUpdate). New instances change LastUpdate, so
a study that grows and becomes stable again is a new event.

    post_events([study_event("research", study_id, "20261123T101530", emitter="changes")])
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect_orthanc.orthanc_client.models import is_orthanc_id

__all__ = ["EVENT", "RETRIEVED_EVENT", "post_events", "retrieved_by_us", "study_event",
           "study_event_id", "study_resource_id"]

EVENT = "orthanc.study.stable"
#: the same event for a study this package retrieved (not a new study)
RETRIEVED_EVENT = "orthanc.study.stable.retrieved"
#: what ``tasks.origin.mark_retrieved`` writes: the source modality's name ("copy:..." marks
#: a copy, which stays an ``EVENT``: the new-study flow decides about copies)
_RETRIEVED_FROM = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

_STAMP = re.compile(r"^\d{8}T\d{6}$")
_SERVER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check(server: str, study_id: str, last_update: str | None = None) -> None:
    if not _SERVER.match(server):
        raise ValueError("server names are 1-64 letters, digits, '-' or '_'")
    if not is_orthanc_id(study_id):
        raise ValueError("not an Orthanc study ID (five groups of 8 hex digits)")
    if last_update is not None and not _STAMP.match(last_update):
        raise ValueError("LastUpdate is YYYYMMDDTHHMMSS")


def study_resource_id(server: str, study_id: str) -> str:
    """``orthanc.<server>.study.<Orthanc study ID>``: what triggers match on."""
    _check(server, study_id)
    return f"orthanc.{server}.study.{study_id}"


def study_event_id(study_id: str, last_update: str) -> UUID:
    """The deterministic event ID (an RFC 9562 version 8 UUID).

    Hex digits 1-12, 14-16 and 18-20 come from the Orthanc study ID (itself a SHA-1 of the
    study's DICOM identifiers, so well spread), digit 13 is the version (8), digit 17 the
    variant (8-b), and the last 12 digits are LastUpdate's ``YYMMDDHHMMSS``. The Lua emitter
    computes the same thing without a hash library.
    """
    _check("x", study_id, last_update)
    hex_ = study_id.replace("-", "")
    digits = re.sub(r"\D", "", last_update)[2:14]
    variant = format(8 + int(hex_[15], 16) % 4, "x")
    return UUID(hex_[:12] + "8" + hex_[12:15] + variant + hex_[16:19] + digits)


def _occurred(last_update: str) -> str:
    stamp = dt.datetime.strptime(last_update, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def retrieved_by_us(source: str | None) -> bool:
    """Whether a study's ``PrefectOrthancSource`` metadata value (None when unset) says this
    package retrieved it from a modality (the Lua emitter applies the same rule)."""
    return bool(source) and _RETRIEVED_FROM.match(str(source)) is not None


def study_event(server: str, study_id: str, last_update: str, *, emitter: str,
                retrieved: bool = False) -> dict[str, Any]:
    """One ``orthanc.study.stable`` event (``orthanc.study.stable.retrieved`` when
    ``retrieved``) as the JSON Prefect's ``POST /events`` accepts."""
    _check(server, study_id, last_update)
    return {
        "id": str(study_event_id(study_id, last_update)),
        "occurred": _occurred(last_update),
        "event": RETRIEVED_EVENT if retrieved else EVENT,
        "resource": {
            "prefect.resource.id": study_resource_id(server, study_id),
            "prefect.resource.name": f"study {study_id[:8]}",
            "orthanc.server": server,
            "orthanc.level": "study",
        },
        "payload": {"study_id": study_id, "server": server, "last_update": last_update,
                    "emitter": emitter},
    }


def post_events(events: Sequence[dict[str, Any]]) -> int:
    """Send events to the Prefect API in use (``PREFECT_API_URL``) and return how many.

    Raises when the API refuses them, so a caller (the watcher) keeps its cursor and retries
    instead of losing events.
    """
    if not events:
        return 0
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request("POST", "/events", json=list(events))
        response.raise_for_status()
    return len(events)
