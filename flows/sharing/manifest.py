"""``manifest.json`` in a directory destination: one entry per study (its newest package and
the packages it supersedes), written atomically."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.sharing.files import fsync_dir
from prefect_orthanc.flows.sharing.models import SharedStudy

__all__ = ["update_manifest"]


def update_manifest(directory: Path, profile: DeidProfile, study: SharedStudy) -> Path:
    """Put ``study``'s entry in ``manifest.json`` (one entry per study, keyed by its
    pseudonymous StudyID: the newest package, and the packages it supersedes), atomically
    (temporary file, fsync, rename). Call under the ledger's lock: a temporary manifest
    found then is a crashed writer's, and removed. Idempotent: writing the same study's
    entry again changes nothing."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"studies": []}
    manifest.update({"profile": profile.name, "profile_version": profile.version,
                     "deidentification_method": list(profile.method_values()),
                     "method_codes": [c.value for c in profile.method_codes()]})
    entry: dict[str, Any] = {"study": study.pseudo_study, "patient": study.pseudo_patient,
             "pseudonym_from": study.pseudonym_from, "file": Path(study.file).name,
             "version": study.version, "supersedes": list(study.supersedes),
             "instances": study.instances_out, "bytes": study.size, "sha256": study.sha256}
    manifest["studies"] = [e for e in manifest["studies"]
                           if e.get("study") != study.pseudo_study
                           and e.get("file") not in (entry["file"], *entry["supersedes"])]
    manifest["studies"].append(entry)
    for stale in directory.glob(".manifest.json.*.partial"):  # a crashed writer's
        stale.unlink(missing_ok=True)
    partial = directory / f".manifest.json.{uuid.uuid4().hex}.partial"
    with partial.open("x") as handle:
        handle.write(json.dumps(manifest, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    fsync_dir(directory)
    return path
