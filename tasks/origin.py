"""Where a study came from: retrieved by this package, copied inside Orthanc, or received.

``study_origin`` tells the new-study flow which stable studies are really new:

- ``"retrieved"``: brought in by this package's ``retrieve_study`` (the collection flow);
- ``"copy"``: made inside this Orthanc by anonymize or modify (the sharing flow's
  de-identified copies, which live through packaging and delivery, often longer than
  ``StableAge``): Orthanc writes ``AnonymizedFrom`` / ``ModifiedFrom`` on them as it creates
  them, so they are known before they can become stable;
- ``"received"``: anything else (a modality or a user sent it): a new study.

Studies that ``retrieve_study`` C-MOVEs into Orthanc become stable like any other study and
fire the same ``orthanc.study.stable`` event, but they are not *new* studies: the new-study
flow skips them by default. Telling them apart has an ordering problem: Orthanc declares a
study stable ``StableAge`` seconds after its last instance arrived, which can come before the
retrieval has finished counting and marking it (the study does not exist in Orthanc before
the move, so nothing can be written on it in advance). So a retrieval leaves two records:

- **before the move**, a Prefect Variable ``orthanc_retrieving_<key>`` (``key`` = a short,
  non-reversible hash of the StudyInstanceUID, ``uid_key``) says "this study is being
  retrieved"; it is removed once the study is marked, and ignored after ``IN_FLIGHT_HOURS``
  (left behind only by a crashed run);
- **after the move**, the ``PrefectOrthancSource`` metadata on the study names the modality it
  was retrieved from (declare it in Orthanc's ``UserMetadata``). It stays: a study that grows
  later by another retrieval is still not new.

``study_origin`` checks both, so the answer is right whichever comes first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Literal

from prefect.variables import Variable

from prefect_orthanc.orthanc_client import Level, Orthanc
from prefect_orthanc.tasks.policy import uid_key
from prefect_orthanc.tasks.variables import delete_variable, put_variable

__all__ = [
    "COPY_METADATA",
    "COPY_SOURCE_PREFIX",
    "IN_FLIGHT_HOURS",
    "RETRIEVED_METADATA",
    "Origin",
    "end_retrieval",
    "end_retrievals_left_behind",
    "mark_copy",
    "mark_retrieved",
    "register_retrieval",
    "retrieval_variable",
    "study_origin",
]

#: on a study: the modality it was retrieved from by ``retrieve_study``
RETRIEVED_METADATA = "PrefectOrthancSource"
#: Orthanc's own metadata on a resource made by ``/anonymize`` or ``/modify``
COPY_METADATA = ("AnonymizedFrom", "ModifiedFrom")
#: an in-flight record older than this is a crashed run's leftover, not a retrieval
IN_FLIGHT_HOURS = 6.0

Origin = Literal["retrieved", "copy", "received"]


#: name prefix of the in-flight records (``retrieval_variable``)
RETRIEVING_PREFIX = "orthanc_retrieving_"


def retrieval_variable(study_uid: str) -> str:
    """The Prefect Variable naming an in-flight retrieval of ``study_uid`` (hashed)."""
    return f"{RETRIEVING_PREFIX}{uid_key(study_uid)}"


def register_retrieval(study_uid: str, modality: str) -> bool:
    """Record, before moving anything, that ``study_uid`` is being retrieved. False when a
    record was there already: a retrieval of the study that has not ended (a run that died,
    whose C-MOVE job may still be running in Orthanc, or another run's)."""
    return put_variable(retrieval_variable(study_uid),
                 {"modality": modality, "since": dt.datetime.now(dt.UTC).isoformat()},
                 tags=["prefect-orthanc", "retrieving"])


def end_retrieval(study_uid: str) -> None:
    """Drop the in-flight record (once the study is marked, or nothing arrived)."""
    delete_variable(retrieval_variable(study_uid))


def end_retrievals_left_behind(keys: Iterable[str]) -> int:
    """Drop the in-flight records a killed run left for studies now known complete (``keys``:
    ``uid_key`` of their StudyInstanceUIDs, as planning has them); returns how many. One
    listing of the records (by pages of 200), then one delete per record left behind."""
    from prefect.client.orchestration import get_client

    wanted = {f"{RETRIEVING_PREFIX}{key}" for key in keys}
    if not wanted:
        return 0
    names: list[str] = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.request("POST", "/variables/filter", json={
                "variables": {"name": {"like_": RETRIEVING_PREFIX}}, "limit": 200,
                "offset": offset}).json()
            names += [v["name"] for v in page if v["name"] in wanted]
            if len(page) < 200:
                break
            offset += 200
    for name in names:
        delete_variable(name)
    return len(names)


#: ``RETRIEVED_METADATA`` value prefix of a copy this package made by uploading (the sharing
#: flow's de-identified instances are rewritten outside Orthanc and uploaded, so Orthanc
#: writes no AnonymizedFrom on them)
COPY_SOURCE_PREFIX = "copy:"


def mark_copy(orthanc: Orthanc, study_id: str, how: str) -> None:
    """Mark a study this package made by uploading a transformed copy (``how``, e.g.
    ``"deidentified"``), right after its first instance arrived, so the new-study flow knows
    it before the study can become stable."""
    orthanc.set_metadata(Level.STUDY, study_id, RETRIEVED_METADATA, COPY_SOURCE_PREFIX + how)


def mark_retrieved(orthanc: Orthanc, study_ids: Iterable[str], modality: str) -> None:
    """Mark studies that arrived through a retrieval from ``modality`` (idempotent)."""
    for study_id in study_ids:
        orthanc.set_metadata(Level.STUDY, study_id, RETRIEVED_METADATA, modality)


def _in_flight(study_uid: str, now: dt.datetime) -> bool:
    record = Variable.get(retrieval_variable(study_uid))
    if not isinstance(record, Mapping):
        return False
    try:
        since = dt.datetime.fromisoformat(str(record.get("since")))
    except ValueError:
        return False
    return now - since < dt.timedelta(hours=IN_FLIGHT_HOURS)


def study_origin(metadata: Mapping[str, str], study_uid: str | None) -> Origin:
    """Where a study came from, from its metadata (``Orthanc.all_metadata``) and its
    StudyInstanceUID (for a retrieval not marked yet): see the module docstring.

    >>> study_origin(orthanc.all_metadata("Study", study_id), study_uid)
    'received'
    """
    source = metadata.get(RETRIEVED_METADATA) or ""
    if source.startswith(COPY_SOURCE_PREFIX):
        return "copy"
    if source:
        return "retrieved"
    if any(metadata.get(name) for name in COPY_METADATA):
        return "copy"
    if study_uid and _in_flight(str(study_uid), dt.datetime.now(dt.UTC)):
        return "retrieved"
    return "received"
