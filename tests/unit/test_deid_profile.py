"""De-identification profile: keyed pseudonyms, date shifts, the Orthanc anonymize body."""

from __future__ import annotations

import inspect
import json
import re
import uuid
from datetime import date

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.sr.codedict import codes

from prefect_orthanc.deployments.lab.synthetic import make_cohort
from prefect_orthanc.flows.deid import (
    DeidError,
    DeidProfile,
    LinkageEntry,
    build_request,
    client_kwargs,
    date_shift_days,
    is_excluded,
    pseudo_uid,
    pseudonym,
    shift_date,
)
from prefect_orthanc.flows.deid.profile import DICOM_VERSION
from prefect_orthanc.orthanc_client.operations import Operations

SECRET = b"project-secret-0123456789abcdef!"
OTHER = b"another-secret-0123456789abcdef!"
BASE32 = re.compile(r"^[A-Z2-7]+$")
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


# ------------------------------------------------------------------ pseudonyms


def test_pseudonym_is_deterministic_and_keyed():
    first = pseudonym(SECRET, "PatientID", "PX1234567")
    assert first == pseudonym(SECRET, "PatientID", "PX1234567")
    assert first == pseudonym(SECRET, "PatientID", " PX1234567 \x00")  # DICOM padding
    assert first != pseudonym(OTHER, "PatientID", "PX1234567")
    assert first != pseudonym(SECRET, "PatientID", "PX1234568")
    assert first != pseudonym(SECRET, "PatientID", "px1234567")  # IDs are case-sensitive


def test_pseudonym_kinds_are_separated():
    values = {kind: pseudonym(SECRET, kind, "12345678")
              for kind in ("PatientID", "PatientName", "AccessionNumber", "StudyID")}
    assert len(set(values.values())) == 4


@pytest.mark.parametrize("prefix", ["P", "", "RSCH01", "ABCDEFGH"])
def test_pseudonym_fits_every_vr(prefix):
    value = pseudonym(SECRET, "AccessionNumber", "ACC12345678", prefix)
    assert len(value) == 16  # SH (AccessionNumber, StudyID) max; LO is 64, PN components 64
    assert value.startswith(prefix)
    assert BASE32.match(value[len(prefix):])
    assert not set("\\^=") & set(value)  # no DICOM delimiters, no PN component separators


def test_pseudonym_refuses_weak_input() -> None:
    with pytest.raises(DeidError):
        pseudonym(b"short", "PatientID", "PX1")
    with pytest.raises(TypeError):
        pseudonym("not-bytes-but-long-enough-str", "PatientID", "PX1")  # type: ignore[arg-type]
    with pytest.raises(DeidError):
        pseudonym(SECRET, "PatientID", "  ")
    with pytest.raises(DeidError):
        pseudonym(SECRET, "PatientID", "PX1", "lower")
    with pytest.raises(DeidError):
        pseudonym(SECRET, "PatientID", "PX1", "P", 17)


def test_pseudo_uid_is_a_valid_deterministic_uid():
    source = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    uid = pseudo_uid(SECRET, source)
    assert uid == pseudo_uid(SECRET, source + " ")
    assert uid != pseudo_uid(OTHER, source)
    assert uid != pseudo_uid(SECRET, source + "1")
    assert UID.match(uid) and len(uid) <= 64 and uid.startswith("2.25.")
    as_uuid = uuid.UUID(int=int(uid[5:]))
    assert as_uuid.variant == uuid.RFC_4122 and as_uuid.version == 8


# ------------------------------------------------------------------ dates


def test_date_shift_is_per_patient_nonzero_and_bounded():
    shifts = [date_shift_days(SECRET, f"PX{n:07d}", 3) for n in range(600)]
    assert set(shifts) == {-3, -2, -1, 1, 2, 3}
    assert date_shift_days(SECRET, "PX0000001", 3) == shifts[1]
    wide = [date_shift_days(SECRET, f"PX{n:07d}", 365) for n in range(2000)]
    assert 0 not in wide and max(wide) <= 365 and min(wide) >= -365
    assert min(wide) < -300 and max(wide) > 300  # spread over the whole range
    assert date_shift_days(SECRET, "PX1", 365) != date_shift_days(OTHER, "PX1", 365) or \
        date_shift_days(SECRET, "PX2", 365) != date_shift_days(OTHER, "PX2", 365)
    with pytest.raises(DeidError):
        date_shift_days(SECRET, "", 365)
    with pytest.raises(DeidError):
        date_shift_days(SECRET, "PX1", 0)


