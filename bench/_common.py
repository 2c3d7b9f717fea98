"""What every benchmark shares: a private Prefect home with no telemetry, peak memory, and
the cohort file of a collection bench."""

from __future__ import annotations

import csv
import os
import resource
import tempfile
from pathlib import Path


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
