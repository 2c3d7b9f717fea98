"""Verify before anything leaves: scan de-identified DICOM for the source's identifiers.

``identifiers_from`` collects every identifying string of the SOURCE instances (names and
their parts, IDs, birth date, accession numbers, addresses, phones, institutions, physicians,
study dates, instance UIDs). ``scan_dataset`` walks every element of a de-identified dataset
(file meta, top level, sequences at any depth, private tags, unknown-VR bytes) and reports each
place where one of them still appears; ``scan_zip`` does it for every member of the ZIP about to
be delivered, member names included. Delivery must be blocked unless the report is clean.

What this cannot do:

* **Pixels are not checked.** Burned-in text (ultrasound, secondary capture, scanned documents,
  screenshots) and faces are invisible to a header scan: that is why ``DeidProfile`` excludes
  risky modalities and SOP classes by default.
* It finds the identifiers the SOURCE files hold (``identifiers_from`` parses them: names in
  every component group, identifier-type attributes, dates in the forms people type, UIDs),
  as they were written: a name spelled differently, a relative's name in free text, a phone
  number with other spacing, or text in an encoding other than the dataset's character set,
  Latin-1, UTF-8 or UTF-16LE (binary values) is not found. One-character name components
  (initials, a one-ideograph family name) are only found inside the whole name. A clean report
  is evidence, not proof of anonymity.

Findings name the place (tag path, ZIP member index) and the KIND of identifier matched,
never the value, so reports and logs can be kept and shown.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag

from prefect_orthanc.flows.deid.dates import typed_forms
from prefect_orthanc.flows.deid.dictionary import is_identifier, is_well_known_uid

__all__ = [
    "Finding",
    "Identifiers",
    "ScanReport",
    "identifiers_from",
    "normalize",
    "scan_dataset",
    "scan_package",
    "scan_zip",
]

#: Text VRs whose values are scanned (TM is skipped: times are kept on purpose; UI values are
#: compared whole against the source UIDs instead).
TEXT_VRS = frozenset({"AE", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: Byte VRs searched for embedded text (private blobs, unknown VR).
BYTE_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN", "ox", "xs", "ob_or_ow"})
#: Bulk data never searched: pixel, waveform and overlay samples and padding hold no text to
#: find (the waveform's channel labels and annotations around them are searched).
SKIPPED_TAGS = frozenset({0x7FE00001, 0x7FE00002, 0x7FE00008, 0x7FE00009, 0x7FE00010,
                          0x54001010, 0xFFFCFFFC})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: Members up to this size are parsed in memory; larger ones from a temporary file, with
#: large values read only when scanned (pixel data never is).
IN_MEMORY_LIMIT = 64 * 1024 * 1024
DEFER_SIZE = 1024 * 1024

# How the identifying keywords that are neither names nor identifier-type are collected:
#   words: the whole value, matched as whole words (addresses, institutions)
#   text:  the whole value, matched as an ID (phone numbers, birth date)
_WORDS, _TEXT = "words", "text"
_COLLECT: dict[str, str] = {
    "PatientAddress": _WORDS,
    "PatientTelephoneNumbers": _TEXT,
    "PatientBirthDate": _TEXT,
    "InstitutionName": _WORDS,
    "InstitutionAddress": _WORDS,
    "InstitutionalDepartmentName": _WORDS,
}
#: Kinds reported first when one value is several (a PatientID copied as OtherPatientIDs).
_RANKED = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
           "AccessionNumber", "StudyID")
_KIND_RANK = {keyword: rank for rank, keyword in enumerate(_RANKED)}
_UID_KIND = {"MediaStorageSOPInstanceUID": "SOPInstanceUID"}

#: Values that say nothing about a person, and name particles/titles that are not names.
GENERIC_VALUES = frozenset({
    "yes", "no", "none", "unknown", "anonymous", "anonymized", "anonymised", "n/a", "null",
    "nil", "other", "male", "female", "test", "patient", "unk", "not available",
})
NAME_NOISE = frozenset({
    "mr", "mrs", "ms", "miss", "dr", "prof", "md", "phd", "jr", "sr", "iii", "rev", "sir",
    "van", "von", "der", "den", "del", "della", "des", "dos", "das", "mac", "bin", "ibn", "ben",
    "the", "de", "da", "di", "du", "la", "le", "el", "al", "st", "ii", "iv", "mx",
})
#: The shortest ID or free value kept as a target (shorter ones match everywhere).
MIN_LENGTH = 3
#: The shortest name component matched alone; shorter ones (initials, one ideograph) are
#: matched only inside the whole name.
MIN_NAME_PART = 2

_SPACES = re.compile(r"\s+")
_TAG_KEY = re.compile(r"^([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})$")
_UID_TOKEN = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){2,}(?![0-9])")
_ALNUM = re.compile(r"[^\W_]")
_LATIN_RUN = re.compile(rb"[\x20-\x7e\xa0-\xff]{3,}")
_UTF16_RUN = re.compile(rb"(?:[\x20-\x7e]\x00){3,}")
#: Scripts written without spaces between words (CJK ideographs, kana, hangul, Thai):
#: their names are matched anywhere, not as whole words.
_UNSPACED = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                       r"\uf900-\ufaff\uff66-\uff9f]")
_ALPHA_PREFIX = re.compile(r"^[^\W\d_]+[-_ /:.]*(?=\d)")


def normalize(value: Any) -> str:
    """Casefolded, ``^`` and ``=`` (PN separators) and NUL as spaces, whitespace collapsed."""
    text = str(value).replace("^", " ").replace("=", " ").replace("\x00", " ")
    return _SPACES.sub(" ", text.casefold()).strip()


class _Term:
    __slots__ = ("_pattern", "kind", "rank", "text", "words")

    def __init__(self, text: str, kind: str, words: bool, rank: int) -> None:
        self.text, self.kind, self.words, self.rank = text, kind, words, rank
        self._pattern: re.Pattern[str] | None = None

    def found_in(self, text: str) -> bool:
        if self.text not in text:
            return False
        if not self.words:
            return True
        if self._pattern is None:  # whole words: no letter or digit on either side
            self._pattern = re.compile(r"(?<![^\W_])" + re.escape(self.text) + r"(?![^\W_])")
        return self._pattern.search(text) is not None


class Identifiers:
    """The identifying strings and UIDs of a set of source instances, normalized.

    Built by ``identifiers_from`` (add more with ``add`` / ``add_person`` / ``add_id`` /
    ``add_date`` / ``add_uid``). Its ``repr`` shows counts only: the values never leave this
    object except through ``kinds_in``.
    """

    __slots__ = ("_terms", "_uids")

    def __init__(self) -> None:
        self._terms: dict[str, _Term] = {}
        self._uids: dict[str, str] = {}

    def add(self, kind: str, value: Any, *, words: bool = False, rank: int = 1_000,
            min_length: int = MIN_LENGTH) -> bool:
        """Add one identifying value (normalized). Empty, short (< ``min_length``) and
        generic values are ignored; returns whether it was kept. ``words``: match whole
        words only (text in a script written without spaces always matches anywhere)."""
        text = normalize(value)
        if len(text) < min_length or text in GENERIC_VALUES or not _ALNUM.search(text):
            return False
        if words and _UNSPACED.search(text):
            words = False
        known = self._terms.get(text)
        if known is None:
            self._terms[text] = _Term(text, kind, words, rank)
        else:  # one value, two kinds: keep the stronger kind, the looser match
            if rank < known.rank:
                known.kind, known.rank = kind, rank
            if known.words and not words:
                known.words, known._pattern = False, None
        return True

    def add_person(self, kind: str, value: Any, rank: int = 1_000) -> None:
        """A person name (PN): for each component group (alphabetic, ideographic, phonetic,
        split on ``=``), the whole name in both orders, with and without spaces, and each
        component (split on ``^``, spaces, commas) of >= 2 characters, titles and particles
        such as "Dr", "van" skipped. Shorter components (initials, a one-ideograph family
        name) are matched only inside the whole name."""
        for group in str(value).split("="):
            parts = [normalize(p) for p in group.split("^")[:3]]
            parts = [p for p in parts if p]
            if not parts:
                continue
            whole = " ".join(parts)
            self.add(kind, whole, words=True, rank=rank, min_length=2)
            if len(parts) >= 2:
                family, given = parts[0], parts[1]
                for form in (f"{given} {family}", f"{family}{given}", f"{given}{family}",
                             f"{family}, {given}"):
                    self.add(kind, form, words=True, rank=rank, min_length=2)
            for part in re.split(r"[\s,.]+", whole):
                if part not in NAME_NOISE:
                    self.add(f"{kind} part", part, words=True, rank=rank + 500,
                             min_length=MIN_NAME_PART)

    def add_id(self, kind: str, value: Any, rank: int = 1_000) -> None:
        """An identifier: matched anywhere when it has a letter and >= 6 characters, else as
        a whole word; with an alphabetic prefix ("MRN-0012345"), its number alone too."""
        text = normalize(value)
        if not text:
            return
        long_alnum = len(text) >= 6 and re.search(r"[^\W\d_]", text) is not None
        self.add(kind, text, words=not long_alnum, rank=rank)
        prefix = _ALPHA_PREFIX.match(text)
        if prefix:
            self.add(kind, text[prefix.end():], words=True, rank=rank, min_length=4)

    def add_date(self, kind: str, value: Any, rank: int = 1_000) -> None:
        """A DA (or a DT's date part) in every form people type it (``dates.typed_forms``),
        each matched as a whole word."""
        for form in typed_forms(str(value)):
            self.add(kind, form, words=True, rank=rank)

    def add_uid(self, kind: str, uid: Any) -> None:
        """A source UID that must not survive (compared whole, and found inside text).
        Well-known UIDs (pydicom's UID dictionary) are never targets."""
        text = str(uid).strip(" \x00")
        if not text or is_well_known_uid(text):
            return
        known = self._uids.get(text)
        if known is None or _KIND_RANK.get(kind, 99) < _KIND_RANK.get(known, 99):
            self._uids[text] = kind

    def uid_kind(self, uid: Any) -> str | None:
        """The kind of source UID ``uid`` is, or None if it is not one."""
        return self._uids.get(str(uid).strip(" \x00"))

    def kinds_in(self, text: Any) -> list[str]:
        """The kinds of identifier found in ``text`` (normalized first), never the values.
        A name's "part" kind is left out when the whole name matched."""
        norm = normalize(text)
        if not norm:
            return []
        kinds = dict.fromkeys(term.kind for term in self._terms.values() if term.found_in(norm))
        for token in _UID_TOKEN.findall(norm):
            kind = self._uids.get(token)
            if kind:
                kinds.setdefault(kind)
        return [k for k in kinds if not (k.endswith(" part") and k[:-5] in kinds)]

    def kinds(self) -> dict[str, int]:
        """How many values of each kind are held (for reports)."""
        counts: dict[str, int] = {}
        for term in self._terms.values():
            counts[term.kind] = counts.get(term.kind, 0) + 1
        for kind in self._uids.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._terms) + len(self._uids)

    def __repr__(self) -> str:
        return f"Identifiers(values={len(self._terms)}, uids={len(self._uids)})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickled into an orchestrator's result store
        raise TypeError("Identifiers hold patient data and are not picklable")


# ------------------------------------------------------------------ collecting


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return [v for v in value.split("\\") if v.strip(" \x00")]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [v for item in value for v in _values(item)]
    return [value]


def _decodings(raw: bytes) -> list[str]:
    """The bytes of a value as UTF-8 (when valid) and as Latin-1."""
    texts = []
    with contextlib.suppress(UnicodeDecodeError):
        texts.append(raw.decode("utf-8"))
    texts.append(raw.decode("latin-1"))
    return texts


#: Equipment attributes the Basic Profile keeps: an institution named like its scanner's
#: vendor ("TOSHIBA") is not searched for (it would match every Manufacturer).
_EQUIPMENT = ("Manufacturer", "ManufacturerModelName")


class _Collector:
    def __init__(self, identifiers: Identifiers, dates: bool) -> None:
        self.ids = identifiers
        self.dates = dates
        self.equipment: set[str] = set()
        self.seen: set[tuple[Any, ...]] = set()

    def prune(self) -> None:
        """Drop institution terms that are also words of the equipment's vendor or model."""
        for text, term in list(self.ids._terms.items()):
            if term.kind.startswith("Institution") and any(
                    _Term(text, term.kind, True, 0).found_in(equipment)
                    for equipment in self.equipment):
                del self.ids._terms[text]

    def value(self, tag: int | None, keyword: str, vr: str, value: Any, parent: str) -> None:
        """One element's value(s), by VR first (any depth, private tags of known VR too),
        then by keyword."""
        values = _values(value)
        if not values:
            return
        kind = keyword or "private"
        if keyword in _EQUIPMENT:
            self.equipment.update(normalize(v) for v in values)
        if parent == "OtherPatientIDsSequence" and keyword == "PatientID":
            kind = "OtherPatientIDs"
        rank = _KIND_RANK.get(kind, 900)
        if vr == "UI":
            for uid in values:
                self.ids.add_uid(_UID_KIND.get(keyword, keyword or "UID"), uid)
        elif vr == "PN":
            for item in values:
                self.ids.add_person(kind if keyword else "person name", item, rank)
        elif vr in ("DA", "DT"):
            if self.dates or keyword == "PatientBirthDate":
                for item in values:
                    self.ids.add_date(kind, str(item)[:8], rank)
        elif keyword in _COLLECT:
            for item in values:
                if _COLLECT[keyword] == _WORDS:
                    self.ids.add(kind, item, words=True, rank=rank)
                else:
                    self.ids.add_id(kind, item, rank)
        elif tag is not None and is_identifier(tag, vr):
            for item in values:
                self.ids.add_id(kind, item, rank)

    def dataset(self, ds: Dataset, parent: str = "", charset: Any = None) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            self.value(None, "MediaStorageSOPInstanceUID", "UI",
                       meta.MediaStorageSOPInstanceUID, "")
        if 0x00080005 in ds:  # the bytes below are read in this character set
            charset = repr(getattr(ds.get_item(0x00080005), "value", None))
        for tag in ds.keys():
            raw: object = ds.get_item(tag)  # raw (not yet decoded) when read lazily
            if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
                # the same bytes at the same place in the same character set hold the same
                # identifiers: the instances of a study repeat most of their header
                seen = (int(tag), raw.VR, raw.value, parent, charset)
                if seen in self.seen:
                    continue
                self.seen.add(seen)
            try:
                elem = ds[tag]
            except Exception:  # an element pydicom cannot convert: its raw text below
                elem = None
            if elem is not None and elem.VR == "SQ":
                for item in elem.value or ():
                    self.dataset(item, elem.keyword, charset)
                continue
            vr = elem.VR if elem is not None else ""
            keyword = elem.keyword if elem is not None else ""
            if elem is not None:
                self.value(int(tag), keyword, vr, elem.value, parent)
            raw_bytes = getattr(raw, "value", None)
            if vr == "PN" and isinstance(raw_bytes, bytes):  # the bytes in other charsets
                for text in _decodings(raw_bytes):
                    self.value(int(tag), keyword, vr, text, parent)

    def tags(self, tags: Mapping[str, Any], parent: str = "") -> None:
        """Orthanc's JSON tags: simplified (keyword: value), short ("0010,0020": value) or
        expanded ("0010,0020": {"Name", "Type", "Value"}); sequences as lists of objects."""
        for key, value in tags.items():
            keyword = str(key)
            match = _TAG_KEY.match(keyword)
            if isinstance(value, Mapping) and "Value" in value:
                keyword = str(value.get("Name") or keyword)
                value = value.get("Value")
                match = _TAG_KEY.match(keyword)
            tag = int(match[1] + match[2], 16) if match else tag_for_keyword(keyword)
            if match and tag is not None:  # a numeric key: name it
                keyword = keyword_for_tag(tag) or keyword
            if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                for item in value:
                    self.tags(item, keyword)
                continue
            try:
                vr = dictionary_VR(tag) if tag is not None else ""
            except KeyError:
                vr = ""
            self.value(tag, keyword, vr, value, parent)


Source = Dataset | Mapping[str, Any] | str | os.PathLike[str] | bytes


def identifiers_from(sources: Source | Iterable[Source], *, dates: bool = True) -> Identifiers:
    """Every identifying string of the SOURCE instances: pydicom Datasets, DICOM files (paths
    or bytes, e.g. ``GET /instances/{id}/file``), or Orthanc tag dicts (which miss values
    over 256 bytes and unknown sequences: prefer the files).

    Collected at any depth, private elements of known VR included: every person name (PN)
    in all its component groups, every identifier-type attribute (``dictionary.is_identifier``:
    IDs, accession and order numbers...) with and without its alphabetic prefix, addresses,
    phone numbers and institutions, the birth date and, with ``dates``, every DA/DT in the
    forms people type; and every UID that is not well-known.
    """
    if isinstance(sources, (Dataset, Mapping, str, os.PathLike, bytes)):
        sources = [sources]
    identifiers = Identifiers()
    collector = _Collector(identifiers, dates)
    for source in sources:
        if isinstance(source, Dataset):
            collector.dataset(source)
        elif isinstance(source, Mapping):
            collector.tags(source)
        elif isinstance(source, bytes):
            collector.dataset(dcmread(io.BytesIO(source), stop_before_pixels=True, force=True))
        else:
            collector.dataset(dcmread(source, stop_before_pixels=True, force=True))
    collector.prune()
    return identifiers


# ------------------------------------------------------------------ scanning


class Finding(BaseModel):
    """One place where a source identifier is still present. Holds where and which KIND of
    identifier, never the value (nor, for a member name, the name)."""

    model_config = ConfigDict(frozen=True)

    path: str
    kind: str
    element: str = ""
    member: int | None = None

    def __str__(self) -> str:
        where = f"member {self.member}: " if self.member is not None else ""
        element = f" {self.element}" if self.element else ""
        return f"{where}{self.path}{element}: source {self.kind} found"


def _tag_text(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


def _element_label(tag: BaseTag) -> str:
    if tag.is_private:
        return "private creator" if tag.is_private_creator else "private"
    return keyword_for_tag(tag) or "unknown"


def _byte_texts(data: bytes) -> Iterator[str]:
    """Text embedded in bytes: printable Latin-1 runs, the same runs read as UTF-8, and
    UTF-16LE runs. Runs are kept apart so that matches never span two of them."""
    runs = _LATIN_RUN.findall(data)
    for run in runs:
        yield run.decode("latin-1")
        if any(b >= 0x80 for b in run):
            yield run.decode("utf-8", errors="ignore")
    for run in _UTF16_RUN.findall(data):
        yield run.decode("utf-16-le")


def _skipped(tag: BaseTag) -> bool:
    return int(tag) in SKIPPED_TAGS or (tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000)


class _Scanner:
    def __init__(self, identifiers: Identifiers, member: int | None) -> None:
        self.ids = identifiers
        self.member = member
        self.findings: dict[tuple[str, str], Finding] = {}

    def hit(self, path: str, kind: str, element: str) -> None:
        self.findings.setdefault((path, kind), Finding(path=path, kind=kind, element=element,
                                                       member=self.member))

    def texts(self, path: str, element: str, texts: Iterable[Any]) -> None:
        for text in texts:
            for kind in self.ids.kinds_in(text):
                self.hit(path, kind, element)

    def dataset(self, ds: Dataset, prefix: str = "") -> None:
        for tag in sorted(ds.keys()):
            tag = Tag(tag)
            if _skipped(tag):
                continue
            path = prefix + _tag_text(tag)
            label = _element_label(tag)
            raw = getattr(ds.get_item(tag), "value", None)
            try:
                elem = ds[tag]
                vr, value = elem.VR, elem.value
            except Exception:  # unconvertible: search its raw bytes
                raw = ds.get_item(tag)
                vr, value = "UN", getattr(raw, "value", None)
            if value is None:
                continue
            if vr == "SQ":
                for index, item in enumerate(value):
                    self.dataset(item, f"{path}[{index}].")
            elif vr == "UI":
                for uid in _values(value):
                    kind = self.ids.uid_kind(uid)
                    if kind:
                        self.hit(path, kind, label)
            elif isinstance(value, (bytes, bytearray)):
                self.texts(path, label, _byte_texts(bytes(value)))
            elif vr in TEXT_VRS or vr in BYTE_VRS:
                self.texts(path, label, _values(value))
                if isinstance(raw, bytes) and any(b >= 0x80 for b in raw):
                    # what a recipient reading the bytes in another charset would see
                    self.texts(path, label, _decodings(raw))


def scan_dataset(ds: Dataset, identifiers: Identifiers, *,
                 member: int | None = None) -> list[Finding]:
    """Every place in ``ds`` (file meta included) where a source identifier remains.

    Walks every element recursively: sequences at any depth, private tags (known VR or not),
    and scans every text value (AE CS DA DT LO LT PN SH ST UC UR UT; TM is skipped) plus the
    embedded text of byte values (OB/OW/UN..., pixel data and overlays excepted). A name or
    address matches as whole words, an ID, date or phone number anywhere in a value. A UID
    value equal to a source UID is a finding too. One finding per element and kind.
    """
    scanner = _Scanner(identifiers, member)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        scanner.dataset(meta)
    scanner.dataset(ds)
    return list(scanner.findings.values())


class ScanReport(BaseModel):
    """The outcome of ``scan_zip``: safe to log and keep (no values, no member names)."""

    model_config = ConfigDict(frozen=True)

    members: int
    instances: int
    findings: tuple[Finding, ...]
    total_findings: int
    clean: bool

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts

    def summary(self) -> str:
        state = "clean" if self.clean else f"NOT clean: {self.total_findings} finding(s)"
        return f"{self.instances} instance(s) in {self.members} member(s), {state}"


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                 workdir: Path) -> Dataset:
    if info.file_size <= IN_MEMORY_LIMIT:
        return dcmread(io.BytesIO(archive.read(info)))
    target = workdir / "member.dcm"
    with archive.open(info) as source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, 1024 * 1024)
    return dcmread(target, defer_size=DEFER_SIZE)


