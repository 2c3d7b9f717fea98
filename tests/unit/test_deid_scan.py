"""The output scan: every planted identifier is found, a clean copy passes, reports never
echo a value."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from prefect_orthanc.deployments.lab.synthetic import PRIVATE_GROUP, make_cohort
from prefect_orthanc.flows.deid import (
    Finding,
    identifiers_from,
    pseudo_uid,
    pseudonym,
    scan_dataset,
    scan_zip,
    shift_date,
)
from prefect_orthanc.flows.deid import scan as scan_module

SECRET = b"project-secret-0123456789abcdef!"
NESTED_PATIENT_ID = "(0040,0275)[0].(0010,1002)[0].(0010,0020)"

#: every element the test's own de-identification removes outright
REMOVED = ("OtherPatientIDs", "PatientAddress", "PatientTelephoneNumbers", "InstitutionName",
           "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
           "OperatorsName", "StudyDescription", "SeriesDescription", "RequestAttributesSequence")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("deid-scan-source"), patients=2,
                       studies_per_patient=2, series_per_study=2, instances_per_series=2)


@pytest.fixture(scope="module")
def identifiers(cohort):
    return identifiers_from(cohort.files)


def _deidentified(source: Path) -> Dataset:
    """A de-identified copy made with pydicom: identifiers replaced or removed, private tags
    deleted, the nested sequences removed, dates shifted, new UIDs."""
    ds = dcmread(source)
    ds.remove_private_tags()
    for keyword in REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    patient_id = str(ds.PatientID)
    days = 17
    ds.PatientID = pseudonym(SECRET, "PatientID", patient_id)
    ds.PatientName = pseudonym(SECRET, "PatientName", patient_id)
    ds.AccessionNumber = pseudonym(SECRET, "AccessionNumber", str(ds.AccessionNumber))
    ds.StudyID = ""
    ds.PatientBirthDate = shift_date(ds.PatientBirthDate, days)
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, keyword, shift_date(ds[keyword].value, days))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID"):
        setattr(ds, keyword, pseudo_uid(SECRET, ds[keyword].value))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientIdentityRemoved = "YES"
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _zip(path: Path, members: dict[str, Path | bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            data = content if isinstance(content, bytes) else content.read_bytes()
            archive.writestr(name, data)
    return path


def _no_value_in(text: str, values: set[str]) -> list[str]:
    folded = text.casefold()
    return sorted(v for v in values if v.casefold() in folded)


# ------------------------------------------------------------------ identifiers


def test_identifiers_cover_every_planted_value(cohort, identifiers):
    for value in cohort.phi_values():
        assert identifiers.kinds_in(value), "a planted value is not among the identifiers"
    kinds = identifiers.kinds()
    for kind in ("PatientName", "PatientName part", "PatientID", "OtherPatientIDs",
                 "PatientBirthDate", "AccessionNumber", "InstitutionName", "PatientAddress",
                 "PatientTelephoneNumbers", "ReferringPhysicianName part", "StudyInstanceUID",
                 "SeriesInstanceUID", "SOPInstanceUID", "StudyDate"):
        assert kinds.get(kind), kind
    assert "StudyID" not in kinds  # the synthetic StudyIDs are "1", "2": too short to matter


def test_identifiers_never_show_values(cohort, identifiers):
    shown = repr(identifiers) + str(identifiers) + repr(identifiers.kinds())
    assert not _no_value_in(shown, cohort.phi_values())
    with pytest.raises(TypeError):
        pickle.dumps(identifiers)


def test_generic_and_short_values_are_ignored():
    ids = identifiers_from({"PatientName": "Dr^Li^Yes", "PatientID": "42",
                            "OtherPatientIDs": "UNKNOWN\\NONE", "PatientSex": "F",
                            "InstitutionName": "N/A"})
    assert ids.kinds_in("report by dr li yes") == ["PatientName"]
    assert ids.kinds_in("Li's scan") == ["PatientName part"]  # two-letter names count
    assert ids.kinds_in("yes") == [] and ids.kinds_in("42") == []
    assert ids.kinds_in("unknown none n/a f") == []


def test_orthanc_json_tags_are_accepted():
    simplified = {"PatientName": "Quillfeather^Amadea^J", "PatientID": "PX1234567",
                  "StudyInstanceUID": "1.2.3.4.5",
                  "RequestAttributesSequence": [{"AccessionNumber": "ACC12345678",
                                                 "OtherPatientIDsSequence": [
                                                     {"PatientID": "OPX99999999"}]}]}
    expanded = {"0010,0010": {"Name": "PatientName", "Type": "String",
                              "Value": "Quillfeather^Amadea^J"},
                "0010,1002": {"Name": "OtherPatientIDsSequence", "Type": "Sequence",
                              "Value": [{"0010,0020": {"Name": "PatientID", "Type": "String",
                                                       "Value": "OPX99999999"}}]}}
    short = {"0010,0020": "PX1234567", "0008,0050": "ACC12345678"}
    ids = identifiers_from([simplified, expanded, short])
    assert ids.kinds_in("OPX99999999") == ["OtherPatientIDs"]
    assert ids.kinds_in("see ACC12345678") == ["AccessionNumber"]
    assert ids.kinds_in("QUILLFEATHER, Amadea") == ["PatientName"]  # "family, given"
    assert ids.kinds_in("Amadea's scan") == ["PatientName part"]
    assert ids.uid_kind("1.2.3.4.5") == "StudyInstanceUID"


def test_names_match_as_words_ids_as_substrings():
    ids = identifiers_from({"PatientName": "Lumberwick^Ottoline", "PatientID": "PX1234567"})
    assert ids.kinds_in("Ottoline's scan") == ["PatientName part"]
    assert ids.kinds_in("lumberwick_ottoline.dcm") == ["PatientName part"]
    assert ids.kinds_in("Ottolinexx") == []             # not a whole word
    assert ids.kinds_in("IDPX1234567X") == ["PatientID"]  # IDs anywhere


# ------------------------------------------------------------------ (a) the source itself


def test_scanning_the_source_finds_every_planted_place(cohort, identifiers):
    findings = scan_dataset(dcmread(cohort.files[0]), identifiers)
    paths = {f.path for f in findings}
    kinds = {f.kind for f in findings}
    assert {"(0010,0010)", "(0010,0020)", "(0010,0030)", "(0008,0050)", "(0010,1040)",
            "(0010,2154)", "(0008,0080)", "(0008,0090)"} <= paths            # top level
    assert {"(0011,1001)", "(0011,1002)"} <= paths                          # private block
    assert NESTED_PATIENT_ID in paths                                       # 2 levels deep
    assert "(0040,0275)[0].(0008,0050)" in paths                            # 1 level deep
    assert {"(0008,1030)", "(0008,103E)", "(0040,0275)[0].(0032,1060)"} <= paths  # free text
    assert {"(0020,000D)", "(0020,000E)", "(0008,0018)", "(0002,0003)"} <= paths  # UIDs
    assert {"PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"} <= kinds
    private = [f for f in findings if f.path == "(0011,1001)"]
    assert private[0].kind == "PatientID" and private[0].element == "private"


def test_private_tags_of_unknown_vr_are_decoded(cohort, identifiers, tmp_path):
    """Implicit VR: pydicom cannot know the private VR and reads the bytes as UN."""
    ds = _deidentified(cohort.files[0])
    source = dcmread(cohort.files[0])
    block = ds.private_block(PRIVATE_GROUP, "PREFECT ORTHANC TEST", create=True)
    block.add_new(0x02, "LO", str(source.PatientName))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    reread = dcmread(path)
    assert reread[0x00111002].VR == "UN" and isinstance(reread[0x00111002].value, bytes)
    findings = scan_dataset(reread, identifiers)
    assert [(f.path, f.kind) for f in findings] == [("(0011,1002)", "PatientName")]


# ------------------------------------------------------------------ (b) a clean copy


def test_a_properly_deidentified_copy_scans_clean(cohort, identifiers, tmp_path):
    copies = {}
    for index, source in enumerate(cohort.files):
        copies[f"study/series/IM{index:04d}.dcm"] = _save(_deidentified(source),
                                                          tmp_path / f"{index}.dcm")
    for path in copies.values():
        assert scan_dataset(dcmread(path), identifiers) == []
    report = scan_zip(_zip(tmp_path / "clean.zip", copies), identifiers)
    assert report.clean and report.findings == () and report.total_findings == 0
    assert report.instances == report.members == len(cohort.files)
    assert "clean" in report.summary()


# ------------------------------------------------------------------ (c) one nested leak


def test_one_nested_value_left_gives_exactly_that_finding(cohort, identifiers, tmp_path):
    source = dcmread(cohort.files[0])
    ds = _deidentified(cohort.files[0])
    deeper = Dataset()
    deeper.PatientID = source.PatientID
    deeper.TypeOfPatientID = "TEXT"
    request = Dataset()
    request.ScheduledProcedureStepID = "X1"
    request.OtherPatientIDsSequence = Sequence([deeper])
    ds.RequestAttributesSequence = Sequence([request])
    findings = scan_dataset(dcmread(_save(ds, tmp_path / "leak.dcm")), identifiers)
    assert len(findings) == 1
    finding = findings[0]
    assert finding.path == NESTED_PATIENT_ID
    assert finding.kind == "PatientID" and finding.element == "PatientID"
    shown = str(finding) + repr(finding) + finding.model_dump_json()
    assert not _no_value_in(shown, cohort.phi_values() | {str(source.PatientID)})

    report = scan_zip(_zip(tmp_path / "leak.zip", {"a/IM1.dcm": tmp_path / "leak.dcm"}),
                      identifiers)
    assert not report.clean and report.total_findings == 1
    assert report.findings[0].member == 0 and report.findings[0].path == NESTED_PATIENT_ID
    assert report.by_kind() == {"PatientID": 1}
    assert not _no_value_in(repr(report) + report.summary(), cohort.phi_values())


# ------------------------------------------------------------------ (d) member names


def test_a_member_name_with_the_surname_is_a_finding_without_the_name(cohort, identifiers,
                                                                       tmp_path):
    patient = cohort.patients[0]
    clean = _save(_deidentified(patient.studies[0].files[0]), tmp_path / "ok.dcm")
    members = {"P0001/IM0001.dcm": clean,
               f"{patient.family_name.upper()}_study/IM0002.dcm": clean}
    report = scan_zip(_zip(tmp_path / "named.zip", members), identifiers)
    assert not report.clean and report.instances == 2
    assert [(f.member, f.path, f.kind) for f in report.findings] == [
        (1, "<member name>", "PatientName part")]
    shown = repr(report) + report.summary() + "".join(str(f) for f in report.findings)
    assert patient.family_name.casefold() not in shown.casefold()


def test_folder_entries_are_checked_too(cohort, identifiers, tmp_path):
    patient = cohort.patients[1]
    path = tmp_path / "dirs.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{patient.patient_id}/", b"")
    report = scan_zip(path, identifiers)
    assert [(f.member, f.kind) for f in report.findings] == [(0, "PatientID")]
    assert report.instances == 0


# ------------------------------------------------------------------ (e) UIDs


@pytest.mark.parametrize(("keyword", "kind"), [("SeriesInstanceUID", "SeriesInstanceUID"),
                                               ("StudyInstanceUID", "StudyInstanceUID"),
                                               ("FrameOfReferenceUID", "FrameOfReferenceUID")])
def test_a_source_uid_left_unchanged_is_a_finding(cohort, identifiers, tmp_path, keyword, kind):
    source = dcmread(cohort.files[0])
    ds = _deidentified(cohort.files[0])
    setattr(ds, keyword, source[keyword].value)
    findings = scan_dataset(dcmread(_save(ds, tmp_path / "uid.dcm")), identifiers)
    assert [(f.path.strip("()"), f.kind) for f in findings] == [
        (f"{source[keyword].tag.group:04X},{source[keyword].tag.element:04X}", kind)]
    assert source[keyword].value not in str(findings[0]) + repr(findings[0])


def test_a_source_uid_in_meta_or_text_is_a_finding(cohort, identifiers, tmp_path):
    source = dcmread(cohort.files[0])
    ds = _deidentified(cohort.files[0])
    ds.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    ds.ImageComments = f"copied from {source.StudyInstanceUID}."
    ds.save_as(tmp_path / "meta.dcm")  # as is: enforce_file_format would fix the meta UID
    findings = scan_dataset(dcmread(tmp_path / "meta.dcm"), identifiers)
    assert {(f.path, f.kind) for f in findings} == {("(0002,0003)", "SOPInstanceUID"),
                                                   ("(0020,4000)", "StudyInstanceUID")}


# ------------------------------------------------------------------ robustness


def test_non_dicom_members_block_delivery(cohort, identifiers, tmp_path):
    patient = cohort.patients[0]
    members = {"README.txt": b"notes about case " + patient.patient_id.encode(),
               "empty.txt": b""}
    report = scan_zip(_zip(tmp_path / "odd.zip", members), identifiers)
    assert not report.clean and report.instances == 0
    assert {(f.member, f.kind) for f in report.findings} == {
        (0, "non-DICOM member"), (0, "PatientID"), (1, "non-DICOM member")}


def test_unreadable_archive_is_not_clean(identifiers, tmp_path):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"not a zip")
    report = scan_zip(bogus, identifiers)
    assert not report.clean and report.findings[0].kind == "unreadable archive"


def test_large_members_are_read_from_disk(cohort, identifiers, tmp_path, monkeypatch):
    monkeypatch.setattr(scan_module, "IN_MEMORY_LIMIT", 0)
    monkeypatch.setattr(scan_module, "DEFER_SIZE", 16)  # values read only when scanned
    report = scan_zip(_zip(tmp_path / "src.zip", {"IM1.dcm": cohort.files[0]}), identifiers)
    in_memory = scan_dataset(dcmread(cohort.files[0]), identifiers, member=0)
    assert set(report.findings) == set(in_memory)
    assert report.instances == 1


def test_findings_are_capped_but_counted(cohort, identifiers, tmp_path):
    members = {f"IM{i}.dcm": path for i, path in enumerate(cohort.files)}
    report = scan_zip(_zip(tmp_path / "src.zip", members), identifiers, max_findings=5)
    assert len(report.findings) == 5 and report.total_findings > 5 and not report.clean
    assert report.instances == len(cohort.files)


def test_finding_text_is_readable():
    finding = Finding(path="(0010,0020)", kind="PatientID", element="PatientID", member=3)
    assert str(finding) == "member 3: (0010,0020) PatientID: source PatientID found"


# ------------------------------------------------------------------ the byte-level prefilter


def test_clean_members_skip_the_full_parse(cohort, identifiers, tmp_path, monkeypatch):
    """A clean member is counted from a header read alone; the full scan never runs."""
    import prefect_orthanc.flows.deid.scan as scan_module

    copies = {f"s/IM{i}.dcm": _save(_deidentified(f), tmp_path / f"{i}.dcm")
              for i, f in enumerate(cohort.files)}
    calls = []
    monkeypatch.setattr(scan_module, "scan_dataset",
                        lambda *a, **k: calls.append(1) or [])
    report = scan_zip(_zip(tmp_path / "clean.zip", copies), identifiers)
    assert report.clean and report.instances == len(cohort.files) and calls == []


def test_prefilter_sends_utf8_names_to_the_full_scan(tmp_path):
    """A non-ASCII name stored as UTF-8 (ISO_IR 192) is still found."""
    source = dcmread(make_cohort(tmp_path / "src", patients=1, studies_per_patient=1,
                                 series_per_study=1, instances_per_series=1).files[0])
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "Müßiggång^Zoë"
    found = identifiers_from([source])
    leaked = _deidentified_like(source)
    leaked.SpecificCharacterSet = "ISO_IR 192"
    leaked.ImageComments = "seen by Müßiggång"
    report = scan_zip(_zip(tmp_path / "u.zip", {"a.dcm": _save(leaked, tmp_path / "u.dcm")}),
                      found)
    assert not report.clean
    assert {f.element for f in report.findings} == {"ImageComments"}


def test_prefilter_sends_utf16_private_text_to_the_full_scan(cohort, identifiers, tmp_path):
    source = dcmread(cohort.files[0])
    ds = _deidentified(cohort.files[0])
    block = ds.private_block(0x0013, "LEAKY VENDOR", create=True)
    block.add_new(0x01, "OB", str(source.PatientID).encode("utf-16-le"))
    report = scan_zip(_zip(tmp_path / "w.zip", {"a.dcm": _save(ds, tmp_path / "w.dcm")}),
                      identifiers)
    assert not report.clean and report.by_kind().get("PatientID") == 1


def _deidentified_like(source: Dataset) -> Dataset:
    ds = source.copy()
    ds.remove_private_tags()
    for keyword in REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName = "P-ANON"
    ds.PatientID = "P-ANON"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "FrameOfReferenceUID"):
        setattr(ds, keyword, pseudo_uid(SECRET, ds[keyword].value))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
                    "PatientBirthDate", "AccessionNumber", "StudyID"):
        if keyword in ds:
            setattr(ds, keyword, "")
    return ds


# ------------------------------------------------------------------ the prefilter skips pixels


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm",
                                  "JPEG2000-embedded-sequence-delimiter.dcm",
                                  "MR_small_RLE.dcm", "MR_small_implicit.dcm", "rtplan.dcm",
                                  "ExplVR_BigEnd.dcm", "JPEG-lossy.dcm"])
def test_pixel_data_span_delimits_real_files_exactly(name):
    """On the pydicom wheel's real files (native, JPEG 2000 and RLE fragments, no pixel
    data, big endian, implicit VR): the span is the whole pixel data element, from its tag
    to the byte after its last fragment, or None where it cannot be delimited for sure."""
    import io

    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file(name)).read_bytes()
    stream = io.BytesIO(data)
    head = dcmread(stream, stop_before_pixels=True, force=True)
    syntax = str(head.file_meta.get("TransferSyntaxUID", ""))
    span = scan_module.pixel_data_span(data, stream.tell(), syntax)
    full = dcmread(io.BytesIO(data), force=True)
    if "PixelData" not in full or syntax.endswith(".2.2"):
        assert span is None
        return
    start, end = span
    assert start == stream.tell()
    # what is left, read back, is the same dataset without its pixel data
    rest = dcmread(io.BytesIO(data[:start] + data[end:]), force=True)
    assert "PixelData" not in rest
    assert {e.tag for e in rest} == {e.tag for e in full} - {full["PixelData"].tag}


def test_the_prefilter_reads_what_follows_the_pixel_data(cohort, identifiers, tmp_path):
    """An identifier in an element after the pixel data (trailing padding, a private tag at
    the end) is still found: only the pixel data value itself is skipped, as in the full
    scan."""
    from pydicom.data import get_testdata_file

    ds = _deidentified(cohort.files[0])
    ds.PixelData = b"\x00\x01" * 4096
    source = dcmread(cohort.files[0])
    ds.add_new(0x7FE10010, "LO", "TRAILER")
    ds.add_new(0x7FE11001, "LO", f"x {source.PatientID} y")
    path = _save(ds, tmp_path / "trailing.dcm")
    report = scan_zip(_zip(tmp_path / "t.zip", {"a.dcm": path}), identifiers)
    assert not report.clean
    assert {f.kind for f in report.findings} == {"PatientID"}
    assert get_testdata_file("CT_small.dcm")  # the wheel's files are there (used above)


def test_identifiers_of_many_instances_are_those_of_each_in_any_character_set():
    """identifiers_from skips header bytes already seen in the same place and character set:
    the result is the union of each instance's own identifiers, for the wheel's files in
    multi-valued character sets (read as bytes, or already decoded) too."""
    from pydicom.data import get_charset_files, get_testdata_file

    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm"),
             *get_charset_files("chrH3*.dcm"), *get_charset_files("chrX*.dcm")]
    datasets = [dcmread(f) for f in files]
    for ds in datasets[::2]:  # some already decoded: a multi-valued charset is a list
        _ = ds.get("SpecificCharacterSet"), ds.get("PatientName")
    together = identifiers_from(datasets + [dcmread(f) for f in files])
    alone = [identifiers_from(dcmread(f)) for f in files]
    texts = set().union(*(ids._terms for ids in alone))
    uids = set().union(*(ids._uids for ids in alone))
    assert set(together._terms) == texts and set(together._uids) == uids
