"""A deterministic synthetic DICOM cohort with planted PHI, for tests, demo and benchmarks.

``make_cohort(out_dir, patients=3, ...)`` writes small but valid CT/MR Part-10 files
(Explicit VR Little Endian, 16x16 MONOCHROME2 pixels). The same arguments always give
byte-identical files: UIDs come from ``generate_uid(entropy_srcs=...)`` seeded by the
arguments, dates and names from a seeded ``random.Random``, nothing from the clock.

Every patient carries distinctive identifying values (odd names such as
``Quillfeather^Amadea^J``, ``PX`` + 7 digit IDs, ``ACC`` + 8 digit accessions, addresses,
phone numbers in the fictional +44 1632 96xxxx range, physicians, institutions) planted at the
top level, in free text (descriptions mention the surname), in a private block (group 0x0011,
creator ``PREFECT ORTHANC TEST``) and in nested sequences (RequestAttributesSequence, with an
OtherPatientIDsSequence one level deeper). ``Cohort.phi_values()`` lists them for leak scans.

File and folder names are neutral (``study0001/s0001_01_0001.dcm``): no PHI in paths.
"""

from __future__ import annotations

import io
import os
import random
import sys
import zipfile
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import httpx
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = [
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "Cohort",
    "SyntheticPatient",
    "SyntheticSeries",
    "SyntheticStudy",
    "load_into",
    "make_cohort",
    "zip_bytes",
]

PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "PREFECT ORTHANC TEST"
#: element offsets inside the private block (tags 0011,10xx once the block is reserved)
PRIVATE_PATIENT_ID = 0x01
PRIVATE_PATIENT_NAME = 0x02

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.20231123.1"
IMPLEMENTATION_VERSION = "PREFECT_ORTHANC"

#: the SOP class conventionally referenced by ReferencedStudySequence items
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
ROWS = COLUMNS = 16

# Name material: odd on purpose, so a leak scan never matches a common word.
_SURNAME_HEADS = (
    "Quill", "Thistle", "Bramble", "Marrow", "Gorse", "Nettle", "Pebble", "Tansy", "Sorrel",
    "Spindle", "Quince", "Cobble", "Mottle", "Furze", "Brindle", "Kestrel", "Bracken", "Wimble",
    "Crumple", "Dapple", "Fennick", "Grumble", "Hobble", "Jollop", "Knobble", "Lumber", "Muddle",
    "Puddle", "Rumble", "Tweedle",
)
_SURNAME_TAILS = (
    "feather", "wick", "worth", "combe", "thwaite", "mere", "hatch", "garth", "holt", "brook",
    "ridge", "shaw", "croft", "wyck", "botham", "stow", "thorpe", "hythe", "leigh", "burrow",
)
_GIVEN_NAMES = (
    "Amadea", "Ottoline", "Isidora", "Peregrine", "Thaddeus", "Ermengarde", "Leopoldine",
    "Barnaby", "Wilhelmina", "Cosimo", "Aurelio", "Philippa", "Ignatius", "Rosalind", "Evander",
    "Clementine", "Lucasta", "Septimus", "Hortensia", "Benedikt", "Ysolde", "Casimir", "Olwenna",
    "Florizel", "Genoveva", "Alaric", "Perpetua", "Tiberius", "Honoria", "Ambrosius", "Marigold",
    "Evadne", "Leofric", "Araminta", "Cuthbert", "Seraphina", "Lysander", "Euphemia", "Orsino",
    "Zenobia",
)
_PHYSICIAN_SURNAMES = (
    "Drummondvale", "Vantongeren", "Ostrakova", "Pilkingfold", "Merriweald", "Skelbrooke",
    "Fairbrass", "Hollingrake", "Quarrendon", "Tolliver", "Winterbottle", "Abernethyne",
)
_PHYSICIAN_GIVEN = (
    "Osric", "Hesper", "Lavinia", "Magnus", "Theodora", "Crispin", "Rowena", "Balthazar",
    "Imogen", "Fitzwilliam", "Cressida",
)
_PLACES = (
    "Wyndmoor", "Ashcombe Vale", "Lower Brackenridge", "Gorsemouth", "Kettlewyck",
    "Ombersley Cross", "Fallowmere", "Nethercombe Magna",
)
_INSTITUTION_KINDS = ("Infirmary", "Cottage Hospital", "Imaging Centre", "Royal Clinic")
_STREETS = ("Gorsebrook Lane", "Tinderbox Row", "Quillhatch Street", "Marrowdene Close",
            "Pipistrelle Road", "Lanternfold Way")
