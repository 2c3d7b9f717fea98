"""The second half of de-identification: pydicom writes what Orthanc cannot, at every depth.

Orthanc's instance-level ``/anonymize`` (the Basic Profile, no ``Replace``) has removed or
emptied what PS3.15 Table E.1-1 lists, nested copies included. ``Rewriter.rewrite`` then walks
the anonymized dataset and, for every element, reads the SOURCE file's element at the same
place (same tag path, same item index: Orthanc removes elements, never sequence items) and
writes:

* every DA and DT, at any depth, shifted by the patient's offset (``dates.shift_value``:
  precision, time part and UTC offset kept) — and, under the modified-dates option, the
  source's dates the Basic Profile dropped come back shifted, with their times (PS3.15's
  "Retain Longitudinal Temporal Information With Modified Dates" keeps every date, modified);
  with ``dates="blank"`` every DA, DT and TM is emptied instead;
* every UI value that is not in pydicom's UID dictionary, at any depth, replaced by the keyed
  ``pseudo_uid`` of the source UID, scoped by the patient key;
* PatientName / PatientID at any depth: the patient's pseudonyms where they copy the top-level
  identity, another keyed pseudonym (PatientID) or nothing (names) otherwise; every other
  person name emptied; AccessionNumber, StudyID and every identifier-type attribute
  (``dictionary.is_identifier``) replaced by a keyed pseudonym; dates in alternative calendars
  removed;
* the provenance: PatientIdentityRemoved, LongitudinalTemporalInformationModified,
  DeidentificationMethod and its code sequence.

Nothing here logs or raises with a source value.
"""

from __future__ import annotations

import io
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from prefect_orthanc.flows.deid.dates import shift_value
from prefect_orthanc.flows.deid.dictionary import (
    DATE_VRS,
    is_date_like,
    is_identifier,
    is_well_known_uid,
)
from prefect_orthanc.flows.deid.profile import (
    DeidProfile,
    LinkageEntry,
    _normalize,
    pseudo_uid,
    pseudonym,
)

__all__ = ["Rewriter"]


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    text = str(value)
    return text.split("\\") if "\\" in text else [text]


def _set(elem: Any, values: list[str]) -> None:
    kept = values if any(values) else []
    elem.value = kept[0] if len(kept) == 1 else (kept or "")


