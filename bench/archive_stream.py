"""Benchmark: streaming a study's ZIP archive to disk, client vs raw httpx, memory and speed.

Starts a throwaway Orthanc lab, stores one study of ``--instances`` images of
``--pixels``² 16-bit pixels, then downloads its archive with each method, every run in a
fresh subprocess so peak RSS belongs to that method alone:

* ``client``       orthanc_client ``Orthanc.download_resource_archive`` (streamed, hashed, atomic)
* ``client-async`` the same through ``AsyncOrthanc``
* ``raw-stream``   a plain ``httpx.stream`` GET writing chunks to a file (the baseline)
* ``raw-read``     a plain ``httpx.get`` reading the whole body into memory (for contrast)

    .venv/bin/python bench/archive_stream.py --instances 300 --pixels 512 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import peak_rss_mb

METHODS = ("client", "client-async", "raw-stream", "raw-read")


def child(method: str, url: str, study_id: str, dest: Path) -> dict[str, float]:
    import httpx

    from prefect_orthanc.orthanc_client import AsyncOrthanc, Orthanc

    before = peak_rss_mb()
    started = time.perf_counter()
    if method == "client":
        with Orthanc(url=url) as orthanc:
            size = orthanc.download_resource_archive("Study", study_id, dest).size
    elif method == "client-async":
        async def run() -> int:
            async with AsyncOrthanc(url=url) as orthanc:
                return (await orthanc.download_resource_archive("Study", study_id, dest)).size
        size = asyncio.run(run())
    elif method == "raw-stream":
        with httpx.Client(base_url=url, timeout=600) as http, \
                http.stream("GET", f"/studies/{study_id}/archive") as response, \
                open(dest, "wb") as out:
            response.raise_for_status()
            for chunk in response.iter_raw(1 << 20):
                out.write(chunk)
        size = dest.stat().st_size
    elif method == "raw-read":
        response = httpx.get(f"{url}/studies/{study_id}/archive", timeout=600)
        response.raise_for_status()
        dest.write_bytes(response.content)
        size = len(response.content)
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": size, "rss_before_mb": before,
            "rss_peak_mb": peak_rss_mb()}


def make_study(instances: int, pixels: int) -> bytes:
    """A ZIP of one synthetic study (no patient data: fixed dummy values)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study_uid, series_uid = generate_uid(), generate_uid()
    rng = random.Random(0)  # noise: like real images, the ZIP cannot shrink it to nothing
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index in range(instances):
            ds = pydicom.Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "BENCH^ARCHIVE", "CT"
            ds.InstanceNumber = index + 1
            ds.Rows = ds.Columns = pixels
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.PixelData = rng.randbytes(pixels * pixels * 2)
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
            archive.writestr(f"{index:05d}.dcm", out.getvalue())
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--pixels", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--url")
    parser.add_argument("--study")
    parser.add_argument("--dest", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.url, args.study, args.dest)))
        return 0

    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.orthanc_client import Orthanc

    with OrthancLab.start() as lab, tempfile.TemporaryDirectory() as tmp:
        with Orthanc(url=lab.pacs.url) as pacs:
            stored = pacs.upload(make_study(args.instances, args.pixels))
            study_id = stored[0].parent_study
            assert study_id is not None
            stats = pacs.statistics_of("Study", study_id)
        print(f"study: {stats.count_instances} instances, "
              f"{stats.disk_size / 1e6:.1f} MB on disk")
        results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
        for _ in range(args.repeat):
            for method in METHODS:  # interleaved, so drift hits every method alike
                dest = Path(tmp) / f"{method}.zip"
                out = subprocess.run(
                    [sys.executable, __file__, "--child", method, "--url", lab.pacs.url,
                     "--study", study_id, "--dest", str(dest)],
                    check=True, capture_output=True, text=True, cwd=ROOT)
                results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
                dest.unlink(missing_ok=True)
        print("\n| method | archive MB | median s | MB/s | peak RSS MB | RSS growth MB |")
        print("|---|---|---|---|---|---|")
        summary = {}
        for method, runs in results.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            size = runs[0]["bytes"] / 1e6
            peak = max(r["rss_peak_mb"] for r in runs)
            growth = max(r["rss_peak_mb"] - r["rss_before_mb"] for r in runs)
            summary[method] = {"mb": size, "seconds": seconds, "mb_per_s": size / seconds,
                               "peak_rss_mb": peak, "rss_growth_mb": growth}
            print(f"| {method} | {size:.1f} | {seconds:.2f} | {size / seconds:.0f} | "
                  f"{peak:.0f} | {growth:.0f} |")
        out_dir = ROOT / "bench" / "results"
        out_dir.mkdir(exist_ok=True)
        (out_dir / "archive_stream.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
