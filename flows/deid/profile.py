"""De-identification profiles, keyed pseudonyms and the Orthanc anonymize request.

Orthanc's ``/anonymize`` applies the DICOM PS3.15 Basic Profile (Table E.1-1) but gives random,
per-job pseudonyms and blanks dates; and as soon as a request ``Replace``s PatientID, the
accession or a date at the top level, Orthanc 1.10.1 stops cleaning their copies inside
sequences (its ``Replace`` itself only reaches the top level). So de-identification is split:

* Orthanc applies the Basic Profile alone to each instance (``build_request``: no ``Replace``;
  ``POST /instances/{id}/anonymize`` returns the file without storing it);
* ``rewrite.Rewriter`` then writes, with pydicom, at every depth and keyed on the values of the
  SOURCE file at the same place: keyed pseudonyms (HMAC-SHA256 under a project secret,
  ``pseudonym``, ``pseudo_uid``: the same in every run, useless without the secret), every
  DA/DT shifted by the patient's ``date_shift_days`` (never 0) or removed, every non-standard
  UID remapped.

Identity is keyed on IssuerOfPatientID + PatientID (``patient_key``): two people sharing an ID
under two issuers get two pseudonyms, two shifts and two sets of UIDs. The secret and the
``LinkageEntry`` (source identifiers next to their pseudonyms) stay with the data owner;
neither is ever part of what is shared. Pixel data is not touched: risky content is held back
(``risk.risk_reason``) unless ``include_risky`` is set.

Nothing here raises or logs with a source value in the message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.uid import RE_VALID_UID

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = [
    "DEFAULT_DESCRIPTION_TAGS",
    "DEFAULT_EXCLUDED_MODALITIES",
    "DEFAULT_EXCLUDED_SOP_CLASSES",
    "DEFAULT_EXCLUDED_SOP_CLASS_ROOTS",
    "DICOM_VERSION",
    "DeidError",
    "DeidProfile",
    "LinkageEntry",
    "MethodCode",
    "build_request",
    "client_kwargs",
    "date_shift_days",
    "is_excluded",
    "pseudo_uid",
    "pseudonym",
    "shift_date",
]

#: Orthanc >= 1.9.4 implements PS3.15-2021b Table E.1-1 (1.10.1, Debian bookworm's, included).
DICOM_VERSION = "2021b"

#: SH (AccessionNumber, StudyID) is the shortest VR a pseudonym goes into: 16 characters.
PSEUDONYM_LENGTH = 16
MIN_SECRET_BYTES = 16

DEFAULT_EXCLUDED_MODALITIES: tuple[str, ...] = ("SR", "OT", "US", "DOC", "SC")

#: SOP classes (pydicom's keywords) whose content is free text, documents, photographs or
#: screenshots: identifying content the header scan cannot see (burned-in pixels, report text,
#: faces, 3D surfaces).
def _storage_sop_classes() -> dict[str, str]:
    """Every storage SOP class pydicom's UID dictionary knows: keyword -> UID."""
    from pydicom.uid import UID_dictionary

    return {keyword: uid for uid, (name, kind, _, _, keyword) in UID_dictionary.items()
            if kind == "SOP Class" and "Storage" in name and "Commitment" not in name
            and keyword}


#: keyword (e.g. ``SecondaryCaptureImageStorage``) -> SOP Class UID, from pydicom
STORAGE_SOP_CLASSES: dict[str, str] = _storage_sop_classes()
_SOP_KEYWORDS = {uid: keyword for keyword, uid in STORAGE_SOP_CLASSES.items()}
#: a storage SOP class, named by its DICOM keyword (the UI shows a list of names)
if TYPE_CHECKING:  # built at run time from pydicom's dictionary: a keyword string to mypy
    SopClass = str
else:
    SopClass = Literal[tuple(sorted(STORAGE_SOP_CLASSES))]