_BODY_PARTS = {"CT": ("CHEST", "ABDOMEN", "HEAD"), "MR": ("BRAIN", "KNEE", "SPINE")}


def _uid(seed_key: str, *parts: object) -> str:
    # One entropy string with separators: generate_uid joins its sources without any.
    return generate_uid(entropy_srcs=["prefect-orthanc|" + seed_key + "|"
                                      + "|".join(str(p) for p in parts)])


def _da(day: date) -> str:
    return day.strftime("%Y%m%d")


def _tm(seconds: int) -> str:
    seconds %= 24 * 3600
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _name_parts(pn: str) -> list[str]:
    return [part for part in pn.split("^") if part]


# ------------------------------------------------------------------ model


class SyntheticSeries(NamedTuple):
    series_uid: str
    modality: str
    instance_count: int


@dataclass
class SyntheticStudy:
    patient_id: str
    patient_name: str
    birth_date: str
    accession: str
    study_uid: str
    study_date: str
    series: list[SyntheticSeries]
    files: list[Path]
    study_time: str = ""
    study_id: str = ""
    study_description: str = ""
    modality: str = ""
    requested_procedure_id: str = ""
    index: int = 0

    @property
    def instance_count(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:  # identifiers stay out of logs and test reports
        return (f"SyntheticStudy(index={self.index}, modality={self.modality!r}, "
                f"series={len(self.series)}, instances={len(self.files)})")


@dataclass
class SyntheticPatient:
    patient_id: str
    patient_name: str
    family_name: str
    given_name: str
    birth_date: str
    sex: str
    other_ids: tuple[str, ...]
    address: str
    phone: str
    institution_name: str
    institution_address: str
    referring_physician: str
    performing_physician: str
    operator: str
    studies: list[SyntheticStudy] = field(default_factory=list)

    def __repr__(self) -> str:  # identifiers stay out of logs and test reports
        return f"SyntheticPatient(studies={len(self.studies)})"

    def phi_values(self) -> set[str]:
        """Every identifying string planted for this patient."""
        values = {self.patient_name, self.patient_id, *self.other_ids, self.birth_date,
                  self.address, self.phone, self.institution_name, self.institution_address}
        for person in (self.patient_name, self.referring_physician, self.performing_physician,
                       self.operator):
            values.add(person)
            values.update(part for part in _name_parts(person) if len(part) >= 3)
        for study in self.studies:
            values.add(study.accession)
            values.add(study.requested_procedure_id)
        values.discard("")
        return values


@dataclass
class Cohort:
    out_dir: Path
    seed: int
    patients: list[SyntheticPatient]
    studies: list[SyntheticStudy]
    files: list[Path]

    @property
    def instance_count(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:  # identifiers stay out of logs and test reports
        return (f"Cohort(out_dir={str(self.out_dir)!r}, seed={self.seed}, "
                f"patients={len(self.patients)}, studies={len(self.studies)}, "
                f"instances={len(self.files)})")

    @property
    def series_count(self) -> int:
        return sum(len(study.series) for study in self.studies)

    def patient(self, patient_id: str) -> SyntheticPatient:
        for patient in self.patients:
            if patient.patient_id == patient_id:
                return patient
        raise KeyError("no such synthetic patient")

    def study(self, study_uid: str) -> SyntheticStudy:
        for study in self.studies:
            if study.study_uid == study_uid:
                return study
        raise KeyError("no such synthetic study")

    def phi_values(self, patient_id: str | None = None) -> set[str]:
        """Every planted identifying string of one patient (or of the whole cohort)."""
        if patient_id is not None:
            return self.patient(patient_id).phi_values()
        values: set[str] = set()
        for patient in self.patients:
            values |= patient.phi_values()
        return values


# ------------------------------------------------------------------ generation


def _make_patients(rng: random.Random, count: int) -> list[SyntheticPatient]:
    surnames = [h + t for h in _SURNAME_HEADS for t in _SURNAME_TAILS]
    rng.shuffle(surnames)
    given = list(_GIVEN_NAMES)
    rng.shuffle(given)
    physicians = [f"{s}^{g}" for s in _PHYSICIAN_SURNAMES for g in _PHYSICIAN_GIVEN]
    rng.shuffle(physicians)
    id_numbers = rng.sample(range(1_000_000, 10_000_000), count)
    other_numbers = rng.sample(range(10_000_000, 100_000_000), count)
    patients = []
    for p in range(count):
        # unique surnames up to 600 patients; beyond, the (surname, given) pair stays unique
        family = surnames[p % len(surnames)]
        first = given[(p + p // len(surnames)) % len(given)]
        middle = "ABCDEFGHJKLMNPRSTW"[rng.randrange(18)]
        place = rng.choice(_PLACES)
        birth = date(1930, 1, 1) + timedelta(days=rng.randrange(70 * 365))
        patients.append(SyntheticPatient(
            patient_id=f"PX{id_numbers[p]}",
            patient_name=f"{family}^{first}^{middle}",
            family_name=family,
            given_name=first,
            birth_date=_da(birth),
            sex=rng.choice("FM"),
            other_ids=(f"OPX{other_numbers[p]}", f"HX-{id_numbers[p] % 1_000_000:06d}{p % 10}"),
            address=f"{rng.randrange(1, 200)} {rng.choice(_STREETS)}, {place}",
            phone=f"+44 1632 96{rng.randrange(10_000):04d}",
            institution_name=f"{rng.choice(_PLACES)} {rng.choice(_INSTITUTION_KINDS)}",
            institution_address=f"{rng.randrange(1, 90)} {rng.choice(_STREETS)}, "
                                f"{rng.choice(_PLACES)}",
            referring_physician=physicians[(3 * p) % len(physicians)],
            performing_physician=physicians[(3 * p + 1) % len(physicians)],
            operator=physicians[(3 * p + 2) % len(physicians)],
        ))
    return patients


@lru_cache(maxsize=4096)
def _pixels(series_index: int, instance_index: int) -> bytes:
    values = array("H", ((x * 7 + y * 13 + instance_index * 31 + series_index * 17) % 4096
                         for y in range(ROWS) for x in range(COLUMNS)))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _series_dataset(patient: SyntheticPatient, study: SyntheticStudy, series_number: int,
                    series_uid: str, frame_uid: str, series_time: int) -> Dataset:
    """Every element shared by the instances of one series (instances then differ only in
    SOPInstanceUID, InstanceNumber, position, content time and pixels)."""
    modality = study.modality
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT"
                    else ["ORIGINAL", "PRIMARY", "M", "ND"])
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = _tm(series_time)
    ds.AcquisitionTime = _tm(series_time + 30)
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = "PREFECT ORTHANC SYNTHETIC"
    ds.InstitutionName = patient.institution_name
    ds.InstitutionAddress = patient.institution_address
    ds.ReferringPhysicianName = patient.referring_physician
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = (f"{modality} series {series_number} "
                            f"{patient.family_name} {patient.given_name}")
    ds.PerformingPhysicianName = patient.performing_physician
    ds.OperatorsName = patient.operator
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.OtherPatientIDs = list(patient.other_ids)
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    ds.SliceThickness = "1.0"
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.EchoTrainLength = "1"
        ds.MagneticFieldStrength = "1.5"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.PixelSpacing = [1, 1]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"

    # nested identifiers: level 1 (request attributes), level 2 (other patient IDs)
    deeper = Dataset()
    deeper.PatientID = patient.patient_id
    deeper.IssuerOfPatientID = patient.institution_name
    deeper.TypeOfPatientID = "TEXT"
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    referenced.ReferencedSOPInstanceUID = study.study_uid
    request = Dataset()
    request.RequestedProcedureID = study.requested_procedure_id
    request.AccessionNumber = study.accession
    request.RequestedProcedureDescription = (f"{study.study_description} "
                                             f"({patient.given_name})")  # LO: <= 64 chars
    request.ScheduledProcedureStepID = f"SPS{study.index + 1:05d}"
    request.ReferencedStudySequence = DicomSequence([referenced])
    request.OtherPatientIDsSequence = DicomSequence([deeper])
    ds.RequestAttributesSequence = DicomSequence([request])

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_PATIENT_ID, "LO", patient.patient_id)
    block.add_new(PRIVATE_PATIENT_NAME, "LO", patient.patient_name)

    return ds


#: the elements that differ between the instances of one series, in tag order
_PER_INSTANCE_TAGS = tuple(Tag(keyword) for keyword in (
    "SOPInstanceUID", "ContentTime", "InstanceNumber", "ImagePositionPatient", "SliceLocation",
    "PixelData",
))


def _encode(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


class _SeriesWriter:
    """Writes the Part-10 files of one series quickly: the elements shared by every instance
    are encoded once (by pydicom, in tag-ordered chunks around the per-instance elements);
    each file is then the preamble, its file meta, and the chunks interleaved with its own
    few elements. The bytes are what ``Dataset.save_as(enforce_file_format=True)`` writes
    for the whole dataset (checked by the tests)."""

    def __init__(self, shared: Dataset) -> None:
        if any(tag in shared for tag in _PER_INSTANCE_TAGS):
            raise ValueError("per-instance elements do not belong to the shared dataset")
        chunks = [Dataset() for _ in range(len(_PER_INSTANCE_TAGS) + 1)]
        for element in shared:  # iterates in tag order, private elements included
            chunks[bisect_left(_PER_INSTANCE_TAGS, element.tag)].add(element)
        self._chunks = [_encode(chunk) if len(chunk) else b"" for chunk in chunks]
        self._meta = FileMetaDataset()
        self._meta.FileMetaInformationVersion = b"\x00\x01"
        self._meta.MediaStorageSOPClassUID = shared.SOPClassUID
        self._meta.MediaStorageSOPInstanceUID = UID("")
        self._meta.TransferSyntaxUID = ExplicitVRLittleEndian
        self._meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        self._meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    def write(self, path: Path, sop_uid: str, *, instance_number: int, position: int,
              content_time: str, pixels: bytes) -> None:
        values = (
            DataElement(_PER_INSTANCE_TAGS[0], "UI", sop_uid),
            DataElement(_PER_INSTANCE_TAGS[1], "TM", content_time),
            DataElement(_PER_INSTANCE_TAGS[2], "IS", instance_number),
            DataElement(_PER_INSTANCE_TAGS[3], "DS", [0, 0, position]),
            DataElement(_PER_INSTANCE_TAGS[4], "DS", position),
            DataElement(_PER_INSTANCE_TAGS[5], "OW", pixels),
        )
        self._meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        self._meta.FileMetaInformationGroupLength = 0  # recomputed by pydicom
        head = DicomBytesIO()
        head.is_little_endian = True
        head.is_implicit_VR = False
        write_file_meta_info(head, self._meta, enforce_standard=True)
        parts = [b"\x00" * 128, b"DICM", head.getvalue()]
        for chunk, element in zip(self._chunks[:-1], values, strict=True):
            single = Dataset()
            single.add(element)
            parts += [chunk, _encode(single)]
        parts.append(self._chunks[-1])
        path.write_bytes(b"".join(parts))


def make_cohort(out_dir: str | os.PathLike[str], *, patients: int = 3,
                studies_per_patient: int = 2, series_per_study: int = 2,
                instances_per_series: int = 3, seed: int = 0,
                modalities: Sequence[str] = ("CT", "MR")) -> Cohort:
    """Write a synthetic cohort under ``out_dir`` and describe it.

    Studies of one patient are months apart (so date-interval tests are possible); study
    ``k`` of patient ``p`` has modality ``modalities[(p + k) % len(modalities)]``.
    """
    if patients < 1 or studies_per_patient < 1 or series_per_study < 1 \
            or instances_per_series < 1:
        raise ValueError("every cohort dimension must be at least 1")
    unknown = [m for m in modalities if m not in SOP_CLASSES]
    if not modalities or unknown:
        raise ValueError(f"modalities must be among {sorted(SOP_CLASSES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = (f"seed={seed}|p={patients}|st={studies_per_patient}|se={series_per_study}"
             f"|i={instances_per_series}|m={','.join(modalities)}")
    rng = random.Random(shape)
    people = _make_patients(rng, patients)
    accessions = rng.sample(range(10_000_000, 100_000_000), patients * studies_per_patient)
    procedures = rng.sample(range(100_000, 1_000_000), patients * studies_per_patient)

    studies: list[SyntheticStudy] = []
    files: list[Path] = []
    study_index = 0
    for p, patient in enumerate(people):
        day = date(2016, 1, 1) + timedelta(days=rng.randrange(5 * 365))
        for k in range(studies_per_patient):
            if k:
                day += timedelta(days=rng.randrange(60, 270))  # months apart
            modality = modalities[(p + k) % len(modalities)]
            body = rng.choice(_BODY_PARTS[modality])
            start = rng.randrange(7 * 3600, 18 * 3600)
            study = SyntheticStudy(
                patient_id=patient.patient_id,
                patient_name=patient.patient_name,
                birth_date=patient.birth_date,
                accession=f"ACC{accessions[study_index]}",
                study_uid=_uid(shape, "study", p, k),
                study_date=_da(day),
                series=[],
                files=[],
                study_time=_tm(start),
                study_id=f"{k + 1}",
                study_description=f"{modality} {body} for {patient.family_name} follow-up",
                modality=modality,
                requested_procedure_id=f"RQ{procedures[study_index]}",
                index=study_index,
            )
            folder = out / f"study{study_index + 1:04d}"
            folder.mkdir(exist_ok=True)
            for s in range(series_per_study):
                series_uid = _uid(shape, "series", p, k, s)
                series_time = start + 300 * (s + 1)
                writer = _SeriesWriter(_series_dataset(
                    patient, study, s + 1, series_uid, _uid(shape, "frame", p, k, s),
                    series_time))
                for i in range(instances_per_series):
                    path = folder / f"s{study_index + 1:04d}_{s + 1:02d}_{i + 1:04d}.dcm"
                    writer.write(path, _uid(shape, "instance", p, k, s, i),
                                 instance_number=i + 1, position=i,
                                 content_time=_tm(series_time + 60 + i), pixels=_pixels(s, i))
                    study.files.append(path)
                study.series.append(SyntheticSeries(series_uid, modality, instances_per_series))
            files.extend(study.files)
            studies.append(study)
            patient.studies.append(study)
            study_index += 1
    return Cohort(out_dir=out, seed=seed, patients=people, studies=studies, files=files)


# ------------------------------------------------------------------ upload


def zip_bytes(files: Iterable[str | os.PathLike[str]]) -> bytes:
    """An uncompressed ZIP of ``files`` (deterministic: fixed timestamps, unique names)."""
    buffer = io.BytesIO()
    seen: set[str] = set()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, file in enumerate(files):
            path = Path(file)
            name = path.name if path.name not in seen else f"{index:06d}_{path.name}"
            seen.add(name)
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


class UploadError(RuntimeError):
    """Orthanc refused an upload (the message holds the status, never file contents)."""


_STORED = ("Success", "AlreadyStored")


def _count_stored(payload: Any) -> int:
    answers = payload if isinstance(payload, list) else [payload]
    return sum(1 for answer in answers
               if isinstance(answer, dict) and answer.get("Status") in _STORED)


def load_into(url: str, files: Iterable[str | os.PathLike[str]], *,
              auth: Any = None, batch_size: int = 200, workers: int = 2,
              timeout: float = 120.0) -> int:
    """Upload ``files`` to the Orthanc at ``url`` (``POST /instances``) and return how many
    instances it holds afterwards from them (status ``Success`` or ``AlreadyStored``).

    Files go as ZIP bodies of ``batch_size`` files (Orthanc >= 1.8.2 unpacks them), on
    ``workers`` parallel connections; if the server refuses the first ZIP (older Orthanc)
    every file is posted on its own.
    """
    paths = [Path(f) for f in files]
    if not paths:
        return 0
    base = url.rstrip("/")
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    limits = httpx.Limits(max_connections=max(1, workers))
    with httpx.Client(auth=auth, timeout=timeout, limits=limits) as client:

        def post(body: bytes, content_type: str) -> httpx.Response:
            return client.post(base + "/instances", content=body,
                               headers={"Content-Type": content_type})

        def send_zip(batch: list[Path]) -> int:
            response = post(zip_bytes(batch), "application/zip")
            if response.status_code != 200:
                raise UploadError(f"POST /instances (ZIP of {len(batch)} files) answered "
                                  f"HTTP {response.status_code}")
            return _count_stored(response.json())

        def send_file(path: Path) -> int:
            response = post(path.read_bytes(), "application/dicom")
            if response.status_code != 200:
                raise UploadError(f"POST /instances ({path.name}) answered "
                                  f"HTTP {response.status_code}")
            return _count_stored(response.json())

        first = post(zip_bytes(batches[0]), "application/zip")
        if first.status_code == 200 and isinstance(first.json(), list):
            stored = _count_stored(first.json())
            rest = batches[1:]
            if rest:
                with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                    stored += sum(pool.map(send_zip, rest))
            return stored
        if first.status_code not in (200, 400, 415):
            raise UploadError(f"POST /instances answered HTTP {first.status_code}")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return sum(pool.map(send_file, paths))
