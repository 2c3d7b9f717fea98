"""Benchmark: selecting a project's studies on Orthanc 1.10.1 (no labels, no metadata search).

Starts a throwaway lab, stores ``--studies`` one-instance studies (pydicom's ``CT_small.dcm``
with fresh UIDs), adds every ``--every``-th to a project with ``tasks.labels``, then selects
the project two ways and reports time and HTTP requests:

* ``per-study``  list every study, then one metadata GET per study (the N+1 it replaces)
* ``bulk``       ``tasks.labels.project_studies``: list, then ``/tools/bulk-content`` pages

    .venv/bin/python bench/project_selection.py --studies 2000 --every 10
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _zip(count: int) -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    source = pydicom.dcmread(path)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            source.PatientID = f"BENCH{i:06d}"
            source.StudyInstanceUID = generate_uid()
            source.SeriesInstanceUID = generate_uid()
            source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            one = io.BytesIO()
            source.save_as(one)
            archive.writestr(f"{i}.dcm", one.getvalue())
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()

    import httpx

    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.orthanc_client import Level, Orthanc
    from prefect_orthanc.tasks.labels import LABELS_METADATA, attach_labels, project_studies

    requests = {"n": 0}

    def count(request: httpx.Request) -> None:
        requests["n"] += 1

    with OrthancLab.start(tempfile.mkdtemp(prefix="bench-projects-")) as lab, \
             Orthanc(url=lab.research.url, username=lab.research.username,
                     password=lab.research.password, timeout=120) as orthanc:
        started = time.perf_counter()
        orthanc.upload(_zip(args.studies))
        ids = orthanc.find(Level.STUDY, {})
        print(f"stored {len(ids)} studies in {time.perf_counter() - started:.1f} s")
        members = set(ids[::args.every])
        for study_id in members:
            attach_labels(orthanc, Level.STUDY, study_id, ["bench"])
        orthanc._http.event_hooks["request"].append(count)
        for name in ("per-study", "bulk"):
            requests["n"] = 0
            started = time.perf_counter()
            if name == "per-study":
                found = [i for i in orthanc.find(Level.STUDY, {})
                         if "bench" in (orthanc.metadata(Level.STUDY, i, LABELS_METADATA)
                                        or "").split(",")]
            else:
                found = project_studies(orthanc, "bench")
            elapsed = time.perf_counter() - started
            assert set(found) == members, name
            print(f"{name:10s} {len(found)} of {len(ids)} studies: {elapsed:.2f} s, "
                  f"{requests['n']} requests")


if __name__ == "__main__":
    main()