DEFAULT_EXCLUDED_SOP_CLASSES: tuple[str, ...] = (
    # Secondary capture (screenshots, scanned paper)
    "SecondaryCaptureImageStorage",
    "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    # Encapsulated documents and surfaces
    "EncapsulatedPDFStorage",
    "EncapsulatedCDAStorage",
    "EncapsulatedSTLStorage",
    "EncapsulatedOBJStorage",
    "EncapsulatedMTLStorage",
    # Structured reports (every SR storage class; the SR root below catches later ones)
    "TextSRStorageTrial",
    "AudioSRStorageTrial",
    "DetailSRStorageTrial",
    "ComprehensiveSRStorageTrial",
    "BasicTextSRStorage",
    "EnhancedSRStorage",
    "ComprehensiveSRStorage",
    "Comprehensive3DSRStorage",
    "ExtensibleSRStorage",
    "ProcedureLogStorage",
    "MammographyCADSRStorage",
    "KeyObjectSelectionDocumentStorage",
    "ChestCADSRStorage",
    "XRayRadiationDoseSRStorage",
    "RadiopharmaceuticalRadiationDoseSRStorage",
    "ColonCADSRStorage",
    "ImplantationPlanSRStorage",
    "AcquisitionContextSRStorage",
    "SimplifiedAdultEchoSRStorage",
    "PatientRadiationDoseSRStorage",
    "PlannedImagingAgentAdministrationSRStorage",
    "PerformedImagingAgentAdministrationSRStorage",
    "EnhancedXRayRadiationDoseSRStorage",
    "WaveformAnnotationSRStorage",
    # Photographs and video (faces, skin, labels)
    "VLPhotographicImageStorage",
    "VideoPhotographicImageStorage",
    "VideoEndoscopicImageStorage",
    "VideoMicroscopicImageStorage",
    # Opaque vendor payloads
    "RawDataStorage",
)

#: UID roots excluded as a whole: every SR-family storage class lives under this one.
DEFAULT_EXCLUDED_SOP_CLASS_ROOTS: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.88.",)

#: Free-text descriptors the Basic Profile removes and ``descriptions="keep_if_clean"`` keeps.
DEFAULT_DESCRIPTION_TAGS: tuple[str, ...] = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "PerformedProcedureStepDescription",
)

#: What a descriptor is: a free-text description of the study, series, protocol or step
#: (keyword ending in "Description", or ProtocolName), in a text VR. Names, IDs, comments,
#: station and device names, ages are not descriptors.
_DESCRIPTOR_KEYWORD = re.compile(r"^(?:\w*Description|ProtocolName)$")
_DESCRIPTOR_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})

_PRIVATE_TAG = re.compile(r"^([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})$")
_PREFIX = re.compile(r"^[A-Z0-9]{0,8}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,23}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,7}$")
_DA = re.compile(r"^\d{8}$")


class DeidError(SafeMessageError, ValueError):
    """The request cannot be built as asked. Names the field, never a source value."""


class MethodCode(NamedTuple):
    """One PS3.16 CID 7050 "De-identification Method" code (scheme DCM)."""

    value: str
    meaning: str
    scheme: str = "DCM"

    def as_item(self) -> dict[str, str]:
        """The code as a DICOM code sequence item, keyed by keyword."""
        return {"CodeValue": self.value, "CodingSchemeDesignator": self.scheme,
                "CodeMeaning": self.meaning}


