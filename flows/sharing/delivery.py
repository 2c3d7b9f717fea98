"""One verified study delivered once, as a new package version, and recorded
(``deliver_study``); atomic, never-overwriting directory writes (``publish``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from orthanc_client import Level
from tasks import OrthancCredentials, modality_slot, orthanc_task
from tasks.policy import short_id

from .files import exclusive, fsync_dir
from .ledger import Ledger
from .linkage import append_linkage, pending_linkage
from .manifest import update_manifest
from .models import DeliveryError, SharedStudy, SharingOptions

__all__ = ["deliver_study", "publish"]


@orthanc_task(name="deliver_study",
              run_name=lambda p: f"deliver-{short_id(p['study'].source_id)}")
def deliver_study(credentials: OrthancCredentials, study: SharedStudy,
                  options: SharingOptions) -> SharedStudy:
    """Deliver a verified study once, as a new package version, and record it.

    Refuses anything not ``verified``. If the ledger already holds this study's content
    version for this destination and profile, delivers nothing (``delivered_before``).
    Otherwise, with ``v`` = earlier deliveries of the study + 1: a directory gets
    ``<package>-<patient>-<study>-v<v>.zip`` written under a hidden temporary name, fsynced,
    then linked to its final name (``DeliveryError`` if that name is taken: nothing is ever
    overwritten) and the manifest's entry for the study is updated; a peer or modality gets
    the anonymized copy (C-STORE through Orthanc). Right after, under a file lock, the linkage
    row is appended and the delivery recorded in the ledger (both fsynced). Then the
    anonymized copy is removed from Orthanc unless ``options.keep_anonymized``. Run it under
    ``tasks.study_lock(study.source_id)`` when other runs may share the same study.

    Example:
        ```python
        delivered = deliver_study(creds, shared, request)  # request: a SharingOptions
        assert delivered.outcome in ("delivered", "delivered_before")
        ```
    """
    if study.outcome != "verified" or study.anonymized_id is None:
        raise DeliveryError(f"only verified studies are delivered (this one is "
                            f"{study.outcome})")
    destination, profile = options.destination, options.profile
    ledger = Ledger(Path(options.ledger_path))
    key = Ledger.study(study.source_id, destination, profile)
    staged, pending = Path(study.file), pending_linkage(Path(study.file))
    history = ledger.history(key)
    if any(e.get("content_version") == study.content_version for e in history):
        outcome = study.model_copy(update={"outcome": "delivered_before"})
    else:
        version = len(history) + 1
        name = f"{options.package}-{study.pseudo_patient}-{study.pseudo_study}-v{version}.zip"
        update: dict[str, Any] = {"outcome": "delivered", "delivered": destination.key,
                                  "version": version, "file": name,
                                  "supersedes": tuple(e["file"] for e in history)}
        with credentials.get_client() as orthanc:
            if destination.kind == "directory":
                final = publish(staged, Path(destination.target) / name)
                update["file"] = str(final)
            elif destination.kind == "peer":
                orthanc.wait_for_job(str(orthanc.store_peer(destination.target,
                                                            [study.anonymized_id])))
            else:
                with modality_slot(destination.target):
                    orthanc.wait_for_job(str(orthanc.store(destination.target,
                                                           [study.anonymized_id])))
        outcome = study.model_copy(update=update)
        with exclusive(ledger.lock):  # right after the delivery, before anything else
            if pending.exists():
                append_linkage(Path(options.linkage_path), {
                    **json.loads(pending.read_text()),
                    "package": name, "delivered_to": destination.key,
                    "delivered_at": dt.datetime.now(dt.UTC).isoformat()})
            ledger.record(key, outcome)
            if destination.kind == "directory":
                update_manifest(Path(destination.target), profile, outcome)
    pending.unlink(missing_ok=True)
    staged.unlink(missing_ok=True)
    if not options.keep_anonymized:
        with credentials.get_client() as orthanc:
            orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)
    return outcome


def publish(staged: Path, final: Path) -> Path:
    """Copy ``staged`` to ``final`` atomically and without overwriting: a hidden temporary
    name in the same directory, fsync, then ``link`` (fails if ``final`` exists), fsync of
    the directory. A crash leaves at most a hidden ``.partial`` file, never half a package."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise DeliveryError("a package of this study with this version is already in the "
                            "destination directory (its ledger was reset or another ledger "
                            "delivers there): nothing overwritten; check ledger_path")
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
    try:
        with staged.open("rb") as source, partial.open("xb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
            target.flush()
            os.fsync(target.fileno())
        try:
            os.link(partial, final)
        except FileExistsError:
            raise DeliveryError("a package of this study with this version appeared in the "
                                "destination directory meanwhile: nothing overwritten; "
                                "check for another run or ledger delivering there") from None
    finally:
        partial.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return final