# The byte-level prefilter. ``normalize`` turns ^, = and NUL into spaces, casefolds and
# collapses whitespace; removing exactly those characters (and all whitespace) from both the
# identifiers and the member's decoded bytes keeps every match: if the full scan would find an
# identifier in a value, the squeezed identifier is in the squeezed bytes. So a member whose
# squeezed bytes hold none of them is clean without being parsed. Members in other character
# sets, deflated datasets and large members always get the full scan.
_SQUEEZE = re.compile(r"[\s^=\x00]+")
_OTHER_CHARSETS = re.compile(rb"ISO 2022|GB18030|GBK|ISO_IR (?!100\b|192\b|6\b)\d+")
_DEFLATED_TS = b"1.2.840.10008.1.2.1.99"
PREFILTER_LIMIT = 16 * 1024 * 1024


def _squeezed_terms(identifiers: Identifiers) -> tuple[str, ...]:
    terms = {_SQUEEZE.sub("", text) for text in identifiers._terms}
    terms |= {_SQUEEZE.sub("", uid.casefold()) for uid in identifiers._uids}
    return tuple(t for t in terms if t)


_IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"})
_ITEM, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def pixel_data_span(data: bytes, offset: int, transfer_syntax: str) -> tuple[int, int] | None:
    """Where the top-level pixel data element starting at ``offset`` (where pydicom's
    ``stop_before_pixels`` stopped) ends: ``(offset, end)``, its encapsulated fragments
    included; None when it is not one this can delimit for sure (big endian, deflated, no
    pixel data there, a length past the end)."""
    if data[offset:offset + 2] != b"\xe0\x7f" or transfer_syntax.endswith(".2.2") \
            or transfer_syntax == "1.2.840.10008.1.2.1.99":
        return None
    if transfer_syntax == _IMPLICIT_VR_LE:
        header = 8
    elif data[offset + 4:offset + 6] in _LONG_VRS:
        header = 12
    else:
        return None
    length = int.from_bytes(data[offset + header - 4:offset + header], "little")
    end = offset + header
    if length != 0xFFFFFFFF:
        end += length
        return (offset, end) if end <= len(data) else None
    while end + 8 <= len(data):  # encapsulated: items up to the sequence delimiter
        tag = data[end:end + 4]
        size = int.from_bytes(data[end + 4:end + 8], "little")
        end += 8
        if tag == _SEQUENCE_END:
            return offset, end
        if tag != _ITEM or size == 0xFFFFFFFF:
            return None
        end += size
    return None