# CID 7050 codes used here (meanings as in PS3.16; pydicom's bundled copy agrees, see tests)
BASIC_PROFILE = MethodCode("113100", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS = MethodCode("113105", "Clean Descriptors Option")
RETAIN_MODIFIED_DATES = MethodCode(
    "113107", "Retain Longitudinal Temporal Information Modified Dates Option")
RETAIN_SAFE_PRIVATE = MethodCode("113111", "Retain Safe Private Option")


class DeidProfile(BaseModel):
    """How a study is de-identified for sharing. Frozen and versioned: bump ``version``
    whenever a change alters the output, and record both in DeidentificationMethod.

    The profile holds no secret and no identifier: it is safe as a flow parameter.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dates: Literal["shift", "blank"] = Field(
        "shift", description="'shift': every date of a patient moves by the same number of days "
                             "(keyed per patient, never 0), intervals between studies are kept, "
                             "times are kept. 'blank': dates and times are emptied.")
    max_shift_days: int = Field(
        365, ge=1, le=3650,
        description="The shift is drawn in [-max, -1] U [1, max] days.")
    descriptions: Literal["drop", "keep_if_clean"] = Field(
        "drop", description="'drop': the Basic Profile removes StudyDescription, "
                            "SeriesDescription etc. 'keep_if_clean': they are kept, and the "
                            "output scan blocks delivery if any holds a source identifier.")
    description_tags: tuple[str, ...] = Field(
        DEFAULT_DESCRIPTION_TAGS, description="The descriptors kept with 'keep_if_clean'.")
    private_tags: Literal["drop", "allowlist"] = Field(
        "drop", description="'drop': every private tag is removed. 'allowlist': only the tags "
                            "of private_allowlist (and their private creators) are kept.")
    private_allowlist: tuple[str, ...] = Field(
        (), description="Private tags to keep, as 'gggg,eeee' (e.g. '0011,1010'; odd group, "
                        "element >= 0x1000). The block number depends on creator order: "
                        "check it on your data.")
    exclude_modalities: tuple[str, ...] = Field(
        DEFAULT_EXCLUDED_MODALITIES,
        description="Modalities never shared (free text, documents, burned-in pixels).")
    exclude_sop_classes: tuple[SopClass, ...] = Field(
        DEFAULT_EXCLUDED_SOP_CLASSES,
        description="SOP classes never shared, by DICOM keyword (secondary capture, "
                    "encapsulated documents, SR, photographs, raw data); a UID is accepted "
                    "and named.")
    exclude_sop_class_roots: tuple[str, ...] = Field(
        DEFAULT_EXCLUDED_SOP_CLASS_ROOTS,
        description="SOP Class UID prefixes never shared (default: the SR family).")
    include_risky: bool = Field(
        False, description="Share risky content too: excluded modalities and SOP classes, "
                           "video, photographs, label/overview images, burned-in annotation, "
                           "overlays. Pixels are never checked for burned-in text: only for "
                           "data known to be clean.")
    pseudonym_prefix: str = Field(
        "P", description="Prefix of every pseudonym (uppercase letters/digits, <= 8 chars).")
    name: str = Field("research", description="Short profile name (letters, digits, _ . -; "
                                              "<= 24 chars), recorded in the output.")
    version: str = Field("1", description="Profile version (<= 8 chars), recorded in the output.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise DeidError("name: 1-24 letters, digits, '_', '.', '-'")
        return value

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str) -> str:
        if not _VERSION.match(value):
            raise DeidError("version: 1-8 letters, digits, '_', '.', '-'")
        return value

    @field_validator("pseudonym_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise DeidError("pseudonym_prefix: 0-8 uppercase letters or digits")
        return value

    @field_validator("private_allowlist")
    @classmethod
    def _check_allowlist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        tags = []
        for tag in value:
            match = _PRIVATE_TAG.match(tag.strip())
            if not match:
                raise DeidError(f"private_allowlist: {tag!r} is not 'gggg,eeee'")
            group, element = int(match[1], 16), int(match[2], 16)
            if group % 2 == 0 or group <= 0x0007 or element < 0x1000:
                raise DeidError(f"private_allowlist: {tag!r} is not a private data element "
                                 "(odd group > 0007, element >= 1000)")
            tags.append(f"{group:04x},{element:04x}")
        return tuple(dict.fromkeys(tags))

    @field_validator("exclude_sop_classes", mode="before")
    @classmethod
    def _name_sop_classes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value
        named = []
        for item in value:
            item = str(item).strip()
            if item in STORAGE_SOP_CLASSES:
                named.append(item)
            elif item in _SOP_KEYWORDS:
                named.append(_SOP_KEYWORDS[item])
            else:
                raise DeidError(f"exclude_sop_classes: {item!r} is not a storage SOP class "
                                 "keyword or UID pydicom knows (for private classes use "
                                 "exclude_sop_class_roots)")
        return tuple(dict.fromkeys(named))

    @property
    def excluded_sop_class_uids(self) -> frozenset[str]:
        """The UIDs of ``exclude_sop_classes``."""
        return frozenset(STORAGE_SOP_CLASSES[k] for k in self.exclude_sop_classes)

    @field_validator("exclude_modalities")
    @classmethod
    def _upper_modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.strip().upper() for m in value if m.strip())

    @field_validator("description_tags")
    @classmethod
    def _check_descriptions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from pydicom.datadict import dictionary_VR, tag_for_keyword

        for keyword in value:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise DeidError(f"description_tags: {keyword!r} is not a DICOM keyword")
            if not (_DESCRIPTOR_KEYWORD.match(keyword)
                    and dictionary_VR(tag) in _DESCRIPTOR_VRS):
                raise DeidError(f"description_tags: {keyword!r} is not a descriptor (only "
                                 "free-text descriptions such as StudyDescription, "
                                 "SeriesDescription, ProtocolName may be kept)")
        return value

    @model_validator(mode="after")
    def _allowlist_needs_mode(self) -> DeidProfile:
        if self.private_allowlist and self.private_tags != "allowlist":
            raise DeidError("private_allowlist is set but private_tags is 'drop'")
        return self

    # ------------------------------------------------------------ provenance

    def method_codes(self) -> tuple[MethodCode, ...]:
        """The PS3.16 CID 7050 codes describing what this profile does, for
        DeidentificationMethodCodeSequence (0012,0064).

        Always 113100 (Basic Profile: Orthanc applies PS3.15 Table E.1-1). Plus 113107 when
        dates are shifted: ``rewrite.Rewriter`` moves every DA and DT at every depth by the
        patient's offset (or removes it), which is what the option requires; 113105 when
        descriptions are kept (their "cleaning" here is the output scan against the source
        identifiers, which blocks delivery on any hit: it cannot catch an identifier it was not
        given), and
        113111 when private tags are allowlisted (the user vouches that they are safe).
        UIDs, device, institution and patient characteristics are not retained, pixels not
        cleaned: no code for those.
        """
        codes = [BASIC_PROFILE]
        if self.descriptions == "keep_if_clean":
            codes.append(CLEAN_DESCRIPTORS)
        if self.dates == "shift":
            codes.append(RETAIN_MODIFIED_DATES)
        if self.private_tags == "allowlist" and self.private_allowlist:
            codes.append(RETAIN_SAFE_PRIVATE)
        return tuple(codes)

    def method_values(self) -> tuple[str, ...]:
        """DeidentificationMethod (0012,0063, LO, VM 1-n) as separate values, each <= 64
        characters."""
        values = [f"prefect-orthanc profile {self.name} v{self.version}",
                  f"PS3.15-{DICOM_VERSION} Basic Profile (Orthanc)",
                  "keyed pseudonyms and UIDs at every depth"]
        values.append("every date shifted per patient (date shift), times kept"
                      if self.dates == "shift" else "dates blanked, times removed")
        if self.descriptions == "keep_if_clean":
            values.append("descriptions kept, scanned")
        if self.private_tags == "allowlist" and self.private_allowlist:
            values.append("private tags allowlisted")
        return tuple(values)

    @property
    def deidentification_method(self) -> str:
        """The DeidentificationMethod value: the ``method_values`` joined by DICOM's value
        separator, e.g. ``prefect-orthanc profile research v1\\PS3.15-2021b Basic Profile
        (Orthanc)\\keyed pseudonyms\\date shift per patient, times kept``."""
        return "\\".join(self.method_values())

    def excludes(self, modality: str, sop_class_uid: str, *,
                 burned_in_annotation: str = "") -> bool:
        """Same as ``is_excluded(self, ...)``."""
        return is_excluded(self, modality, sop_class_uid,
                           burned_in_annotation=burned_in_annotation)


# ------------------------------------------------------------------ keyed values


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError("secret must be bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise DeidError(f"secret must be at least {MIN_SECRET_BYTES} bytes")
    return bytes(secret)


def _normalize(value: str) -> str:
    """DICOM padding (spaces, NULs) and surrounding blanks removed, Unicode NFC. Case and
    inner characters are kept: IDs are case-sensitive and leading zeros matter."""
    return unicodedata.normalize("NFC", str(value)).strip(" \t\r\n\x00")


def _mac(secret: bytes, kind: str, value: str) -> bytes:
    message = kind.encode("utf-8") + b"\x00" + _normalize(value).encode("utf-8")
    return hmac.new(_check_secret(secret), message, hashlib.sha256).digest()


def pseudonym(secret: bytes, kind: str, value: str, prefix: str = "P",
              length: int = PSEUDONYM_LENGTH) -> str:
    """A keyed, deterministic pseudonym: ``prefix`` + uppercase base32 (A-Z, 2-7) of
    HMAC-SHA256(secret, kind + "\\x00" + normalized value), ``length`` characters in all.

    The default 16 fits every VR a pseudonym goes into (SH AccessionNumber/StudyID: 16,
    LO PatientID: 64, PN components: 64) and only uses characters valid in all of them.
    Same secret, kind and value: same pseudonym, in every run. Another kind (``"PatientID"``
    vs ``"AccessionNumber"``) gives an unrelated pseudonym for the same value.
    """
    if not kind:
        raise DeidError("pseudonym kind must not be empty")
    if not _PREFIX.match(prefix):
        raise DeidError("pseudonym prefix: 0-8 uppercase letters or digits")
    if not len(prefix) + 8 <= length <= PSEUDONYM_LENGTH:
        raise DeidError(f"pseudonym length must leave >= 8 hash characters and be "
                        f"<= {PSEUDONYM_LENGTH}")
    if not _normalize(value):
        raise DeidError(f"nothing to pseudonymize for {kind} (empty value)")
    body = base64.b32encode(_mac(secret, kind, value)).decode("ascii")
    return prefix + body[:length - len(prefix)]


def pseudo_uid(secret: bytes, uid: str, scope: str = "") -> str:
    """A keyed, deterministic UID ``2.25.<decimal>`` (<= 44 characters) for a source UID.

    ``scope`` (the patient key): the same source UID under two patients gives two UIDs, so
    a receiving PACS never merges two patients' studies that happened to share a UID.

    The 128-bit integer is the HMAC truncated to 16 bytes, with the RFC 9562 version-8
    ("custom") and variant bits set, so it is a well-formed UUID as PS3.5 B.2 expects.
    """
    if not _normalize(uid):
        raise DeidError("nothing to pseudonymize for a UID (empty value)")
    value = f"{_normalize(scope)}\x00{_normalize(uid)}" if _normalize(scope) else uid
    number = int.from_bytes(_mac(secret, "UID", value)[:16], "big")
    number = (number & ~(0xF << 76)) | (0x8 << 76)   # version 8
    number = (number & ~(0x3 << 62)) | (0x2 << 62)   # variant 10xx
    return f"2.25.{number}"


def date_shift_days(secret: bytes, patient_id: str, max_days: int = 365) -> int:
    """The patient's date shift in days: keyed by the patient key (``patient_key``: the
    source PatientID, with its issuer when there is one), the same in every run, in
    [-max_days, -1] U [1, max_days], never 0."""
    if max_days < 1:
        raise DeidError("max_days must be >= 1")
    if not _normalize(patient_id):
        raise DeidError("a date shift needs a PatientID (empty value)")
    draw = int.from_bytes(_mac(secret, "DateShift", patient_id)[:8], "big") % (2 * max_days)
    return -(draw + 1) if draw < max_days else draw - max_days + 1


def shift_date(value: str | None, days: int) -> str:
    """``value`` (DICOM DA, ``YYYYMMDD``) moved by ``days``; ``""`` (blank) when the value is
    empty, not a valid date, or would leave years 0001-9999."""
    from prefect_orthanc.flows.deid.dates import shift_da

    text = _normalize(value or "")
    return shift_da(text, days) if _DA.match(text) else ""


# ------------------------------------------------------------------ the request


class LinkageEntry(BaseModel):
    """One study's link between source identifiers and what was shared.

    This is the re-identification key: it holds identifiers by design. Keep it with the data
    owner, apart from the shared data, and never in flow parameters, results or logs. Source
    values and the date shift are kept out of ``repr()``.
    """

    model_config = ConfigDict(frozen=True)

    profile: str
    profile_version: str
    source_patient_id: str = Field(repr=False)
    source_patient_name: str = Field("", repr=False)
    source_accession: str = Field("", repr=False)
    source_study_uid: str = Field(repr=False)
    patient_id: str
    patient_name: str
    accession: str
    study_id: str
    study_uid: str
    date_shift_days: int | None = Field(None, repr=False)
    patient_key_from: str = Field("PatientID", description="What the pseudonyms are keyed "
                                  "on: PatientID, IssuerOfPatientID+PatientID, or "
                                  "StudyInstanceUID for a study without PatientID.")
    patient_key: str = Field("", repr=False, exclude=True)


def _text(source: Mapping[str, Any], keyword: str) -> str:
    value = source.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):  # a multi-valued tag: its first value
        value = value[0] if value else ""
    if isinstance(value, Mapping):  # Orthanc's "expand" form {"Name", "Type", "Value"}
        value = value.get("Value") or ""
    return _normalize(value) if isinstance(value, str) else ""


def _private_creator(tag: str) -> str:
    group, element = tag.split(",")
    return f"{group},{int(element, 16) >> 8:04x}"


def patient_key(patient_id: str, issuer: str = "", study_uid: str = "") -> tuple[str, str]:
    """The source identity a patient's pseudonyms and date shift are keyed on, and what it
    was built from: ``(key, "PatientID")`` (the ID alone, when there is no issuer),
    ``(key, "IssuerOfPatientID+PatientID")``, or, for a study without PatientID,
    ``(key, "StudyInstanceUID")`` (the study then stands alone: its pseudonymous patient is
    not linked to any other study). Raises ``DeidError`` when neither exists."""
    patient_id, issuer, study_uid = (_normalize(v or "") for v in (patient_id, issuer,
                                                                    study_uid))
    if patient_id and issuer:
        return f"{issuer}\x00{patient_id}", "IssuerOfPatientID+PatientID"
    if patient_id:
        return patient_id, "PatientID"
    if study_uid:
        return f"\x00study\x00{study_uid}", "StudyInstanceUID"
    raise DeidError("the source study has neither PatientID nor StudyInstanceUID")


def build_request(profile: DeidProfile, secret: bytes,
                  source: Mapping[str, Any] | Any) -> tuple[dict[str, Any], LinkageEntry]:
    """Orthanc's part of one study's de-identification, and the study's linkage.

    ``source``: one source instance of the study, a pydicom Dataset or tags keyed by keyword
    (PatientID, IssuerOfPatientID, StudyInstanceUID, PatientName, AccessionNumber are read).

    The body is for ``POST /instances/{id}/anonymize`` (the Basic Profile, PS3.15 Table
    E.1-1, applied by Orthanc): ``Keep`` (descriptions with ``keep_if_clean``, allowlisted
    private tags with their creators), no ``Replace`` (setting identifiers or dates at the
    top level stops Orthanc cleaning their nested copies), ``KeepPrivateTags`` false,
    ``DicomVersion``. Pseudonyms, shifted dates and keyed UIDs are written afterwards, at
    every depth, by ``rewrite.Rewriter``. No source value appears in the body.
    """
    def text(keyword: str) -> str:
        if isinstance(source, Mapping):
            return _text(source, keyword)
        try:
            value = source.get(keyword, "")
        except Exception:
            return ""
        return _normalize(str(value or ""))

    study_uid = text("StudyInstanceUID")
    if not study_uid or not RE_VALID_UID.match(study_uid):
        raise DeidError("the source study has no valid StudyInstanceUID")
    patient_id = text("PatientID")
    key, key_source = patient_key(patient_id, text("IssuerOfPatientID"), study_uid)
    accession = text("AccessionNumber")
    prefix = profile.pseudonym_prefix

    pseudo_patient = pseudonym(secret, "PatientID", key, prefix)
    # The name pseudonym is keyed by the patient too: one person, one pseudonym, whatever
    # spelling of the name a study carries.
    pseudo_name = pseudonym(secret, "PatientName", key, prefix)
    # Keyed by the patient too: two patients under one source accession number (it happens)
    # must not get one pseudonymous accession, which would link them.
    pseudo_accession = pseudonym(secret, "AccessionNumber", f"{key}\x00{accession}", prefix) \
        if accession else ""
    # StudyID is keyed by the study UID: source StudyIDs ("1", "2") repeat across patients.
    pseudo_study_id = pseudonym(secret, "StudyID", f"{key}\x00{study_uid}", prefix)
    new_study_uid = pseudo_uid(secret, study_uid, scope=key)
    shift = date_shift_days(secret, key, profile.max_shift_days) \
        if profile.dates == "shift" else None

    keep: list[str] = []
    if profile.descriptions == "keep_if_clean":
        keep += profile.description_tags
    if profile.private_tags == "allowlist":
        for tag in profile.private_allowlist:
            keep += [_private_creator(tag), tag]
    body: dict[str, Any] = {
        "Replace": {},
        "Keep": list(dict.fromkeys(keep)),
        "Remove": [],
        "Force": False,
        "KeepPrivateTags": False,
        "DicomVersion": DICOM_VERSION,
    }
    linkage = LinkageEntry(
        profile=profile.name, profile_version=profile.version,
        source_patient_id=patient_id, source_patient_name=text("PatientName"),
        source_accession=accession, source_study_uid=study_uid,
        patient_id=pseudo_patient, patient_name=pseudo_name, accession=pseudo_accession,
        study_id=pseudo_study_id, study_uid=new_study_uid, date_shift_days=shift,
        patient_key_from=key_source, patient_key=key,
    )
    return body, linkage


def client_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """``build_request``'s body as keyword arguments of ``Orthanc.anonymize``."""
    return {"replace": dict(body["Replace"]), "keep": list(body["Keep"]),
            "remove": list(body["Remove"]), "force": bool(body["Force"]),
            "keep_private_tags": bool(body["KeepPrivateTags"]),
            "dicom_version": body["DicomVersion"]}


# ------------------------------------------------------------------ exclusions


def is_excluded(profile: DeidProfile, modality: str, sop_class_uid: str, *,
                burned_in_annotation: str = "") -> bool:
    """Whether instances of this modality / SOP class (and BurnedInAnnotation) are held back
    under ``profile``: ``risk.risk_reason`` on just these attributes. Use ``risk_reason`` on
    the source instance itself to see every reason (overlays, label images, video...)."""
    from pydicom.dataset import Dataset

    from prefect_orthanc.flows.deid.risk import risk_reason

    ds = Dataset()
    ds.Modality = _normalize(modality or "")
    ds.SOPClassUID = _normalize(sop_class_uid or "")
    ds.BurnedInAnnotation = _normalize(burned_in_annotation or "").upper()
    return risk_reason(profile, ds) is not None