@pytest.mark.parametrize(("value", "days", "expected"), [
    ("20240105", 10, "20240115"),
    ("20240105", -10, "20231226"),
    ("20240228", 1, "20240229"),     # leap year
    ("20230228", 1, "20230301"),
    (" 20240105 ", 0, "20240105"),
    ("", 5, ""),
    (None, 5, ""),
    ("2024-01-05", 5, ""),           # ACR-NEMA style: not a DA
    ("20241305", 5, ""),             # no month 13
    ("2024010", 5, ""),
    ("99991231", 1, ""),             # beyond year 9999
    ("00010101", -1, ""),
])
def test_shift_date(value, days, expected):
    assert shift_date(value, days) == expected


def test_intervals_of_a_patient_are_preserved():
    days = date_shift_days(SECRET, "PX7654321", 365)
    first, second = "20190311", "20200102"
    moved = [date(int(d[:4]), int(d[4:6]), int(d[6:])) for d in
             (shift_date(first, days), shift_date(second, days))]
    assert (moved[1] - moved[0]).days == (date(2020, 1, 2) - date(2019, 3, 11)).days


# ------------------------------------------------------------------ the request


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("deid-profile"), patients=2,
                       studies_per_patient=2, series_per_study=1, instances_per_series=1)


def _shared_tags(path) -> dict[str, str]:
    """What ``/studies/{id}/shared-tags?simplify`` gives for a one-instance study."""
    ds = dcmread(path, stop_before_pixels=True)
    return {keyword: str(ds.get(keyword, "")) for keyword in (
        "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription",
        "ReferringPhysicianName", "InstitutionName")}


def _source_values(source: dict[str, str]) -> set[str]:
    values = {v for v in source.values() if len(v) >= 3}
    values |= {part for v in source.values() for part in v.split("^") if len(part) >= 3}
    return values


def test_private_allowlist_keeps_the_tags_and_their_creators(cohort):
    source = _shared_tags(cohort.studies[0].files[0])
    profile = DeidProfile(private_tags="allowlist", private_allowlist=("0011,1001", "0029,1120"))
    body, _ = build_request(profile, SECRET, source)
    assert body["KeepPrivateTags"] is False  # never all of them
    assert {"0011,0010", "0011,1001", "0029,0011", "0029,1120"} <= set(body["Keep"])
    assert [c.value for c in profile.method_codes()] == ["113100", "113107", "113111"]


def test_body_is_the_plain_basic_profile_and_leaks_none(cohort):
    study = cohort.studies[0]
    source = _shared_tags(study.files[0])
    body, linkage = build_request(DeidProfile(), SECRET, source)
    # no Replace: a top-level Replace stops Orthanc cleaning nested copies (the rewrite does it)
    assert body["Replace"] == {} and body["Force"] is False
    assert body["KeepPrivateTags"] is False and body["Remove"] == []
    assert body["DicomVersion"] == DICOM_VERSION == "2021b"
    serialized = json.dumps(body)
    planted = cohort.phi_values(study.patient_id) | _source_values(source)
    assert not sorted(value for value in planted if value in serialized)
    assert linkage.date_shift_days == date_shift_days(SECRET, study.patient_id, 365) != 0
    assert len(linkage.accession) <= 16 and len(linkage.study_id) <= 16
    assert UID.match(linkage.study_uid)


def test_descriptions_kept_only_when_asked(cohort):
    source = _shared_tags(cohort.studies[0].files[0])
    dropped, _ = build_request(DeidProfile(), SECRET, source)
    kept, _ = build_request(DeidProfile(descriptions="keep_if_clean"), SECRET, source)
    assert "StudyDescription" not in dropped["Keep"]
    assert {"StudyDescription", "SeriesDescription", "ProtocolName"} <= set(kept["Keep"])


@pytest.mark.parametrize("keyword", ["StationName", "DeviceSerialNumber", "ImageComments",
                                     "PatientAge", "PatientName", "InstitutionName",
                                     "NotAKeyword"])
def test_description_tags_accept_only_descriptors(keyword):
    with pytest.raises(ValidationError):
        DeidProfile(descriptions="keep_if_clean", description_tags=("StudyDescription", keyword))
    assert DeidProfile(description_tags=("SegmentDescription", "ProtocolName"))


