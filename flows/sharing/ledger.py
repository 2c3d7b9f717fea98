"""The delivery ledger: which source study went where, with which content version, as which
package version. Kept with the data owner (it holds source Orthanc IDs)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.sharing.files import append_durably
from prefect_orthanc.flows.sharing.models import Destination, SharedStudy

__all__ = ["Ledger", "content_version"]


def content_version(instance_ids: Sequence[str]) -> str:
    """A study's content version: its instance count and a hash of its sorted Orthanc
    instance IDs (themselves hashes of the SOPInstanceUIDs and their parents), e.g.
    ``"12-3f2a…"``. Changes when an instance arrives or goes; stays when nothing does."""
    digest = hashlib.sha256("\n".join(sorted(instance_ids)).encode()).hexdigest()[:16]
    return f"{len(instance_ids)}-{digest}"


class Ledger:
    """Append-only JSON lines, one per delivery: which source study (``study``: source study,
    destination and profile), which content version, which package version and file. Kept
    with the data owner (it holds source Orthanc IDs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = path.with_name(path.name + ".lock")

    @staticmethod
    def study(source_id: str, destination: Destination, profile: DeidProfile) -> str:
        raw = f"{source_id}|{destination.key}|{profile.name}|{profile.version}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def history(self, study: str) -> list[dict[str, Any]]:
        """Earlier deliveries of ``study``, oldest first."""
        if not self.path.exists():
            return []
        return [e for e in self.entries() if e.get("study") == study]

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first. A line torn by a crash mid-append (only ever the last,
        never complete, so never acted on) is skipped."""
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def delivered(self, study: str, version: str) -> bool:
        return self.delivery(study, version) is not None

    def delivery(self, study: str, version: str) -> dict[str, Any] | None:
        """The entry of ``study``'s delivery of content ``version``, if recorded."""
        return next((e for e in self.history(study) if e.get("content_version") == version),
                    None)

    def record(self, study: str, shared: SharedStudy, staged: str = "") -> None:
        """Append one delivery and fsync (call under ``exclusive(self.lock)``). ``staged``
        (the package's name in staging) and the anonymized copy's ID let a later run remove
        what a crash left of them after this record."""
        append_durably(self.path, json.dumps({
            "study": study, "content_version": shared.content_version,
            "version": shared.version, "source_id": shared.source_id,
            "file": Path(shared.file).name, "sha256": shared.sha256,
            "destination": shared.delivered, "staged": staged,
            "anonymized_id": shared.anonymized_id,
            "at": dt.datetime.now(dt.UTC).isoformat()}) + "\n")
