"""What kind of value a DICOM attribute holds, from pydicom's data and UID dictionaries.

One owner for the questions the rewrite and the scanner both ask: is this UID a well-known
one (SOP class, transfer syntax, coding scheme, well-known frame of reference... anything in
pydicom's UID dictionary) or an instance's own; is this attribute an identifier; is it a date.
The rules read the dictionary's VR and keyword, never a hand-kept list of tags.
"""

from __future__ import annotations

import re

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.uid import UID_dictionary

__all__ = [
    "DATE_LIKE_KEYWORDS",
    "DATE_VRS",
    "STRING_VRS",
    "is_date_like",
    "is_identifier",
    "is_well_known_uid",
    "uid_name",
]

#: VRs that hold a calendar date (alone or with a time).
DATE_VRS = frozenset({"DA", "DT"})
#: String VRs an identifier can be written in.
STRING_VRS = frozenset({"SH", "LO", "UC", "ST", "LT", "UT", "CS"})
#: Identifier-like keywords: "…ID", "…IDs", "…Identifier", "…Number(s)" (order numbers,
#: accession, serial numbers, container and specimen identifiers, admission IDs...).
_IDENTIFIER_KEYWORD = re.compile(r"(?:ID|IDs|Identifier|Number|Numbers)(?=[A-Z]|$)")
_ID_VRS = STRING_VRS - {"CS"}
#: …except coded-value machinery, whose values are code meanings, not people or visits.
_CODED = re.compile(r"^(?:Context|Template|Mapping|CodingScheme|Code)")
#: Dates written in a calendar the DA/DT VRs cannot hold: removed, never shifted.
DATE_LIKE_KEYWORDS = frozenset({
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
})


def is_well_known_uid(uid: str) -> bool:
    """Whether ``uid`` is in pydicom's UID dictionary (SOP and meta SOP classes, transfer
    syntaxes, coding schemes, well-known frames of reference and SOP instances...): a
    standard's constant, shared by everyone, never remapped and never a finding."""
    return str(uid).strip(" \x00") in UID_dictionary


def uid_name(uid: str) -> str:
    """The dictionary name of a well-known UID, or ``""``."""
    entry = UID_dictionary.get(str(uid).strip(" \x00"))
    return entry[0] if entry else ""


def is_identifier(tag: int, vr: str | None = None) -> bool:
    """Whether a standard attribute holds an identifier of a person, visit, order, device or
    specimen: a string VR and an identifier-like keyword (``AccessionNumber``,
    ``PlacerOrderNumberProcedure``, ``RequestedProcedureID``, ``DeviceSerialNumber``,
    ``ContainerIdentifier``...). UIDs (VR UI) and numbers (IS, US...) are not."""
    keyword = keyword_for_tag(tag)
    if not keyword or _CODED.match(keyword):
        return False
    try:
        vr = vr or dictionary_VR(tag)
    except KeyError:
        return False
    return vr in _ID_VRS and _IDENTIFIER_KEYWORD.search(keyword) is not None


def is_date_like(keyword: str) -> bool:
    """A date the DA/DT VRs cannot hold (alternative calendars): remove it."""
    return keyword in DATE_LIKE_KEYWORDS