def test_identity_keys_on_issuer_and_patient_id():
    base = {"PatientID": "PX1", "StudyInstanceUID": "1.2.3"}
    _, plain = build_request(DeidProfile(), SECRET, base)
    _, issuer_a = build_request(DeidProfile(), SECRET, {**base, "IssuerOfPatientID": "HOSP-A"})
    _, issuer_b = build_request(DeidProfile(), SECRET, {**base, "IssuerOfPatientID": "HOSP-B"})
    assert len({plain.patient_id, issuer_a.patient_id, issuer_b.patient_id}) == 3
    assert issuer_a.date_shift_days != issuer_b.date_shift_days or \
        issuer_a.patient_id != issuer_b.patient_id
    # one StudyInstanceUID under two patients: two pseudonymous UIDs
    assert len({plain.study_uid, issuer_a.study_uid, issuer_b.study_uid}) == 3
    assert issuer_a.patient_key_from == "IssuerOfPatientID+PatientID"


def test_study_without_patient_id_is_keyed_on_its_study():
    _, linkage = build_request(DeidProfile(), SECRET, {"StudyInstanceUID": "1.2.3"})
    _, other = build_request(DeidProfile(), SECRET, {"StudyInstanceUID": "1.2.4"})
    assert linkage.patient_key_from == "StudyInstanceUID"
    assert linkage.patient_id != other.patient_id


def test_request_errors_name_no_value():
    with pytest.raises(DeidError) as missing:
        build_request(DeidProfile(), SECRET, {"PatientName": "Quillfeather^Amadea"})
    assert "Quillfeather" not in str(missing.value)
    with pytest.raises(DeidError) as bad_uid:
        build_request(DeidProfile(), SECRET, {"PatientID": "PX7654321",
                                              "StudyInstanceUID": "not-a-uid"})
    assert "PX7654321" not in str(bad_uid.value) and "not-a-uid" not in str(bad_uid.value)


def test_orthanc_expand_and_multivalue_forms_are_read():
    simple, _ = build_request(DeidProfile(), SECRET, {"PatientID": "PX1",
                                                     "StudyInstanceUID": "1.2.3"})
    expanded, _ = build_request(DeidProfile(), SECRET, {
        "PatientID": {"Name": "PatientID", "Type": "String", "Value": "PX1"},
        "StudyInstanceUID": ["1.2.3"]})
    assert simple == expanded


def test_linkage_keeps_identifiers_out_of_repr(cohort):
    study = cohort.studies[0]
    _, linkage = build_request(DeidProfile(), SECRET, _shared_tags(study.files[0]))
    shown = repr(linkage) + str(linkage)
    for value in (study.patient_id, study.accession, study.study_uid, "Quill",
                  study.patient_name.split("^")[0], "date_shift_days"):
        assert value not in shown
    dumped = linkage.model_dump()
    assert dumped["source_patient_id"] == study.patient_id
    assert dumped["source_study_uid"] == study.study_uid
    assert dumped["source_patient_name"] == study.patient_name
    assert isinstance(linkage, LinkageEntry)


def test_client_kwargs_match_the_orthanc_client():
    body, _ = build_request(DeidProfile(), SECRET, {"PatientID": "PX1",
                                                   "StudyInstanceUID": "1.2.3"})
    kwargs = client_kwargs(body)
    parameters = inspect.signature(Operations.anonymize.steps).parameters
    assert set(kwargs) <= set(parameters)
    assert kwargs["force"] is False and kwargs["dicom_version"] == "2021b"


# ------------------------------------------------------------------ provenance


def test_method_codes_follow_cid_7050():
    dcm = codes.DCM  # pydicom's copy of PS3.16: the meanings must match it exactly
    expected = {
        "113100": dcm.BasicApplicationConfidentialityProfile,
        "113105": dcm.CleanDescriptorsOption,
        "113107": dcm.RetainLongitudinalTemporalInformationModifiedDatesOption,
        "113111": dcm.RetainSafePrivateOption,
    }
    profile = DeidProfile(descriptions="keep_if_clean", private_tags="allowlist",
                          private_allowlist=("0011,1001",))
    for code in profile.method_codes():
        assert code.scheme == "DCM"
        assert code.meaning == expected[code.value].meaning
        assert code.value == expected[code.value].value
    assert [c.value for c in DeidProfile().method_codes()] == ["113100", "113107"]
    assert [c.value for c in DeidProfile(dates="blank").method_codes()] == ["113100"]


