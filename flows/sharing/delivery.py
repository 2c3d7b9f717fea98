"""One verified study delivered exactly once, as a new package version, and recorded
(``deliver_study``); atomic, never-overwriting directory writes (``publish``); the
destination asked before a C-STORE (``on_modality``)."""

from __future__ import annotations

import datetime as dt
import fcntl
import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect_orthanc.flows.sharing.files import exclusive, fsync_dir, remove_unlocked, sha256_of
from prefect_orthanc.flows.sharing.ledger import Ledger
from prefect_orthanc.flows.sharing.linkage import append_linkage, pending_linkage
from prefect_orthanc.flows.sharing.manifest import update_manifest
from prefect_orthanc.flows.sharing.models import DeliveryError, SharedStudy, SharingOptions
from prefect_orthanc.flows.sharing.staging import remove_staged
from prefect_orthanc.orthanc_client import Level, Orthanc
from prefect_orthanc.tasks import OrthancCredentials, modality_slot, orthanc_task
from prefect_orthanc.tasks.policy import short_id

__all__ = ["deliver_study", "on_modality", "publish", "send_to_modality"]


@orthanc_task(name="deliver_study",
              run_name=lambda p: f"deliver-{short_id(p['study'].source_id)}")
def deliver_study(credentials: OrthancCredentials, study: SharedStudy,
                  options: SharingOptions) -> SharedStudy:
    """Deliver a verified study exactly once, as a new package version, and record it.

    Refuses anything not ``verified``. If the ledger already holds this study's content
    version for this destination and profile, delivers nothing (``delivered_before``).
    Otherwise, with ``v`` = earlier deliveries of the study + 1, the destination itself is
    asked first whether a run that crashed before its record already delivered it:

    - a directory: ``<package>-<patient>-<study>-v<v>.zip`` already there with the package's
      SHA-256 (packages are byte-deterministic) counts as delivered; other bytes under that
      name are a ``DeliveryError`` (nothing is ever overwritten); else it is written under a
      hidden temporary name, fsynced, linked to its final name, the directory fsynced
      (``publish``). A crashed writer's temporary file of that name is removed;
    - a DICOM modality: C-FIND at STUDY level by the copy's (pseudonymous, keyed)
      StudyInstanceUID; sent (C-STORE through Orthanc) unless the modality already reports
      the study with all of its instances (``on_modality``);
    - an Orthanc peer: sent (an instance sent again has the same UIDs, so the peer stores
      the same instance again, never a second one).

    Then, under a file lock: the manifest entry (directory), the linkage row (unless the
    table already has it) and the ledger entry, each fsynced, in that order, so a crash
    between any two steps is finished by the next run. Then the staging files and the
    anonymized copy (unless ``options.keep_anonymized``) are removed. Run it under
    ``tasks.study_lock(study.source_id)`` when other runs may share the same study.

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        study: A ``verified`` study, as ``deidentify_study`` returns it.
        options: The sharing options: ``destination``, ``profile``, ``package``, ``ledger_path``,
            ``linkage_path`` and ``keep_anonymized`` are read.

    Returns:
        The study with ``outcome`` ``delivered`` (``version``, ``file``, ``supersedes`` and
        ``delivered`` set) or ``delivered_before``.

    Raises:
        DeliveryError: The study is not ``verified``, or the destination already holds other bytes
            under the package's name (nothing is overwritten).
        ModalityLimitMissing: A modality destination has no concurrency limit.
        SlotWaitExceeded: No slot of the modality destination's limit became free in time.
        OrthancError: The research Orthanc or the destination did not answer or refused (a failed
            C-STORE or peer-store job is an ``OrthancJobFailed``).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

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
                final = publish(staged, Path(destination.target) / name, study.sha256)
                update["file"] = str(final)
            elif destination.kind == "peer":
                orthanc.wait_for_job(str(orthanc.store_peer(destination.target,
                                                            [study.anonymized_id])))
            else:
                with modality_slot(destination.target):
                    if not on_modality(orthanc, destination.target, study):
                        send_to_modality(orthanc, destination.target, study)
        outcome = study.model_copy(update=update)
        with exclusive(ledger.lock):  # right after the delivery, before anything else
            if destination.kind == "directory":
                update_manifest(Path(destination.target), profile, outcome)
            if pending.exists():
                append_linkage(Path(options.linkage_path), {
                    **json.loads(pending.read_text()),
                    "package": name, "delivered_to": destination.key,
                    "delivered_at": dt.datetime.now(dt.UTC).isoformat()})
            ledger.record(key, outcome, staged=staged.name)
    remove_staged(staged)
    if not options.keep_anonymized:
        with credentials.get_client() as orthanc:
            orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)
    return outcome


def on_modality(orthanc: Orthanc, modality: str, study: SharedStudy) -> bool:
    """Whether ``modality`` already holds the study's anonymized copy whole. A STUDY-level
    C-FIND (``/modalities/{modality}/query``) by the copy's (pseudonymous) StudyInstanceUID;
    when the modality knows it, how many instances it holds, by
    ``Orthanc.expected_instances`` (NumberOfStudyRelatedInstances, else series-level counts,
    else an IMAGE-level C-FIND per series: dcmqrscp and many PACS drop the count keys). True
    only when it holds at least as many instances as the copy; a study it holds in part is
    sent whole (the instances it has are the same instances: same UIDs)."""
    copy = orthanc.resource(Level.STUDY, str(study.anonymized_id))
    uid = copy.main_dicom_tags.get("StudyInstanceUID", "")
    if not uid or study.instances_out <= 0:
        return False
    found = orthanc.query(modality, Level.STUDY, {"StudyInstanceUID": uid,
                                                  "NumberOfStudyRelatedInstances": ""})
    try:
        answers = [a.tags for a in found.answers if a.get("StudyInstanceUID") == uid]
    finally:
        orthanc.delete_query(found.query_id)
    if not answers:
        return False
    expected = orthanc.expected_instances(modality, uid, answers)
    return expected is not None and expected.total >= study.instances_out


def send_to_modality(orthanc: Orthanc, modality: str, study: SharedStudy) -> None:
    """C-STORE the study's anonymized copy to ``modality`` through Orthanc, and wait for the
    job (call under the modality's slot)."""
    orthanc.wait_for_job(str(orthanc.store(modality, [str(study.anonymized_id)])))


def publish(staged: Path, final: Path, sha256: str | None = None) -> Path:
    """Copy ``staged`` to ``final`` atomically and without overwriting: a hidden temporary
    name in the same directory, fsync, then ``link`` (fails if ``final`` exists), fsync of
    the directory. A crash leaves at most a hidden ``.partial`` file, never half a package;
    the next publish of ``final`` removes it. When ``final`` is already there with the
    checksum ``sha256`` (a run that crashed before recording it), it is the delivery: nothing
    is written. Other bytes under that name: ``DeliveryError``, nothing overwritten."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        remove_unlocked(stale)  # a crashed writer's: a live writer holds a lock on its own
    if final.exists():
        if sha256 and sha256_of(final) == sha256:
            fsync_dir(final.parent)
            return final
        raise DeliveryError("a package of this study with this version is already in the "
                            "destination directory with other content (its ledger was reset "
                            "or another ledger delivers there): nothing overwritten; check "
                            "ledger_path")
    partial = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
    try:
        with staged.open("rb") as source, partial.open("xb") as target:
            fcntl.flock(target, fcntl.LOCK_EX)  # released by close, or by a crash
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
