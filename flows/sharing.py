"""De-identified sharing: pseudonymize → verify no PHI → package → deliver, once per study.

For each selected study in the research Orthanc: Orthanc anonymizes it with the profile's
request (keyed pseudonyms, shifted dates), excluded object types are removed from the copy,
the copy is streamed to a ZIP in a staging folder and **every string of every instance, and
every file name, is scanned** for the source's identifiers. Only a clean study is delivered (a
directory, an Orthanc peer or a DICOM modality); a study with any finding is quarantined and
the run ends Failed. A ledger keyed by source study and destination makes re-runs deliver
nothing twice. The linkage table (source ↔ pseudonym) goes to a file the user chooses, never to
Prefect. The project secret comes from a Prefect Secret block or ``PREFECT_ORTHANC_DEID_SECRET``.

Example:
    ```python
    from flows.sharing import share_studies, SharingRequest, Destination

    share_studies(SharingRequest(project="lung-2026",
                                 destination=Destination(kind="directory", target="/exports"),
                                 linkage_path="/secure/linkage.csv"))
    ```
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orthanc_client import Level
from tasks import OrthancCredentials, modality_slot, orthanc_task
from tasks.labels import project_studies
from tasks.policy import short_id

from .collection import load_credentials
from .deid import DeidProfile, build_request, client_kwargs, identifiers_from, scan_zip

__all__ = ["Destination", "SharingOptions", "SharingRequest", "SharedStudy", "share_studies", "deidentify_study",
           "deliver_study", "SECRET_ENV"]

SECRET_ENV = "PREFECT_ORTHANC_DEID_SECRET"
_FILE_LOCK = threading.Lock()


class Destination(BaseModel):
    """Where verified studies go."""

    kind: Literal["directory", "peer", "modality"] = Field(
        "directory", description="A local directory (ZIP + manifest), an Orthanc peer, or a "
                                 "DICOM modality (C-STORE).")
    target: str = Field(description="Directory path, or the peer / modality name configured "
                                    "in the research Orthanc.")

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}"


class SharingOptions(BaseModel):
    """How to de-identify and where it goes (the new-study flow's share rules reuse this)."""

    destination: Destination
    profile: DeidProfile = Field(default_factory=DeidProfile)
    secret_block: str | None = Field(None, description=f"Prefect Secret block holding the "
                                     f"project secret (else the {SECRET_ENV} variable).")
    linkage_path: str = Field("linkage/linkage.csv", description="Where the source ↔ "
                              "pseudonym table goes. Keep it apart from the shared data.")
    staging_dir: str = Field("sharing/staging", description="Where ZIPs wait for the scan; "
                             "quarantined ones stay in its 'quarantine' folder.")
    ledger_path: str = Field("sharing/ledger.jsonl", description="Record of deliveries, so a "
                             "re-run delivers nothing twice.")
    package: str = Field("share", pattern=r"^[A-Za-z0-9_-]{1,32}$",
                         description="Prefix of package file names.")
    keep_anonymized: bool = Field(False, description="Keep the anonymized copies in Orthanc.")


class SharingRequest(SharingOptions):
    """What to share, how to de-identify it and where it goes (a form in the Prefect UI)."""

    project: str | None = Field(None, description="Share studies the collection flow marked "
                                                   "with this project.")
    study_ids: list[str] = Field(default_factory=list,
                                 description="Or: Orthanc study IDs in the research server.")

    @model_validator(mode="after")
    def _one_selection(self) -> SharingRequest:
        if bool(self.project) == bool(self.study_ids):
            raise ValueError("give exactly one of project and study_ids")
        return self


class SharedStudy(BaseModel):
    """One study's outcome: Orthanc IDs, pseudonyms, counts, checksums. No source values."""

    model_config = ConfigDict(frozen=True)

    source_id: str
    anonymized_id: str | None = None
    pseudo_patient: str = ""
    instances_in: int = 0
    instances_out: int = 0
    excluded: int = 0
    file: str = ""
    size: int = 0
    sha256: str = ""
    verified: bool = False
    findings: tuple[str, ...] = ()
    delivered: str = ""


def project_secret(block: str | None) -> bytes:
    """The de-identification secret: a Secret block's value, or the environment's."""
    if block:
        from prefect.blocks.system import Secret

        value = Secret.load(block).get()
    else:
        value = os.environ.get(SECRET_ENV, "")
    if len(value) < 16:
        raise ValueError(f"the project secret must be at least 16 characters: set "
                         f"{SECRET_ENV} or a Secret block (never a flow parameter)")
    return value.encode()


class _Ledger:
    """Append-only JSON lines of deliveries, keyed by (source study, destination, profile)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(source_id: str, destination: Destination, profile: DeidProfile) -> str:
        raw = f"{source_id}|{destination.key}|{profile.name}|{profile.version}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def delivered(self) -> set[str]:
        if not self.path.exists():
            return set()
        return {json.loads(line)["key"] for line in self.path.read_text().splitlines() if line}

    def record(self, key: str, study: SharedStudy) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "source_id": study.source_id, "file": study.file,
                           "sha256": study.sha256, "at": dt.datetime.now(dt.UTC).isoformat()})
        with _FILE_LOCK, self.path.open("a") as handle:
            handle.write(line + "\n")


def _append_linkage(path: Path, row: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _FILE_LOCK:
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
    os.chmod(path, 0o600)


@orthanc_task(name="deidentify_study", run_name=lambda p: f"deid-{short_id(p['source_id'])}")
def deidentify_study(credentials: OrthancCredentials, source_id: str,
                     request: SharingRequest, secret: bytes) -> SharedStudy:
    """Anonymize one study with the profile, drop excluded objects, ZIP it, scan the ZIP.

    Returns the outcome (verified or not) with pseudonyms, counts and checksum; the linkage
    row is appended to ``request.linkage_path``.

    Example:
        ```python
        shared = deidentify_study(creds, study_id, request, project_secret(None))
        assert shared.verified, shared.findings
        ```
    """
    profile = request.profile
    with credentials.get_client() as orthanc:
        instance_ids = orthanc.instances(Level.STUDY, source_id)
        source_tags = [orthanc.tags(Level.INSTANCE, i) for i in instance_ids]
        identifiers = identifiers_from(source_tags)
        shared = orthanc.tags(Level.STUDY, source_id, shared=True)
        body, linkage = build_request(profile, secret, shared)
        excluded = [t for t in source_tags if profile.excludes(
            str(t.get("Modality", "")), str(t.get("SOPClassUID", "")))]
        for stale in orthanc.find(Level.STUDY, {"StudyInstanceUID": linkage.study_uid}):
            orthanc.delete(Level.STUDY, stale, missing_ok=True)  # a crashed run's copy
        job = orthanc.wait_for_job(str(orthanc.anonymize(Level.STUDY, source_id,
                                                         **client_kwargs(body))))
        new_id = orthanc.modified_resource(job).id
        _append_linkage(Path(request.linkage_path), {
            **linkage.model_dump(), "source_orthanc_id": source_id,
            "anonymized_at": dt.datetime.now(dt.UTC).isoformat()})
        if excluded:  # the copy has new series UIDs: judge each series by what it holds
            for series in orthanc.children(Level.STUDY, new_id):
                first = orthanc.tags(Level.INSTANCE, series.children_ids[0])
                if profile.excludes(str(first.get("Modality", "")),
                                    str(first.get("SOPClassUID", ""))):
                    orthanc.delete(Level.SERIES, series.id)
        out = orthanc.count_instances(Level.STUDY, new_id)
        staging = Path(request.staging_dir)
        name = f"{request.package}-{linkage.patient_id}-{linkage.accession or short_id(new_id)}"
        archive = orthanc.download_archive(Level.STUDY, new_id, staging / f"{name}.zip")
    report = scan_zip(archive.path, identifiers)
    counts_ok = out == len(instance_ids) - len(excluded) and report.instances == out
    findings = tuple(str(f) for f in report.findings)
    if not counts_ok:
        findings += (f"instance count: {len(instance_ids)} in, {len(excluded)} excluded, "
                     f"{out} out, {report.instances} in the ZIP",)
    verified = report.clean and counts_ok and out > 0
    path = archive.path
    if not verified:  # quarantine: never delivered, kept for the data owner to inspect
        quarantine = staging / "quarantine"
        quarantine.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.move(str(archive.path), quarantine / archive.path.name))
    return SharedStudy(source_id=source_id, anonymized_id=new_id,
                       pseudo_patient=linkage.patient_id, instances_in=len(instance_ids),
                       instances_out=out, excluded=len(excluded), file=str(path),
                       size=archive.size, sha256=archive.sha256, verified=verified,
                       findings=findings)


@orthanc_task(name="deliver_study",
              run_name=lambda p: f"deliver-{short_id(p['study'].source_id)}")
def deliver_study(credentials: OrthancCredentials, study: SharedStudy,
                  destination: Destination, keep_anonymized: bool = False) -> SharedStudy:
    """Deliver a verified study: move its ZIP into a directory, or send the anonymized copy to
    an Orthanc peer or a DICOM modality; then remove the anonymized copy from Orthanc unless
    ``keep_anonymized``. Refuses anything not verified.

    Example:
        ```python
        deliver_study(creds, shared, Destination(kind="modality", target="partner-pacs"))
        ```
    """
    if not study.verified or study.anonymized_id is None:
        raise ValueError("only verified studies are delivered")
    update: dict[str, str] = {"delivered": destination.key}
    with credentials.get_client() as orthanc:
        if destination.kind == "directory":
            target = Path(destination.target)
            target.mkdir(parents=True, exist_ok=True)
            final = target / Path(study.file).name
            shutil.move(study.file, final)
            update["file"] = str(final)
        elif destination.kind == "peer":
            orthanc.wait_for_job(str(orthanc.store_peer(destination.target,
                                                        [study.anonymized_id])))
        else:
            with modality_slot(destination.target):
                orthanc.wait_for_job(str(orthanc.store(destination.target,
                                                       [study.anonymized_id])))
        if not keep_anonymized:
            orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)
    return study.model_copy(update=update)


def _select(credentials: OrthancCredentials, request: SharingRequest) -> list[str]:
    if request.study_ids:
        return list(request.study_ids)
    with credentials.get_client() as orthanc:
        return project_studies(orthanc, request.project)


def _write_manifest(destination: Destination, profile: DeidProfile,
                    studies: Sequence[SharedStudy]) -> Path | None:
    if destination.kind != "directory" or not studies:
        return None
    path = Path(destination.target) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"studies": []}
    manifest.update({"profile": profile.name, "profile_version": profile.version,
                     "deidentification_method": list(profile.method_values()),
                     "method_codes": [c.value for c in profile.method_codes()]})
    known = {s["file"] for s in manifest["studies"]}
    for study in studies:
        name = Path(study.file).name
        if name not in known:
            manifest["studies"].append({"file": name, "patient": study.pseudo_patient,
                                        "instances": study.instances_out,
                                        "bytes": study.size, "sha256": study.sha256})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return path


@flow(name="share-deidentified", flow_run_name="share-{request.package}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True)
def share_studies(request: SharingRequest, credentials_block: str | None = None
                  ) -> State[list[SharedStudy]]:
    """Share a de-identified copy of studies, with proof that no identifier leaves.

    Completed when every selected study was verified and delivered (or had been before);
    Failed when any study was quarantined or failed, with nothing of it delivered.

    Example:
        ```python
        share_studies(SharingRequest(project="lung-2026",
                                     destination=Destination(kind="modality",
                                                             target="partner")))
        ```
    """
    logger = get_run_logger()
    secret = project_secret(request.secret_block)
    credentials = load_credentials(credentials_block)
    ledger = _Ledger(Path(request.ledger_path))
    done_before = ledger.delivered()
    selected = _select(credentials, request)
    todo = [s for s in selected
            if _Ledger.key(s, request.destination, request.profile) not in done_before]
    logger.info("%d studies selected, %d already delivered to this destination",
                len(selected), len(selected) - len(todo))

    futures = {deidentify_study.submit(credentials, s, request, secret): s for s in todo}
    deliveries = {}
    outcomes: list[SharedStudy] = []
    for future in as_completed(list(futures)):
        source_id = futures[future]
        try:
            study = future.result()
        except Exception as error:
            outcomes.append(SharedStudy(source_id=source_id,
                                        findings=(f"{type(error).__name__}: {error}"[:300],)))
            continue
        if study.verified:  # delivered while the next studies are still being checked
            deliveries[deliver_study.submit(credentials, study, request.destination,
                                            request.keep_anonymized)] = source_id
        else:
            outcomes.append(study)
            if study.anonymized_id and not request.keep_anonymized:
                with credentials.get_client() as orthanc:
                    orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)
    for future in as_completed(list(deliveries)):
        study = future.result()
        ledger.record(_Ledger.key(deliveries[future], request.destination, request.profile),
                      study)
        outcomes.append(study)
    manifest = _write_manifest(request.destination, request.profile,
                               [s for s in outcomes if s.delivered])
    create_table_artifact(key="sharing-report", table=[{
        "pseudonym": s.pseudo_patient, "source_orthanc_id": s.source_id,
        "instances_in": s.instances_in, "instances_out": s.instances_out,
        "excluded": s.excluded, "verified": s.verified, "findings": len(s.findings),
        "delivered": s.delivered or "no"} for s in outcomes],
        description=f"Sharing with profile {request.profile.name} v{request.profile.version} "
                    f"(pseudonyms only; findings listed by tag path in the flow logs).")
    for study in outcomes:
        for finding in study.findings:
            logger.warning("study %s quarantined: %s", short_id(study.source_id), finding)
    delivered = sum(bool(s.delivered) for s in outcomes)
    bad = [s for s in outcomes if not s.verified]
    summary = (f"{delivered} delivered, {len(selected) - len(todo)} delivered before, "
               f"{len(bad)} quarantined or failed"
               + (f"; manifest {manifest.name}" if manifest else ""))
    return (Failed if bad else Completed)(message=summary, data=outcomes)
