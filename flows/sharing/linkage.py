"""The linkage table (source identifiers <-> pseudonyms): a row waits next to its ZIP in
staging until the study is delivered, then is appended. Never given to Prefect."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .files import append_durably

__all__ = ["pending_linkage", "append_linkage"]


def pending_linkage(zip_path: Path) -> Path:
    """Where a verified study's linkage row waits for its delivery (next to its ZIP, in
    staging: owner-side, never shared)."""
    return zip_path.with_name(zip_path.name + ".linkage.json")


def append_linkage(path: Path, row: dict[str, object]) -> None:
    """One row of the linkage table, appended and fsynced (call under the ledger's lock).
    A table started by an earlier release keeps its header: the row is written in its
    columns (new columns left out, missing ones empty), never misaligned."""
    buffer = io.StringIO()
    header: list[str] | None = None
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), None)
    writer = csv.DictWriter(buffer, fieldnames=header or list(row), restval="",
                            extrasaction="ignore")
    if not header:
        writer.writeheader()
    writer.writerow(row)
    append_durably(path, buffer.getvalue(), mode=0o600)
