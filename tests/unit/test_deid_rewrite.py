"""The pydicom half of de-identification: dates, UIDs and identifiers at every depth; risk."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from prefect_orthanc.flows.deid import (
    DeidProfile,
    Rewriter,
    build_request,
    identifiers_from,
    risk_reason,
    scan_dataset,
    shift_da,
    shift_dt,
    typed_forms,
)
from prefect_orthanc.flows.deid.dictionary import is_identifier, is_well_known_uid

SECRET = b"project-secret-0123456789abcdef!"
DATA = __import__("pathlib").Path(pydicom.__file__).parent / "data"


def get_testdata_file(name: str) -> str:
    """A file shipped in the pydicom wheel (never downloaded)."""
    (path,) = [p for p in DATA.rglob(name)]
    return str(path)
CT = UID("1.2.840.10008.5.1.4.1.1.2")


# ------------------------------------------------------------------ dates


@pytest.mark.parametrize(("value", "days", "expected"), [
    ("20200131", 1, "20200201"),
    ("20200301", -1, "20200229"),
    ("2020.03.01", -1, "20200229"),              # ACR-NEMA form, written as DA
    ("20200101-20200201", 10, "20200111-20200211"),
    ("-20200201", 10, "-20200211"),
    ("2020-03-01", 1, ""),                       # not DA: removed, never passed through
    ("20201340", 1, ""),
    ("", 5, ""),
])
def test_shift_da(value, days, expected):
    assert shift_da(value, days) == expected


@pytest.mark.parametrize(("value", "days", "expected"), [
    ("20200131235959.123456+0100", 1, "20200201235959.123456+0100"),
    ("202001312359-0500", 1, "202002012359-0500"),
    ("20200131", 1, "20200201"),
    ("202001", 40, "202002"),                    # month precision kept
    ("2020", 200, "2021"),                       # year precision kept
    ("2020+0100", -200, "2019+0100"),
    ("garbage", 1, ""),
])
def test_shift_dt_keeps_precision_and_time_zone(value, days, expected):
    assert shift_dt(value, days) == expected


def test_typed_forms():
    assert set(typed_forms("20240307")) >= {"20240307", "2024-03-07", "07.03.2024",
                                            "07/03/2024"}
    assert typed_forms("2024") == []


# ------------------------------------------------------------------ dictionary


def test_well_known_uids_come_from_pydicom():
    assert is_well_known_uid(CT)                         # SOP class
    assert is_well_known_uid("1.2.840.10008.1.2.1")      # transfer syntax
    assert is_well_known_uid("1.2.840.10008.2.16.4")     # DCM coding scheme
    assert not is_well_known_uid("1.3.6.1.4.1.99999.1.1")


@pytest.mark.parametrize(("keyword", "expected"), [
    ("AccessionNumber", True), ("PlacerOrderNumberProcedure", True),
    ("FillerOrderNumberProcedure", True), ("RequestedProcedureID", True),
    ("ContainerIdentifier", True), ("DeviceSerialNumber", True),
    ("InstanceNumber", False), ("SeriesNumber", False), ("ContextIdentifier", False),
    ("CodeValue", False), ("StudyInstanceUID", False),
])
def test_identifier_attributes_come_from_the_dictionary(keyword, expected):
    from pydicom.datadict import tag_for_keyword

    assert is_identifier(tag_for_keyword(keyword)) is expected


# ------------------------------------------------------------------ the rewrite


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _source() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.3.6.1.4.1.99999.1.3")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.3.6.1.4.1.99999.1.3"
    ds.StudyInstanceUID = "1.3.6.1.4.1.99999.1.1"
    ds.SeriesInstanceUID = "1.3.6.1.4.1.99999.1.2"
    ds.FrameOfReferenceUID = "1.3.6.1.4.1.99999.1.4"
    ds.PyramidUID = "1.3.6.1.4.1.99999.1.5"
    ds.Modality = "CT"
    ds.PatientName = "Wang^Fang=王^芳"
    ds.PatientID = "MRN0012345"
    ds.IssuerOfPatientID = "HOSPITAL-A"
    ds.AccessionNumber = "ACC778899"
    ds.StudyID = "4711"
    ds.StudyDate = "20240307"
    ds.StudyTime = "101500"
    ds.PatientBirthDate = "19700412"
    ds.InstanceCreationDate = "20240307"
    ds.AcquisitionDateTime = "20240307101512.5+0100"
    ds.add_new(0x00400002, "DA", "20240306")  # ScheduledProcedureStepStartDate
    ds.add_new(0x00400006, "PN", "Nurse^Ratched")  # ScheduledPerformingPhysicianName
    ds.PlacerOrderNumberImagingServiceRequestRetired = "ORD-5566"  # (0040,2006)
    ds.add_new(0x00100035, "LO", "1392/12/17")  # PatientBirthDateInAlternativeCalendar
    ds.ReferencedRequestSequence = Sequence([_item(
        AccessionNumber="ACC778899", RequestedProcedureID="RP-5566",
        StudyInstanceUID="1.3.6.1.4.1.99999.1.1",
        ReferencedStudySequence=Sequence([_item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
            ReferencedSOPInstanceUID="1.3.6.1.4.1.99999.1.9")]))])
    ds.OtherPatientIDsSequence = Sequence([_item(PatientID="MRN0012345",
                                                 PatientName="Wang^Fang")])
    ds.ContentSequence = Sequence([_item(
        ObservationDateTime="20240307", VerifyingObserverName="Observer^Olga")])
    return ds


def _rewrite(source: Dataset, anonymized: Dataset | None = None, **options):
    profile = DeidProfile(**options)
    _, linkage = build_request(profile, SECRET, source)
    out = copy.deepcopy(source if anonymized is None else anonymized)
    return Rewriter(profile, SECRET, linkage).rewrite(out, source), linkage


def test_every_date_at_any_depth_moves_by_the_patients_offset():
    source = _source()
    out, linkage = _rewrite(source)
    days = linkage.date_shift_days
    assert out.StudyDate == shift_da("20240307", days) == out.InstanceCreationDate
    assert out.PatientBirthDate == shift_da("19700412", days)
    assert out[0x00400002].value == shift_da("20240306", days)
    assert out.AcquisitionDateTime == shift_dt("20240307101512.5+0100", days)
    assert out.ContentSequence[0].ObservationDateTime == shift_dt("20240307", days)
    assert out.StudyTime == "101500"                     # times kept with shifted dates
    assert 0x00100035 not in out                          # alternative calendar: removed
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert "113107" in codes


def test_dates_the_basic_profile_dropped_come_back_shifted():
    source = _source()
    basic = copy.deepcopy(source)
    del basic.InstanceCreationDate, basic.StudyTime
    basic.StudyDate = ""
    out, linkage = _rewrite(source, basic)
    assert out.InstanceCreationDate == shift_da("20240307", linkage.date_shift_days)
    assert out.StudyDate == out.InstanceCreationDate and out.StudyTime == "101500"


def test_blank_mode_removes_every_date_and_time_and_claims_no_113107():
    out, linkage = _rewrite(_source(), dates="blank")
    assert linkage.date_shift_days is None
    assert out.StudyDate == out.InstanceCreationDate == out.PatientBirthDate == ""
    assert out.AcquisitionDateTime == "" and out.StudyTime == ""
    assert out.ContentSequence[0].ObservationDateTime == ""
    assert "113107" not in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_identifiers_replaced_at_every_depth_with_the_same_pseudonyms():
    out, linkage = _rewrite(_source())
    request = out.ReferencedRequestSequence[0]
    assert out.AccessionNumber == request.AccessionNumber == linkage.accession
    assert out.PatientID == out.OtherPatientIDsSequence[0].PatientID == linkage.patient_id
    assert out.OtherPatientIDsSequence[0].PatientName == linkage.patient_name
    assert request.StudyInstanceUID == out.StudyInstanceUID == linkage.study_uid
    assert request.RequestedProcedureID not in ("", "RP-5566")
    assert out[0x00402006].value not in ("", "ORD-5566")
    assert out.IssuerOfPatientID != "HOSPITAL-A"
    assert out[0x00400006].value == "" and out.ContentSequence[0].VerifyingObserverName == ""


def test_every_instance_uid_remapped_well_known_ones_kept():
    source = _source()
    out, _ = _rewrite(source)
    remapped = {out.SOPInstanceUID, out.SeriesInstanceUID, out.FrameOfReferenceUID,
                out.PyramidUID,
                out.ReferencedRequestSequence[0].ReferencedStudySequence[0]
                .ReferencedSOPInstanceUID}
    assert all(uid.startswith("2.25.") for uid in remapped) and len(remapped) == 5
    assert out.SOPClassUID == CT
    assert out.ReferencedRequestSequence[0].ReferencedStudySequence[0] \
        .ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    again, _ = _rewrite(source)
    assert again.SOPInstanceUID == out.SOPInstanceUID  # keyed: the same in every run


def test_the_rewritten_instance_is_clean_for_the_scanner():
    source = _source()
    out, _ = _rewrite(source)
    out = dcmread(__import__("io").BytesIO(Rewriter.to_bytes(out)))
    assert scan_dataset(out, identifiers_from(source)) == []
    # and the scanner does find the source in the source
    kinds = {f.kind for f in scan_dataset(source, identifiers_from(source))}
    assert {"PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
            "PyramidUID", "PlacerOrderNumberImagingServiceRequestRetired"} <= kinds


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "waveform_ecg.dcm",
                                  "rtplan.dcm", "liver_1frame.dcm", "SC_rgb_rle.dcm",
                                  "chrH31.dcm", "chrJapMulti.dcm", "chrKoreanMulti.dcm",
                                  "chrX2.dcm"])
def test_real_files_rewrite_and_scan_clean(name):
    """What the rewrite owns (names, IDs, UIDs, dates) is clean on files written by others;
    what is left (institutions, descriptions) is for Orthanc's Basic Profile to remove."""
    source = dcmread(get_testdata_file(name))
    out, _ = _rewrite(source)
    out = dcmread(__import__("io").BytesIO(Rewriter.to_bytes(out)))
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    owned = [f for f in scan_dataset(out, identifiers_from(source))
             if f.element in ("private", "unknown") or dictionary_VR(
                 tag_for_keyword(f.element)) in ("PN", "UI", "DA", "DT")
             or is_identifier(tag_for_keyword(f.element))]
    assert not owned, (name, [str(f) for f in owned])


