"""The failure kinds of issue 11, each built as a small input and run through the real Orthanc:
nested identifiers after Orthanc's Basic Profile, every date, original UIDs, risky instances in
a clean series, waveform labels, an ideographic name in a kept description, identity keys."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from prefect_orthanc.flows.deid import DeidProfile, shift_da, shift_dt
from prefect_orthanc.flows.sharing import Destination, SharingOptions, deidentify_study

from .conftest import DEID_SECRET
from .test_deid_corpus import check_delivered

CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.3.6.1.4.1.99999.11."


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _instance(n: int, *, patient_id="CASE-0001", issuer="", study=ROOT + "1", series=ROOT + "2",
              name="Wang^Fang=王^芳", **extra) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = extra.get("SOPClassUID", CT)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{ROOT}{patient_id[-1]}{issuer[-1:]}.3.{n}")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = ROOT + "4"
    ds.PyramidUID = ROOT + "5"
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = "19700412"
    ds.AccessionNumber = "ACC778899"
    ds.StudyID = "4711"
    ds.StudyDate, ds.StudyTime = "20240307", "101500"
    ds.InstanceCreationDate = "20240307"
    ds.AcquisitionDateTime = "20240307101512.5+0100"
    ds.StudyDescription = "胸部CT 王芳 复查"
    ds.SeriesDescription = "Thorax"
    ds.PlacerOrderNumberImagingServiceRequestRetired = "ORD-5566"
    ds.FillerOrderNumberImagingServiceRequestRetired = "FIL-7788"
    ds.add_new(0x00100035, "LO", "1392/12/17")  # birth date, another calendar
    ds.ReferencedRequestSequence = Sequence([_item(
        AccessionNumber="ACC778899", RequestedProcedureID="RP-5566", StudyInstanceUID=study,
        PlacerOrderNumberImagingServiceRequest="ORD-5566")])
    ds.ContentSequence = Sequence([_item(ObservationDateTime="20240307",
                                         VerifyingObserverName="Observer^Olga")])
    ds.AnatomicRegionSequence = Sequence([_item(  # a sequence the Basic Profile keeps
        CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest",
        ContextGroupVersion="20240307", MappingResource="DCMR")])
    ds.InstanceNumber = n
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x00\x01" * 16
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def store(research):
    created: set[str] = set()

    def put(*datasets: Dataset) -> list[str]:
        studies = []
        for ds in datasets:
            (result,) = research.upload(_bytes(ds))
            created.add(result.parent_study)
            studies.append(result.parent_study)
        return list(dict.fromkeys(studies))

    yield put
    for study in created:
        research.delete("Study", study, missing_ok=True)


def _request(tmp_path: Path, profile: DeidProfile | None = None) -> SharingOptions:
    return SharingOptions(destination=Destination(target=str(tmp_path / "o")),
                          linkage_path=str(tmp_path / "private" / "linkage.csv"),
                          staging_dir=str(tmp_path / "staging"),
                          ledger_path=str(tmp_path / "ledger.jsonl"),
                          profile=profile or DeidProfile())


def _outputs(path: str) -> list[Dataset]:
    with zipfile.ZipFile(path) as archive:
        return [pydicom.dcmread(io.BytesIO(archive.read(n))) for n in archive.namelist()
                if not n.endswith("/")]


def _share(research, research_creds, study, tmp_path, profile=None):
    outcome = deidentify_study.fn(research_creds, study, _request(tmp_path, profile),
                                  DEID_SECRET.encode())
    if outcome.anonymized_id:
        research.delete("Study", outcome.anonymized_id, missing_ok=True)
    return outcome


def test_nested_identifiers_every_date_and_uids_after_orthanc(research, research_creds, store,
                                                              tmp_path):
    sources = [_instance(1), _instance(2)]
    (study,) = store(*sources)
    outcome = _share(research, research_creds, study, tmp_path)
    assert outcome.verified, outcome.findings
    assert check_delivered(Path(outcome.file), sources) == []
    out = _outputs(outcome.file)[0]
    # a verified study's linkage row waits next to its ZIP until it is delivered
    days = json.loads(Path(outcome.file + ".linkage.json").read_text())["date_shift_days"]
    assert not (tmp_path / "private" / "linkage.csv").exists()
    assert out.StudyDate == out.InstanceCreationDate == shift_da("20240307", days)
    assert out.AcquisitionDateTime == shift_dt("20240307101512.5+0100", days)
    assert not out.get("ContentSequence")  # the Basic Profile emptied it
    assert out.AnatomicRegionSequence[0].ContextGroupVersion == shift_dt("20240307", days)
    assert 0x00100035 not in out
    request = out.get("ReferencedRequestSequence")
    if request:  # kept by Orthanc: its copies carry the same pseudonyms
        assert request[0].get("AccessionNumber", "") in ("", out.AccessionNumber)
        assert request[0].get("StudyInstanceUID", out.StudyInstanceUID) == out.StudyInstanceUID
    assert out.PyramidUID.startswith("2.25.") and out.FrameOfReferenceUID.startswith("2.25.")
    assert out.get("PlacerOrderNumberImagingServiceRequestRetired", "") != "ORD-5566"
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107"]


def test_risky_instances_in_a_clean_series_are_dropped_and_counted(research, research_creds,
                                                                   store, tmp_path):
    label = _instance(3, ImageType=["ORIGINAL", "PRIMARY", "LABEL"])
    burned = _instance(4, BurnedInAnnotation="YES")
    overlay = _instance(5)
    overlay.add_new(0x60003000, "OW", b"\x00" * 8)
    sc = _instance(6, SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    (study,) = store(_instance(1), _instance(2), label, burned, overlay, sc)
    outcome = _share(research, research_creds, study, tmp_path)
    assert outcome.verified, outcome.findings
    assert outcome.instances_in == 6 and outcome.instances_out == 2 and outcome.excluded == 4
    assert outcome.excluded_reasons == {
        "label or overview image": 1, "burned-in annotation": 1, "overlay plane": 1,
        "SOP class Secondary Capture Image Storage": 1}


def test_waveform_label_and_kept_description_with_an_ideographic_name_are_found(
        research, research_creds, store, tmp_path):
    (study,) = store(_instance(1))
    kept = _share(research, research_creds, study, tmp_path,
                  DeidProfile(descriptions="keep_if_clean"))
    assert not kept.verified
    assert any("StudyDescription" in f and "PatientName" in f for f in kept.findings)
    assert not any("王" in f or "Wang" in f for f in kept.findings)

    ecg = _instance(7, patient_id="CASE-0009", SOPClassUID="1.2.840.10008.5.1.4.1.1.9.1.1",
                    Modality="ECG")
    del ecg.PixelData
    ecg.WaveformSequence = Sequence([_item(
        NumberOfWaveformChannels=1, NumberOfWaveformSamples=2, SamplingFrequency=500,
        WaveformBitsAllocated=16, WaveformSampleInterpretation="SS",
        ChannelDefinitionSequence=Sequence([_item(ChannelLabel="Fang Wang")]),
        WaveformData=b"\x00\x00\x01\x00")])
    (ecg_study,) = store(ecg)
    labelled = _share(research, research_creds, ecg_study, tmp_path / "ecg")
    assert not labelled.verified
    assert any(f.startswith("member 0: (5400,0100)") and "PatientName" in f
               for f in labelled.findings), labelled.findings


def test_one_id_two_issuers_and_one_study_uid_two_patients(research, research_creds, store,
                                                           tmp_path):
    first = store(_instance(1, issuer="HOSP-A"))[0]
    second = store(_instance(1, patient_id="CASE-0002", name="Other^Person"))[0]
    third = store(_instance(1, patient_id="CASE-0003", issuer="HOSP-B", name="Third^Person"))[0]
    merged = store(_instance(2, patient_id="CASE-0004", issuer="HOSP-A"),
                   _instance(2, patient_id="CASE-0004", issuer="HOSP-C"))[0]
    outcomes = [_share(research, research_creds, s, tmp_path / s[:6])
                for s in (first, second, third)]
    assert all(o.verified for o in outcomes), [o.findings for o in outcomes]
    pseudonyms = {o.pseudo_patient for o in outcomes}
    study_uids = {_outputs(o.file)[0].StudyInstanceUID for o in outcomes}
    assert len(pseudonyms) == 3 and len(study_uids) == 3  # one source StudyInstanceUID
    # Orthanc puts one PatientID + StudyInstanceUID under two issuers in one study: refused
    refused = _share(research, research_creds, merged, tmp_path / "merged")
    assert not refused.verified and "2 patients" in refused.findings[0]


def test_a_study_without_patient_id_is_keyed_on_its_study(research, research_creds, store,
                                                          tmp_path):
    source = _instance(1, patient_id="CASE-0010", study=ROOT + "77")
    del source.PatientID
    (study,) = store(source)
    outcome = _share(research, research_creds, study, tmp_path)
    assert outcome.verified, outcome.findings
    assert check_delivered(Path(outcome.file), [source]) == []
    linkage = json.loads(Path(outcome.file + ".linkage.json").read_text())
    assert linkage["patient_key_from"] == "StudyInstanceUID"  # said in the row
    assert outcome.pseudonym_from == "StudyInstanceUID"  # and in the outcome
    assert _outputs(outcome.file)[0].PatientID == outcome.pseudo_patient