def count_if_surely_clean(data: bytes, squeezed: tuple[str, ...]) -> int | None:
    """1 (an instance) or 0 when the DICOM file ``data`` holds no identifier outside its
    pixel data (which the full scan never reads either); None when it needs the full scan (a
    possible hit, another charset, deflated, or unreadable). The pixel data value is left
    out, so an instance costs its header, not its image."""
    stream = io.BytesIO(data)
    try:
        head = dcmread(stream, stop_before_pixels=True)
    except Exception:  # not DICOM: the full path reports it
        return None
    meta = getattr(head, "file_meta", None)
    span = pixel_data_span(data, stream.tell(),
                           str(getattr(meta, "TransferSyntaxUID", "") or ""))
    text = data if span is None else data[:span[0]] + data[span[1]:]
    if _DEFLATED_TS in text or _OTHER_CHARSETS.search(text):
        return None
    for decoded in (text.decode("latin-1"), text.decode("utf-8", errors="ignore")):
        flat = _SQUEEZE.sub("", decoded.casefold())
        if any(term in flat for term in squeezed):
            return None
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    return int("SOPInstanceUID" in head and sop_class != MEDIA_STORAGE_DIRECTORY)


def _count_if_surely_clean(archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                           squeezed: tuple[str, ...]) -> int | None:
    if info.file_size > PREFILTER_LIMIT:
        return None
    return count_if_surely_clean(archive.read(info), squeezed)