# ------------------------------------------------------------------ the scanner


def test_scanner_finds_short_and_ideographic_names_in_free_text():
    ids = identifiers_from(_source())
    assert ids.kinds_in("胸部CT 王芳 复查") == ["PatientName"]
    assert ids.kinds_in("胸部CT王芳复查") == ["PatientName"]
    assert ids.kinds_in("seen by Fang") == ["PatientName part"]
    assert ids.kinds_in("王") == []  # one ideograph alone matches too much to be a finding


@pytest.mark.parametrize("text", ["exam 2024-03-07", "07.03.2024 follow-up", "on 07/03/2024",
                                  "20240307"])
def test_scanner_finds_dates_as_people_type_them(text):
    assert identifiers_from(_source()).kinds_in(text)


def test_scanner_finds_ids_without_their_prefix():
    ids = identifiers_from(_source())
    assert ids.kinds_in("patient 0012345") == ["PatientID"]
    assert ids.kinds_in("MRN0012345") == ["PatientID"]
    assert "PlacerOrderNumberImagingServiceRequestRetired" in ids.kinds_in("order ORD-5566")


def test_scanner_reads_waveform_labels_and_other_charsets():
    source = _source()
    out, _ = _rewrite(source)
    out.WaveformSequence = Sequence([_item(ChannelDefinitionSequence=Sequence([
        _item(ChannelLabel="Wang Fang")]))])
    out.SpecificCharacterSet = "ISO_IR 100"  # declared Latin-1, the bytes are UTF-8
    out.add_new(0x00091010, "LO", "王芳".encode())
    out = dcmread(__import__("io").BytesIO(Rewriter.to_bytes(out)))
    kinds = {(f.path.split("[")[0], f.kind) for f in scan_dataset(out, identifiers_from(source))}
    assert ("(5400,0100)", "PatientName") in kinds
    assert ("(0009,1010)", "PatientName") in kinds