class Rewriter:
    """Rewrites Orthanc-anonymized instances of ONE study against their source files.

    Holds the secret and the study's linkage: never pass it to Prefect (not a parameter,
    not a result). ``rewrite(anonymized, source)`` returns the anonymized Dataset, changed in
    place; ``to_bytes`` writes it as a DICOM file.
    """

    def __init__(self, profile: DeidProfile, secret: bytes, linkage: LinkageEntry) -> None:
        self.profile = profile
        self._secret = secret
        self.link = linkage
        self.key = linkage.patient_key
        self.shift = linkage.date_shift_days if profile.dates == "shift" else None
        self._source_name = _normalize(linkage.source_patient_name)
        self._source_id = _normalize(linkage.source_patient_id)

    def __repr__(self) -> str:
        return f"Rewriter(profile={self.profile.name!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a Rewriter holds the project secret and is not picklable")

    # ---------------------------------------------------------------- values

    def _pseudo(self, kind: str, value: str) -> str:
        return pseudonym(self._secret, kind, value, self.profile.pseudonym_prefix)

    def _uid(self, uid: str) -> str:
        uid = uid.strip(" \x00")
        if not uid or is_well_known_uid(uid):
            return uid
        return pseudo_uid(self._secret, uid, scope=self.key)

    def _date(self, vr: str, value: str) -> str:
        if self.shift is None or not value.strip(" \x00"):
            return ""
        return shift_value(vr, value, self.shift)

    # ---------------------------------------------------------------- walk

    def _source_values(self, elem: Any, source: Any) -> list[str]:
        return _strings(source.value if source is not None else elem.value)

    def _element(self, ds: Dataset, tag: Any, source: Any, depth: int) -> None:
        elem = ds[tag]
        vr, keyword = elem.VR, elem.keyword
        if keyword and is_date_like(keyword):
            del ds[tag]
            return
        if vr in DATE_VRS:
            _set(elem, [self._date(vr, v) for v in self._source_values(elem, source)])
        elif vr == "TM":
            if self.shift is None:
                elem.value = ""
            elif source is not None:
                elem.value = source.value
        elif vr == "UI":
            _set(elem, [self._uid(v) for v in self._source_values(elem, source)])
        elif keyword == "PatientName":
            same = [_normalize(v).split("=")[0] == self._source_name.split("=")[0]
                    for v in self._source_values(elem, source) if _normalize(v)]
            elem.value = self.link.patient_name if depth == 0 or (same and all(same)) else ""
        elif vr == "PN":
            elem.value = ""
        elif keyword == "PatientID":
            if depth == 0:
                elem.value = self.link.patient_id
            else:
                _set(elem, [self.link.patient_id if _normalize(v) == self._source_id
                            else self._pseudo("PatientID", v) if _normalize(v) else ""
                            for v in self._source_values(elem, source)])
        elif keyword == "StudyID":
            values = [v for v in self._source_values(elem, source) if _normalize(v)]
            elem.value = "" if not values else (
                self.link.study_id if depth == 0
                else self._pseudo("StudyID", f"{self.key}\x00{values[0]}"))
        elif keyword == "AccessionNumber":  # keyed by the patient, as in build_request
            _set(elem, [self._pseudo("AccessionNumber", f"{self.key}\x00{_normalize(v)}")
                        if _normalize(v) else "" for v in self._source_values(elem, source)])
        elif keyword and is_identifier(int(tag), vr):  # keyed by the patient: no cross-links
            _set(elem, [self._pseudo("Identifier", f"{self.key}\x00{_normalize(v)}")
                        if _normalize(v) else "" for v in self._source_values(elem, source)])

    def _restore_dates(self, ds: Dataset, source: Dataset) -> None:
        """Under the modified-dates option: the source's dates and times the Basic Profile
        dropped from this item come back, shifted (times as they were)."""
        for tag in source.keys():
            if tag in ds or tag.is_private:
                continue
            try:
                elem = source[tag]
            except Exception:
                continue
            if elem.VR in DATE_VRS and not (elem.keyword and is_date_like(elem.keyword)):
                values = [self._date(elem.VR, v) for v in _strings(elem.value)]
                if any(values):
                    ds.add_new(tag, elem.VR, values[0] if len(values) == 1 else values)
            elif elem.VR == "TM" and elem.value:
                ds.add_new(tag, "TM", elem.value)

    def _dataset(self, ds: Dataset, source: Dataset | None, depth: int) -> None:
        if self.shift is not None and source is not None:
            self._restore_dates(ds, source)
        for tag in list(ds.keys()):
            try:
                elem = ds[tag]
            except Exception:  # a value pydicom cannot read cannot be checked: drop it
                del ds[tag]
                continue
            match = None
            if source is not None and tag in source:
                try:
                    match = source[tag]
                except Exception:
                    match = None
            if elem.VR == "SQ":
                items = match.value if match is not None and match.VR == "SQ" else []
                for index, item in enumerate(elem.value or ()):
                    self._dataset(item, items[index] if index < len(items) else None,
                                  depth + 1)
                continue
            if match is not None and match.VR != elem.VR:
                match = None
            self._element(ds, tag, match, depth)

    def rewrite(self, anonymized: Dataset, source: Dataset) -> Dataset:
        """``anonymized`` (Orthanc's Basic Profile output of ``source``), rewritten in place
        and returned."""
        self._dataset(anonymized, source, 0)
        anonymized.PatientID = self.link.patient_id
        anonymized.PatientName = self.link.patient_name
        anonymized.StudyInstanceUID = self.link.study_uid
        anonymized.PatientIdentityRemoved = "YES"
        anonymized.LongitudinalTemporalInformationModified = \
            "MODIFIED" if self.shift is not None else "REMOVED"
        anonymized.DeidentificationMethod = list(self.profile.method_values())
        codes = []
        for code in self.profile.method_codes():
            item = Dataset()
            for keyword, value in code.as_item().items():
                setattr(item, keyword, value)
            codes.append(item)
        anonymized.DeidentificationMethodCodeSequence = Sequence(codes)
        meta = getattr(anonymized, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in anonymized:
            meta.MediaStorageSOPInstanceUID = anonymized.SOPInstanceUID
        if meta is not None and "SOPClassUID" in anonymized:  # a private class is remapped
            meta.MediaStorageSOPClassUID = anonymized.SOPClassUID
        return anonymized

    @staticmethod
    def to_bytes(ds: Dataset) -> bytes:
        """The dataset as a DICOM file (its transfer syntax kept)."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
