"""CT-sized studies for the benchmarks: a real CT header, synthetic pixels at full size.

Each instance is pydicom's ``CT_small.dcm`` (a real scanner's header from the pydicom wheel's
test files: private tags, sequences, dates, a patient identity) with its own UIDs, patient,
instance number and slice position, and 512x512 16-bit pixels instead of 128x128: a body
phantom (air outside, noisy tissue inside) shifted from slice to slice, so an image compresses
about as a CT slice does, not as zeros or as pure noise. Only the pixels are made up; the
header is real, so the de-identification works on what a scanner writes.

    from bench.ct_studies import ct_study_files
    for data in ct_study_files(study=0, instances=100):
        orthanc.upload(data)
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

__all__ = ["ct_study_files", "phantoms"]

SIDE = 512
#: distinct phantom images; slice i is phantom i % PHANTOMS rolled by i rows
PHANTOMS = 8


@lru_cache(maxsize=1)
def phantoms(side: int = SIDE) -> tuple[bytes, ...]:
    """``PHANTOMS`` images of ``side``² signed 16-bit pixels (little endian): an ellipse of
    tissue (about 40 HU, noise ±60) in air (-1000), a denser disc (bone) that moves."""
    rng = random.Random(15)
    images = []
    for number in range(PHANTOMS):
        pixels = bytearray(side * side * 2)
        cx, cy = side / 2, side / 2
        ax, ay = side * 0.42, side * 0.33
        bx, by, br = cx + side * 0.1 * math.cos(number), cy + side * 0.05, side * 0.06
        air = (-1000).to_bytes(2, "little", signed=True)
        for y in range(side):
            row = bytearray(air * side)
            dy = (y - cy) / ay
            if abs(dy) < 1:
                half = int(ax * math.sqrt(1 - dy * dy))
                for x in range(int(cx) - half, int(cx) + half):
                    value = 40 + rng.randint(-60, 60)
                    if (x - bx) ** 2 + (y - by) ** 2 < br * br:
                        value += 900
                    row[2 * x:2 * x + 2] = value.to_bytes(2, "little", signed=True)
            pixels[y * side * 2:(y + 1) * side * 2] = row
        images.append(bytes(pixels))
    return tuple(images)


def ct_study_files(study: int, instances: int = 100, *, series: int = 2,
                   patients: int | None = None, side: int = SIDE) -> Iterator[bytes]:
    """The DICOM files (bytes) of study number ``study``: ``instances`` CT slices of
    ``side``² pixels in ``series`` series, from CT_small.dcm's header. Patient number
    ``study // 2`` (two studies per patient) unless ``patients`` says how many there are.
    Deterministic: the same arguments give the same files."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    original = dcmread(io.BytesIO(template))
    patient = study // 2 if patients is None else study % patients
    images = phantoms(side)
    study_uid = generate_uid(entropy_srcs=["bench-ct", str(study)])
    for index in range(instances):
        ds = dcmread(io.BytesIO(template))
        series_number = index * series // instances
        ds.PatientID = f"{original.PatientID}{patient:04d}"
        ds.PatientName = f"{original.PatientName}{patient:04d}"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["bench-ct", str(study),
                                                          str(series_number)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench-ct", str(study), str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"BCT{study:06d}"
        ds.SeriesNumber = series_number + 1
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [-158.1, -179.0, -6.0 - 1.25 * index]
        ds.Rows = ds.Columns = side
        image = images[index % len(images)]
        shift = (index * 2 * side * 2) % len(image)
        ds.PixelData = image[shift:] + image[:shift]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        yield buffer.getvalue()
