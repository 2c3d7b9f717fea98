"""Content a header rewrite cannot make safe, held back with a named reason.

``risk_reason`` reads one SOURCE instance (a pydicom Dataset) and says why it must not be
shared under a profile, or ``None``. The reasons, in the order they are checked:

* ``modality <M>`` / ``SOP class <name>``: the profile's excluded modalities and SOP classes
  (free text, documents, screenshots, structured reports, photographs);
* ``video``: a video SOP class or an MPEG / H.264 / HEVC transfer syntax (faces, screens);
* ``photographic image``: a VL photographic SOP class or ImageType PHOTOGRAPH;
* ``label or overview image``: ImageType LABEL, OVERVIEW or THUMBNAIL (a whole-slide scanner
  photographs the slide label, often with the patient's name on it);
* ``burned-in annotation``: BurnedInAnnotation (0028,0301) is YES;
* ``overlay plane``: overlay data (60xx,3000) or curve data (50xx,xxxx), bitmaps and graphics
  that often carry names and dates drawn by a modality.

``include_risky`` lifts them all. Pixels are never inspected: these are the kinds of content
likely to show identifiers a header scan cannot see. Reasons hold no source value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from prefect_orthanc.flows.deid.dictionary import uid_name

if TYPE_CHECKING:
    from prefect_orthanc.flows.deid.profile import DeidProfile

__all__ = ["risk_reason"]

_IMAGE_TYPE_REASONS = {
    "LABEL": "label or overview image",
    "OVERVIEW": "label or overview image",
    "THUMBNAIL": "label or overview image",
    "PHOTOGRAPH": "photographic image",
}


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # an unreadable value says nothing
        return ""
    return str(value or "").strip(" \x00")


def _values(ds: Dataset, keyword: str) -> list[str]:
    try:
        value = ds.get(keyword)
    except Exception:
        return []
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" \
        else str(value).split("\\")
    return [str(v).strip(" \x00").upper() for v in items]


def risk_reason(profile: DeidProfile, ds: Dataset) -> str | None:
    """Why this source instance is held back under ``profile``, or None to share it."""
    if profile.include_risky:
        return None
    modality = _text(ds, "Modality").upper()
    sop = _text(ds, "SOPClassUID") or _text(getattr(ds, "file_meta", Dataset()),
                                            "MediaStorageSOPClassUID")
    if modality and modality in profile.exclude_modalities:
        return f"modality {modality}"
    if sop and (sop in profile.excluded_sop_class_uids
                or any(sop.startswith(root) for root in profile.exclude_sop_class_roots)):
        return f"SOP class {uid_name(sop) or 'excluded by the profile'}"
    sop_name = uid_name(sop).lower()
    syntax = uid_name(_text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID"))
    if "video" in sop_name or any(k in syntax for k in ("MPEG", "HEVC", "H.265")):
        return "video"
    if "photographic" in sop_name:
        return "photographic image"
    for value in _values(ds, "ImageType"):
        if value in _IMAGE_TYPE_REASONS:
            return _IMAGE_TYPE_REASONS[value]
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
        return "burned-in annotation"
    for tag in ds.keys():
        group = tag >> 16
        if (group & 0xFF01 == 0x6000 and tag & 0xFFFF == 0x3000) or group & 0xFF01 == 0x5000:
            return "overlay plane"
    return None
