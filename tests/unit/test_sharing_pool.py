"""The package scan in a worker process gives what it gives in the calling thread, and a
broken pool falls back to the thread."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from pydicom import dcmread

from prefect_orthanc.deployments.lab.synthetic import make_cohort
from prefect_orthanc.flows.deid import scan_package
from prefect_orthanc.flows.sharing import pool


def _package(tmp_path, files) -> str:
    path = tmp_path / "package.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index, file in enumerate(files):
            archive.write(file, f"SERIES001/IM{index:05d}.dcm")
    return str(path)


def test_the_scan_in_the_pool_is_the_scan_in_the_thread(tmp_path):
    cohort = make_cohort(tmp_path / "src", patients=1, studies_per_patient=1,
                         series_per_study=1, instances_per_series=2)
    headers = []
    for file in cohort.files:  # the sources cut before their pixel data, as the flow does
        data = Path(file).read_bytes()
        stream = io.BytesIO(data)
        dcmread(stream, stop_before_pixels=True, force=True)
        headers.append(data[:stream.tell()])
    leaky = _package(tmp_path, cohort.files)  # the sources themselves: every identifier
    in_pool = pool.run_in_pool(scan_package, leaky, headers)
    assert pool.start_pool() is not None  # it did run in a worker process
    assert in_pool == scan_package(leaky, headers)
    assert not in_pool.clean and in_pool.instances == 2
    assert {"PatientName", "PatientID"} <= {f.kind for f in in_pool.findings}


def test_a_broken_pool_falls_back_to_the_thread(tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    class Broken:
        def submit(self, *args, **kwargs):
            raise BrokenProcessPool("a worker died")

    monkeypatch.setattr(pool, "_pool", Broken())
    assert pool.run_in_pool(sum, [1, 2, 3]) == 6
    assert pool._pool is None  # dropped: the next call starts a new one