# ------------------------------------------------------------------ risk


@pytest.mark.parametrize(("attributes", "reason"), [
    ({"Modality": "US"}, "modality US"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class Secondary Capture Image Storage"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.4"}, "SOP class VL Photographic Image Storage"),
    ({"BurnedInAnnotation": "YES"}, "burned-in annotation"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
      "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.6"}, "label or overview image"),
    ({"ImageType": ["DERIVED", "PRIMARY", "OVERVIEW"]}, "label or overview image"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.1.1"},
     "SOP class Video Endoscopic Image Storage"),
    ({"BurnedInAnnotation": "NO"}, None),
])
def test_risk_reasons(attributes, reason):
    ds = _item(Modality="CT", SOPClassUID=CT)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    assert risk_reason(DeidProfile(), ds) == reason
    assert risk_reason(DeidProfile(include_risky=True), ds) is None


def test_overlay_and_video_transfer_syntax_are_risky():
    ds = _item(Modality="MR", SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    assert risk_reason(DeidProfile(), ds) == "overlay plane"
    video = _item(Modality="XC", SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.4.1")
    video.file_meta = FileMetaDataset()
    video.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    assert risk_reason(DeidProfile(exclude_sop_classes=()), video) == "video"
    assert risk_reason(DeidProfile(), dcmread(get_testdata_file("MR_small.dcm"))) is None


def test_long_multi_valued_names_are_targets_and_found_in_unknown_sequences():
    """Eight operators (> 256 bytes, which Orthanc's simplified tags drop): one of them in a
    SegmentDescription deep in a sequence is found."""
    source = _source()
    operators = [f"Surname{letter}ovich^Given{letter}ina^Middle{letter}ova^Dr"
                 for letter in "ABCDEFGH"]
    source.OperatorsName = operators
    assert len("\\".join(operators)) > 256
    out, _ = _rewrite(source)
    assert out.OperatorsName == ""
    out.SegmentSequence = Sequence([_item(SegmentNumber=1, SegmentLabel="liver",
                                          SegmentDescription="drawn by SurnameFovich")])
    findings = scan_dataset(out, identifiers_from(source))
    assert [(f.path, f.kind) for f in findings] == [
        ("(0062,0002)[0].(0062,0006)", "OperatorsName part")]
