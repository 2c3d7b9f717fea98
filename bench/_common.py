"""What every benchmark shares: a private Prefect home with no telemetry, peak memory, the
lab loaded with a collection bench's studies, and its cohort file."""

from __future__ import annotations

import contextlib
import csv
import os
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def quiet_prefect() -> None:
    """A throwaway PREFECT_HOME (unless one is set), no telemetry, warnings only."""
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; unlike ru_maxrss on Linux it is
    not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_accession_cohort(path: Path, accessions: list[str]) -> Path:
    """A cohort CSV of one ``accession_number`` column, one row per accession; returns it."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number"])
        writer.writerows([[a] for a in accessions])
    return path


@contextlib.contextmanager
def loaded_lab(studies: int, instances: int, seed: int
               ) -> Iterator[tuple[Any, Any, tuple[str, str], Path]]:
    """The lab (``OrthancLab``) whose PACS holds ``studies`` synthetic studies, one patient
    each, of ``instances`` instances in 2 series; yields ``(lab, cohort, research's
    (username, password), a scratch folder)``, all gone at the end."""
    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort

    with OrthancLab.start() as lab, tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(Path(tmp) / "dicom", patients=studies, studies_per_patient=1,
                             series_per_study=2, instances_per_series=max(1, instances // 2),
                             seed=seed)
        load_into(lab.pacs.url, cohort.files)
        auth = lab.research.auth
        assert auth is not None  # the lab's research server asks for a password
        yield lab, cohort, auth, Path(tmp)