def test_deidentification_method_fits_lo():
    profile = DeidProfile(name="a" * 24, version="v" * 8, descriptions="keep_if_clean",
                          private_tags="allowlist", private_allowlist=("0011,1001",))
    values = profile.method_values()
    assert all(0 < len(v) <= 64 and "\\" not in v for v in values)
    assert profile.deidentification_method == "\\".join(values)
    assert DeidProfile().deidentification_method.startswith(
        "prefect-orthanc profile research v1\\")
    assert "date shift" in DeidProfile().deidentification_method
    assert "dates blanked" in DeidProfile(dates="blank").deidentification_method


# ------------------------------------------------------------------ the profile itself


def test_profile_is_frozen_and_validated() -> None:
    profile = DeidProfile()
    with pytest.raises(ValidationError):
        profile.dates = "blank"  # type: ignore[misc]
    for bad in ({"pseudonym_prefix": "p"}, {"pseudonym_prefix": "TOOLONGXX"},
                {"private_allowlist": ("0011,1001",)},  # needs private_tags="allowlist"
                {"private_tags": "allowlist", "private_allowlist": ("0010,0010",)},
                {"private_tags": "allowlist", "private_allowlist": ("0011,0010",)},
                {"private_tags": "allowlist", "private_allowlist": ("bogus",)},
                {"max_shift_days": 0}, {"name": "has space"}, {"version": ""},
                {"description_tags": ("PatientName",)}, {"description_tags": ("NoSuchTag",)},
                {"dates": "keep"}, {"unknown_field": 1}):
        with pytest.raises(ValidationError):
            DeidProfile(**bad)
    assert DeidProfile(private_tags="allowlist",
                       private_allowlist=("0011,10AB",)).private_allowlist == ("0011,10ab",)


@pytest.mark.parametrize(("modality", "sop", "excluded"), [
    ("CT", "1.2.840.10008.5.1.4.1.1.2", False),
    ("MR", "1.2.840.10008.5.1.4.1.1.4", False),
    ("US", "1.2.840.10008.5.1.4.1.1.6.1", True),
    ("sr", "", True),
    ("OT", "1.2.840.10008.5.1.4.1.1.7", True),
    ("CT", "1.2.840.10008.5.1.4.1.1.7", True),          # a secondary capture, whatever modality
    ("DOC", "1.2.840.10008.5.1.4.1.1.104.1", True),
    ("SR", "1.2.840.10008.5.1.4.1.1.88.22", True),
    ("KO", "1.2.840.10008.5.1.4.1.1.88.59", True),
    ("CT", "1.2.840.10008.5.1.4.1.1.88.999", True),     # a future SR class: by the SR root
    ("XC", "1.2.840.10008.5.1.4.1.1.77.1.4", True),     # photographs
    ("", "", False),
])
def test_is_excluded(modality, sop, excluded):
    assert is_excluded(DeidProfile(), modality, sop) is excluded
    assert is_excluded(DeidProfile(include_risky=True), modality, sop) is False


def test_burned_in_annotation_excludes_unless_risky():
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert is_excluded(DeidProfile(), "CT", ct, burned_in_annotation="YES")
    assert not is_excluded(DeidProfile(), "CT", ct, burned_in_annotation="NO")
    assert DeidProfile().excludes("CT", ct, burned_in_annotation="YES ")
    assert not DeidProfile(include_risky=True).excludes("CT", ct, burned_in_annotation="YES")
    custom = DeidProfile(exclude_modalities=("ct",), exclude_sop_classes=(),
                         exclude_sop_class_roots=())
    assert custom.excludes("CT", ct) and not custom.excludes("US", "1.2.840.10008.5.1.4.1.1.6.1")


def test_one_source_accession_under_two_patients_gets_two_pseudonyms():
    """Accession numbers repeat across patients (sites, years, test data): a pseudonymous
    accession keyed on the value alone would link the two patients; keyed per patient it
    stays one per patient and study, in every run."""
    def source(patient_id: str) -> dict[str, str]:
        return {"PatientID": patient_id, "AccessionNumber": "2008-ACC", "PatientName": "X^Y",
                "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77"}

    _, first = build_request(DeidProfile(), SECRET, source("2008-3"))
    _, second = build_request(DeidProfile(), SECRET, source("2008-4"))
    _, again = build_request(DeidProfile(), SECRET, source("2008-3"))
    assert first.accession != second.accession
    assert first.accession == again.accession
