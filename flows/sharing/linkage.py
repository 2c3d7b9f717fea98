"""The linkage table (source identifiers <-> pseudonyms): a row waits next to its ZIP in
staging until the study is delivered, then is appended. Never given to Prefect."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from prefect_orthanc.flows.sharing.files import append_durably

__all__ = ["append_linkage", "pending_linkage"]


def pending_linkage(zip_path: Path) -> Path:
    """Where a verified study's linkage row waits for its delivery (next to its ZIP, in
    staging: owner-side, never shared)."""
    return zip_path.with_name(zip_path.name + ".linkage.json")


def append_linkage(path: Path, row: dict[str, object]) -> bool:
    """One row of the linkage table, appended and fsynced (call under the ledger's lock),
    unless the table already has the row of this package at this destination (a run that
    crashed after writing it and before recording the delivery): returns whether it was
    appended. A table started by an earlier release keeps its header: the row is written in
    its columns (new columns left out, missing ones empty), never misaligned. A row torn by a
    crash mid-write is cut off first (``append_durably``)."""
    buffer = io.StringIO()
    header: list[str] | None = None
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if header and {"package", "delivered_to"} <= set(header):
                at = header.index("package"), header.index("delivered_to")
                wanted = str(row.get("package")), str(row.get("delivered_to"))
                if any(len(r) == len(header) and (r[at[0]], r[at[1]]) == wanted
                       for r in rows):
                    return False
    writer = csv.DictWriter(buffer, fieldnames=header or list(row), restval="",
                            extrasaction="ignore")
    if not header:
        writer.writeheader()
    writer.writerow(row)
    append_durably(path, buffer.getvalue(), mode=0o600)
    return True