def scan_zip(path: str | os.PathLike[str], identifiers: Identifiers, *,
             max_findings: int = 1000) -> ScanReport:
    """Scan every member of the ZIP at ``path``: its name (folders included), then its
    content as DICOM (``scan_dataset``). Findings carry the member's index in the archive,
    never its name. A member that is not readable DICOM is itself a finding (kind
    ``"non-DICOM member"``; its bytes are still searched), so is an unreadable archive.
    ``clean`` is true only when nothing at all was found. At most ``max_findings`` findings
    are kept; ``total_findings`` counts them all.

    Pixel data is not checked for burned-in text (see the module docstring).
    """
    findings: list[Finding] = []
    total = 0
    instances = 0

    def add(new: Iterable[Finding]) -> None:
        nonlocal total
        for finding in new:
            total += 1
            if len(findings) < max_findings:
                findings.append(finding)

    members = 0
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        add([Finding(path="<archive>", kind="unreadable archive")])
        return ScanReport(members=0, instances=0, findings=tuple(findings),
                          total_findings=total, clean=False)
    squeezed = _squeezed_terms(identifiers)
    with archive, tempfile.TemporaryDirectory(prefix="deid-scan-") as tmp:
        for index, info in enumerate(archive.infolist()):
            members += 1
            add(Finding(path="<member name>", kind=kind, member=index)
                for kind in identifiers.kinds_in(info.filename.replace("/", " / ")))
            if info.is_dir():
                continue
            counted = _count_if_surely_clean(archive, info, squeezed)
            if counted is not None:  # no identifier anywhere in its bytes: no parse needed
                instances += counted
                continue
            try:
                ds = _read_member(archive, info, Path(tmp))
                found = scan_dataset(ds, identifiers, member=index)
            except (InvalidDicomError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
                    ValueError, KeyError, TypeError, AttributeError, NotImplementedError):
                add([Finding(path="<member content>", kind="non-DICOM member", member=index)])
                try:
                    data = archive.read(info)
                except Exception:
                    continue
                scanner = _Scanner(identifiers, index)
                scanner.texts("<member content>", "", _byte_texts(data))
                add(scanner.findings.values())
                continue
            add(found)
            sop_class = str(getattr(getattr(ds, "file_meta", None),
                                    "MediaStorageSOPClassUID", "") or "")
            if "SOPInstanceUID" in ds and sop_class != MEDIA_STORAGE_DIRECTORY:
                instances += 1
    return ScanReport(members=members, instances=instances, findings=tuple(findings),
                      total_findings=total, clean=total == 0)


def scan_package(path: str | os.PathLike[str], source_headers: list[bytes]) -> ScanReport:
    """``scan_zip`` of the package at ``path`` against ``identifiers_from(source_headers)``
    (the source files, e.g. cut before their pixel data). Takes and returns only bytes, paths
    and a ``ScanReport``, so it can run in another process: the identifiers never leave it."""
    return scan_zip(path, identifiers_from(source_headers))
