"""Labels of Orthanc resources on every server version, and projects as labels.

The one owner of how a label is stored, read and searched. A label is a name of 1-64 letters,
digits, ``-`` or ``_``; a resource holds a *set* of them. A study belongs to a project when
it holds the project's name as a label: the collection flow adds it, the sharing flow
selects by it, a routing rule's ``label`` action adds labels the same way (so a rule can put
new studies into a project on purpose).

Storage, chosen from ``/system`` (``SystemInfo.supports_labels``):

- Orthanc >= 1.12 whose database has labels (``HasLabels``): Orthanc's own labels
  (``PUT /{level}/{id}/labels/{label}``, atomic per label) and ``/tools/find`` with
  ``Labels`` to select, one request per page.
- otherwise: the set, sorted and comma-separated, in one metadata entry,
  ``PrefectOrthancLabels`` (declare it in Orthanc's ``UserMetadata``). Adding labels is a
  read-modify-write made safe against concurrent writers by a compare-and-set: the write
  names the ``ETag`` it read (``If-Match``), Orthanc 1.10.1 refuses it with 409 when the value
  changed meanwhile, and the change is redone on the new value. Only the very first write of
  a resource's set has no value to compare with: with ``CheckRevisions: true`` Orthanc refuses
  a second creator too, which makes it safe; with Orthanc's default (false) writers that
  *create* the same set within the same few milliseconds can lose a label (measured: eight
  simultaneous creators lost 0-2 of 8 labels per round; none with ``CheckRevisions``). A
  warning says so once per process; set ``CheckRevisions: true`` in Orthanc.
  Orthanc < 1.12 cannot search metadata, so selecting lists the level's IDs and reads every
  resource's metadata with ``/tools/bulk-content`` (Orthanc >= 1.9.4), 500 per request: a
  fixed number of requests per thousand resources, never one per resource. The truth stays
  on each resource (no side index to drift when studies are deleted or edited elsewhere).
  The single-valued ``PrefectOrthancCollected`` entry of earlier releases is read as one
  more label, so studies collected before keep their project.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable

from prefect_orthanc.orthanc_client import Level, Orthanc, OrthancConflict, OrthancUsageError

__all__ = [
    "LABELS_METADATA",
    "LABEL_PATTERN",
    "LEGACY_PROJECT_METADATA",
    "attach_labels",
    "check_label",
    "find_labelled",
    "labels_of",
    "project_studies",
    "uses_native_labels",
]

#: the label set on Orthanc < 1.12 (declare it in ``UserMetadata``)
LABELS_METADATA = "PrefectOrthancLabels"
#: one project name, written by releases before label sets (read only)
LEGACY_PROJECT_METADATA = "PrefectOrthancCollected"
LABEL_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ATTEMPTS = 8
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def check_label(label: str) -> str:
    """The label, or ``OrthancUsageError`` saying what a label may hold."""
    if not isinstance(label, str) or not re.fullmatch(LABEL_PATTERN, label):
        raise OrthancUsageError("a label (or project name) is 1-64 letters, digits, '-' or "
                                "'_'")
    return label


def uses_native_labels(orthanc: Orthanc) -> bool:
    """True when the server has Orthanc labels: version >= 1.12.0 and a database back-end
    with labels (``HasLabels`` in ``/system``); read once per client."""
    return orthanc.system_info().supports_labels


def _decode(value: str | None) -> set[str]:
    return {v for v in (value or "").split(",") if re.fullmatch(LABEL_PATTERN, v)}


def _encode(labels: Iterable[str]) -> str:
    return ",".join(sorted(set(labels)))


def _from_metadata(metadata: dict[str, str]) -> frozenset[str]:
    legacy = metadata.get(LEGACY_PROJECT_METADATA, "")
    return frozenset(_decode(metadata.get(LABELS_METADATA)) | _decode(legacy))


def labels_of(orthanc: Orthanc, level: Level | str, resource_id: str) -> frozenset[str]:
    """The labels of one resource (one request). ``OrthancNotFound`` if it does not exist.

    >>> labels_of(orthanc, "Study", study_id)
    frozenset({'lung-2026', 'new'})
    """
    if uses_native_labels(orthanc):
        return frozenset(orthanc.labels(level, resource_id))
    return _from_metadata(orthanc.all_metadata(level, resource_id))


def attach_labels(orthanc: Orthanc, level: Level | str, resource_id: str,
                  labels: Iterable[str]) -> str:
    """Add labels to a resource, keeping the ones it has; returns how they are stored:
    ``"label"`` (Orthanc labels) or ``"metadata"`` (the ``PrefectOrthancLabels`` set).

    Safe when several flows add labels to the same resource at once (see the module
    docstring). Raises ``OrthancUsageError`` for a malformed label, ``OrthancNotFound`` when
    the resource is gone, ``OrthancConflict`` if the set kept changing for 8 attempts.

    >>> attach_labels(orthanc, "Study", study_id, ["lung-2026"])
    'metadata'
    """
    wanted = {check_label(label) for label in labels}
    if uses_native_labels(orthanc):
        for label in sorted(wanted):
            orthanc.add_label(level, resource_id, label)
        return "label"
    for attempt in range(_ATTEMPTS):
        entry = orthanc.metadata_entry(level, resource_id, LABELS_METADATA)
        value, etag = entry if entry else ("", None)
        have = _decode(value)
        if wanted <= have:
            return "metadata"
        try:
            if etag is None and entry is not None:  # a server too old to send ETags
                orthanc.set_metadata(level, resource_id, LABELS_METADATA,
                                     _encode(have | wanted))
            elif etag is None:  # first write: nothing to compare with
                _warn_without_revisions(orthanc)
                orthanc.set_metadata(level, resource_id, LABELS_METADATA, _encode(wanted),
                                     if_absent=True)
            else:
                orthanc.set_metadata(level, resource_id, LABELS_METADATA,
                                     _encode(have | wanted), if_match=etag)
        except OrthancConflict:
            time.sleep(0.01 * (attempt + 1))
            continue
        if etag is not None:
            return "metadata"
        # the first write has no revision to name: confirm it was not overwritten
        check = orthanc.metadata(level, resource_id, LABELS_METADATA)
        if wanted <= _decode(check):
            return "metadata"
    raise OrthancConflict(
        f"labels of a {Level(level).value.lower()} kept changing while being added "
        f"({_ATTEMPTS} attempts)", method="PUT", route="/{level}/{id}/metadata/{name}",
        status_code=409, orthanc_status=None, orthanc_error=None, details=None)


def _warn_without_revisions(orthanc: Orthanc) -> None:
    info = orthanc.system_info()
    if info.check_revisions is False and orthanc.settings.safe_url not in _warned:
        _warned.add(orthanc.settings.safe_url)
        _log.warning("Orthanc at %s runs without CheckRevisions: two flows creating the same "
                     "study's label set at the same moment can lose a label; set "
                     "\"CheckRevisions\": true in its configuration", orthanc.settings.safe_url)


def find_labelled(orthanc: Orthanc, level: Level | str, label: str, *,
                  page_size: int = 500) -> list[str]:
    """Orthanc IDs of the resources of ``level`` holding ``label``, in server order.

    >=1.12: ``/tools/find`` with ``Labels``; before: the level's IDs, then their metadata
    through ``/tools/bulk-content``, ``page_size`` per request (see the module docstring).

    >>> find_labelled(orthanc, "Study", "lung-2026")
    ['27f7126f-4f66ab19-6d2fbc77-3b9e1bd4-5cbc3bbf']
    """
    check_label(label)
    if uses_native_labels(orthanc):
        return orthanc.find(level, {}, labels=[label])
    ids = orthanc.find(level, {})
    return [r.id for r in orthanc.bulk_resources(level, ids, metadata=True,
                                                 page_size=page_size)
            if label in _from_metadata(r.metadata)]


def project_studies(orthanc: Orthanc, project: str) -> list[str]:
    """The studies collected for (or labelled with) ``project``."""
    return find_labelled(orthanc, Level.STUDY, project)

