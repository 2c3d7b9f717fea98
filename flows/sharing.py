"""De-identified sharing: pseudonymize → verify no PHI → package → deliver, once per study.

For each selected study in the research Orthanc: Orthanc anonymizes it with the profile's
request (keyed pseudonyms, shifted dates), excluded object types are removed from the copy,
the copy is streamed to a ZIP in a staging folder and **every string of every instance, and
every file name, is scanned** for the source's identifiers. Only a clean study is delivered (a
directory, an Orthanc peer or a DICOM modality); a study with any finding is quarantined and
the run ends Failed.

Deliveries cannot lose a study: each source study gets its own package, named by its
pseudonymous patient and study and a version number (``share-<patient>-<study>-v1.zip``), never
overwritten (a name already taken is an error); one study's work (ledger check, de-identify,
deliver, record) holds a per-study lock (``tasks.study_lock``, a Prefect global concurrency
limit) so duplicate events cannot race; the ledger (source study, destination, profile and the
study's *content version*: its instance set) is appended and fsynced right after each
delivery, so a study that grew after being shared is shared again whole as version 2, and the
manifest (one entry per study) says which package supersedes which. Directory deliveries are
atomic (a hidden temporary name in the destination, fsync, then a no-clobber link).

Each study ends with an ``outcome``: ``delivered``, ``delivered_before``, ``excluded`` (every
instance held back by the profile: a warning, not a failure), ``quarantined`` (findings) or
``failed`` (an error, its message shown when it is PHI-free). A study without PatientID is
delivered under a pseudonym keyed on its StudyInstanceUID (``pseudonym_from`` says so). The
linkage table (source ↔ pseudonym) gets a row only for a delivered study and goes to a file the
user chooses, never to Prefect: the run's artifact and logs name source studies and never
hold a pseudonym. The project secret comes from a Prefect Secret block or
``PREFECT_ORTHANC_DEID_SECRET``.

Example:
    ```python
    from flows.sharing import share_studies, Destination

    share_studies(project="lung-2026",
                  destination=Destination(kind="directory", target="/exports"),
                  linkage_path="/secure/linkage.csv")
    ```
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom import dcmread

from orthanc_client import Level, SafeMessageError
from tasks import OrthancCredentials, modality_slot, orthanc_task, study_lock
from tasks.policy import short_id

from .collection import COLLECTED_METADATA, load_credentials
from .deid import (DeidProfile, Rewriter, build_request, identifiers_from, risk_reason,
                   scan_zip)
from .parameters import described_by, request_from
from .site import SiteError, SiteSettings

__all__ = ["Destination", "SharingOptions", "SharingRequest", "SharedStudy", "Outcome",
           "DeliveryError", "share_studies", "share_study", "deidentify_study", "deliver_study",
           "content_version", "SECRET_ENV"]

SECRET_ENV = "PREFECT_ORTHANC_DEID_SECRET"


class DeliveryError(SafeMessageError):
    """A delivery refused or impossible as asked (e.g. a package name already taken in the
    destination: nothing is overwritten). Names the setting to check, never a value."""


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


class Destination(BaseModel):
    """Where verified studies go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["directory", "peer", "modality"] = Field(
        "directory", description="A local directory (ZIP + manifest), an Orthanc peer, or a "
                                 "DICOM modality (C-STORE).")
    target: str = Field(description="Directory path (relative to PREFECT_ORTHANC_DATA_DIR "
                                    "unless absolute), or the peer / modality name configured "
                                    "in the research Orthanc.")

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("target is a directory path or a peer / modality name")
        return value.strip()

    @model_validator(mode="after")
    def _check_name(self) -> Destination:
        if self.kind != "directory" and not _NAME.match(self.target):
            raise ValueError(f"a {self.kind} target is the {self.kind}'s name in the research "
                             f"Orthanc (letters, digits, '-', '_')")
        return self

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}"


#: the default destination: ``shared/`` under the data directory
SHARED_DIRECTORY = Destination(kind="directory", target="shared")


def _resolved(path: str, base: Path) -> Path:
    """``path`` as it will be used: relative ones under ``base`` (the data directory)."""
    return Path(os.path.normpath(base / Path(path).expanduser()))


class SharingOptions(BaseModel):
    """Where it goes and how to de-identify it (the new-study flow's share rules reuse this)."""

    model_config = ConfigDict(extra="forbid")

    destination: Destination = Field(SHARED_DIRECTORY, description="Where verified studies go: "
                                     "a directory (default: 'shared' under "
                                     "PREFECT_ORTHANC_DATA_DIR), an Orthanc peer or a DICOM "
                                     "modality.")
    profile: DeidProfile = Field(default_factory=DeidProfile, description="How studies are "
                                 "de-identified (defaults: keyed pseudonyms, shifted dates, "
                                 "descriptions and private tags dropped, risky objects "
                                 "excluded).")
    secret_block: str | None = Field(None, description=f"Prefect Secret block holding the "
                                     f"project secret (empty: the {SECRET_ENV} variable). The "
                                     f"secret itself is never a parameter.")
    linkage_path: str = Field("linkage/linkage.csv", description="Where the source <-> "
                              "pseudonym table goes (relative to PREFECT_ORTHANC_DATA_DIR "
                              "unless absolute). Keep it apart from the shared data.")
    staging_dir: str = Field("sharing/staging", description="Where ZIPs wait for the scan; "
                             "quarantined ones stay in its 'quarantine' folder.")
    ledger_path: str = Field("sharing/ledger.jsonl", description="Record of deliveries, so a "
                             "re-run delivers nothing twice.")
    package: str = Field("share", pattern=r"^[A-Za-z0-9_-]{1,32}$",
                         description="Prefix of package file names.")
    keep_anonymized: bool = Field(False, description="Keep the anonymized copies in Orthanc.")

    @field_validator("linkage_path", "staging_dir", "ledger_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a path is required")
        return value.strip()

    @model_validator(mode="after")
    def _apart(self) -> SharingOptions:
        self.check_paths(Path("/data-dir"))
        return self

    def check_paths(self, base: Path) -> None:
        """Refuse a linkage table, ledger or staging area inside the shared directory (it
        would be shared with the data), and a staging area that is the destination."""
        if self.destination.kind != "directory":
            return
        shared = _resolved(self.destination.target, base)
        for name in ("linkage_path", "ledger_path", "staging_dir"):
            path = _resolved(getattr(self, name), base)
            if path == shared or shared in path.parents:
                raise ValueError(f"{name} is inside the destination directory: it would be "
                                 f"shared with the data")
        staging = _resolved(self.staging_dir, base)
        if staging in shared.parents:
            raise ValueError("the destination directory is inside staging_dir")


class SharingRequest(SharingOptions):
    """What to share, where it goes and how to de-identify it. The sharing flow takes these
    as flat parameters (what to share first) and builds this model when a run starts."""

    project: str | None = Field(None, description="What to share: the studies the collection "
                                "flow collected for this project. Either this or study_ids.")
    study_ids: list[str] = Field(default_factory=list, description="Or: Orthanc study IDs in "
                                 "the research server.")

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and not _NAME.match(value):
            raise ValueError("project is 1-64 letters, digits, '-' or '_'")
        return value

    @field_validator("study_ids")
    @classmethod
    def _check_ids(cls, value: list[str]) -> list[str]:
        ids = [v.strip() for v in value if v.strip()]
        bad = sum(not _ORTHANC_ID.match(v) for v in ids)
        if bad:
            raise ValueError(f"{bad} of the study_ids are not Orthanc study IDs "
                             f"(xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx)")
        return list(dict.fromkeys(ids))

    @model_validator(mode="after")
    def _one_selection(self) -> SharingRequest:
        if bool(self.project) == bool(self.study_ids):
            raise ValueError("give exactly one of project and study_ids")
        return self


#: what became of one study: ``verified`` (de-identified and clean, not yet delivered),
#: ``delivered``, ``delivered_before`` (this content version, to this destination, with this
#: profile), ``excluded`` (every instance held back), ``quarantined`` (findings: never
#: delivered), ``failed`` (an error)
Outcome = Literal["verified", "delivered", "delivered_before", "excluded", "quarantined",
                  "failed"]


class SharedStudy(BaseModel):
    """One study's outcome: Orthanc IDs, pseudonyms, counts, checksums. No source values.
    Holds a source Orthanc ID next to pseudonyms: it stays in the process (the flow's
    artifact and logs never show both)."""

    model_config = ConfigDict(frozen=True)

    source_id: str
    outcome: Outcome = "failed"
    content_version: str = Field("", description="The source study's instance set when it "
                                 "was de-identified (count and hash of its instance IDs).")
    pseudo_study: str = Field("", description="The pseudonymous StudyID.")
    pseudonym_from: str = Field("", description="What the patient pseudonym is keyed on: "
                                "PatientID, IssuerOfPatientID+PatientID, or StudyInstanceUID "
                                "for a study without PatientID (not linked to other studies).")
    version: int = Field(0, description="Package version of this study at this destination.")
    supersedes: tuple[str, ...] = Field((), description="Earlier packages of this study.")
    anonymized_id: str | None = None
    pseudo_patient: str = ""
    instances_in: int = 0
    instances_out: int = 0
    excluded: int = 0
    excluded_reasons: dict[str, int] = Field(
        default_factory=dict, description="Instances held back, by reason (e.g. "
                                          "'modality US', 'burned-in annotation').")
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


def content_version(instance_ids: Sequence[str]) -> str:
    """A study's content version: its instance count and a hash of its sorted Orthanc
    instance IDs (themselves hashes of the SOPInstanceUIDs and their parents), e.g.
    ``"12-3f2a…"``. Changes when an instance arrives or goes; stays when nothing does."""
    digest = hashlib.sha256("\n".join(sorted(instance_ids)).encode()).hexdigest()[:16]
    return f"{len(instance_ids)}-{digest}"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (``flock``: across threads and processes) for the
    ledger, linkage and manifest updates that follow one delivery."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_durably(path: Path, text: str, mode: int | None = None) -> None:
    """Append ``text`` to ``path`` and fsync it before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if mode is not None:
        os.chmod(path, mode)


class _Ledger:
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
        entries = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [e for e in entries if e.get("study") == study]

    def delivered(self, study: str, version: str) -> bool:
        return any(e.get("content_version") == version for e in self.history(study))

    def record(self, study: str, shared: SharedStudy) -> None:
        """Append one delivery and fsync (call under ``_exclusive(self.lock)``)."""
        _append_durably(self.path, json.dumps({
            "study": study, "content_version": shared.content_version,
            "version": shared.version, "source_id": shared.source_id,
            "file": Path(shared.file).name, "sha256": shared.sha256,
            "destination": shared.delivered,
            "at": dt.datetime.now(dt.UTC).isoformat()}) + "\n")


def _pending_linkage(zip_path: Path) -> Path:
    """Where a verified study's linkage row waits for its delivery (next to its ZIP, in
    staging: owner-side, never shared)."""
    return zip_path.with_name(zip_path.name + ".linkage.json")


def _append_linkage(path: Path, row: dict[str, object]) -> None:
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
    _append_durably(path, buffer.getvalue(), mode=0o600)


@orthanc_task(name="deidentify_study", run_name=lambda p: f"deid-{short_id(p['source_id'])}")
def deidentify_study(credentials: OrthancCredentials, source_id: str,
                     request: SharingOptions, secret: bytes) -> SharedStudy:
    """De-identify one study, instance by instance, ZIP it, scan the ZIP.

    Each source file is read (``GET /instances/{id}/file``); risky ones are held back and
    counted by reason (``flows.deid.risk_reason``); the others go through Orthanc's Basic
    Profile (``POST /instances/{id}/anonymize``, not stored), then ``flows.deid.Rewriter``
    (keyed pseudonyms and UIDs, shifted dates, at every depth) and are stored back as a new
    study. Its ZIP is scanned against the identifiers of the source files. Returns the
    outcome (``verified``, ``excluded`` or ``quarantined``) with pseudonyms, counts, checksum
    and the content version it was made from. A verified study's linkage row waits next to
    its ZIP in staging; ``deliver_study`` appends it to the linkage table once delivered.
    Run it under ``tasks.study_lock(source_id)`` when other runs may share the same study: it
    first deletes any anonymized copy a crashed run left.

    Example:
        ```python
        shared = deidentify_study(creds, study_id, request, project_secret(None))
        assert shared.verified, shared.findings
        ```
    """
    profile = request.profile
    staging = Path(request.staging_dir)
    findings: list[str] = []
    with credentials.get_client() as orthanc:
        instance_ids = orthanc.instances(Level.STUDY, source_id)
        version = content_version(instance_ids)
        sources = {i: dcmread(io.BytesIO(orthanc.instance_file(i)), stop_before_pixels=True,
                              force=True) for i in instance_ids}  # headers only in memory
        identifiers = identifiers_from(list(sources.values()))
        body, linkage = build_request(profile, secret, sources[instance_ids[0]])
        base = {"source_id": source_id, "content_version": version,
                "instances_in": len(instance_ids), "pseudo_patient": linkage.patient_id,
                "pseudo_study": linkage.study_id, "pseudonym_from": linkage.patient_key_from}
        patients = {build_request(profile, secret, ds)[1].patient_id for ds in sources.values()}
        if len(patients) > 1:  # one Orthanc study, two identities (issuers): never merged
            return SharedStudy(source_id=source_id, outcome="quarantined",
                               content_version=version, instances_in=len(instance_ids),
                               findings=(f"refused: the study's instances belong to "
                                         f"{len(patients)} patients (PatientID with "
                                         f"different IssuerOfPatientID)",))
        reasons = {i: risk_reason(profile, ds) for i, ds in sources.items()}
        kept = [i for i in instance_ids if reasons[i] is None]
        excluded = dict(Counter(r for r in reasons.values() if r))
        for stale in orthanc.find(Level.STUDY, {"StudyInstanceUID": linkage.study_uid}):
            orthanc.delete(Level.STUDY, stale, missing_ok=True)  # a crashed run's copy
        if not kept:  # nothing to share: an outcome of its own, not a failure
            return SharedStudy(**base, outcome="excluded", excluded=len(instance_ids),
                               excluded_reasons=excluded)
        rewriter = Rewriter(profile, secret, linkage)
        parents: set[str] = set()
        for index, instance in enumerate(kept):
            data = orthanc.request("POST", f"/instances/{instance}/anonymize", json=body,
                                   expect="bytes", long=True)
            try:
                out = rewriter.rewrite(dcmread(io.BytesIO(data)), sources[instance])
                data = Rewriter.to_bytes(out)
            except Exception as error:  # unwritable: never shared, said without values
                findings.append(f"instance {index}: could not be rewritten "
                                f"({type(error).__name__})")
                continue
            parents.update(r.parent_study for r in orthanc.upload(data) if r.parent_study)
        if not parents:
            return SharedStudy(**base, outcome="quarantined", excluded=len(instance_ids)
                               - len(kept), excluded_reasons=excluded,
                               findings=tuple(findings))
        if len(parents) > 1:
            findings.append(f"the rewritten instances landed in {len(parents)} studies")
        new_id = sorted(parents)[0]
        out_count = orthanc.count_instances(Level.STUDY, new_id)
        name = f"{request.package}-{linkage.patient_id}-{linkage.study_id}"
        pending = _pending_linkage(staging / f"{name}.zip")
        pending.unlink(missing_ok=True)  # a crashed run's: this study is made again
        archive = orthanc.download_archive(Level.STUDY, new_id, staging / f"{name}.zip")
    report = scan_zip(archive.path, identifiers)
    findings = [*(str(f) for f in report.findings), *findings]
    counts_ok = out_count == len(kept) and report.instances == out_count
    if not counts_ok:
        findings.append(f"instance count: {len(instance_ids)} in, "
                        f"{len(instance_ids) - len(kept)} excluded, {out_count} out, "
                        f"{report.instances} in the ZIP")
    verified = report.clean and counts_ok and not findings
    path = archive.path
    if verified:  # the linkage row waits for the delivery, owner-side, readable by the owner
        pending.write_text(json.dumps({**linkage.model_dump(), "source_orthanc_id": source_id}))
        os.chmod(pending, 0o600)
    else:  # quarantine: never delivered, kept for the data owner to inspect
        quarantine = staging / "quarantine"
        quarantine.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        path = Path(shutil.move(str(archive.path), quarantine / f"{name}-{stamp}.zip"))
    return SharedStudy(**base, outcome="verified" if verified else "quarantined",
                       anonymized_id=new_id, instances_out=out_count,
                       excluded=len(instance_ids) - len(kept), excluded_reasons=excluded,
                       file=str(path), size=archive.size, sha256=archive.sha256,
                       verified=verified, findings=tuple(findings))


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
    ledger = _Ledger(Path(options.ledger_path))
    key = _Ledger.study(study.source_id, destination, profile)
    staged, pending = Path(study.file), _pending_linkage(Path(study.file))
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
                final = _publish(staged, Path(destination.target) / name)
                update["file"] = str(final)
            elif destination.kind == "peer":
                orthanc.wait_for_job(str(orthanc.store_peer(destination.target,
                                                            [study.anonymized_id])))
            else:
                with modality_slot(destination.target):
                    orthanc.wait_for_job(str(orthanc.store(destination.target,
                                                           [study.anonymized_id])))
        outcome = study.model_copy(update=update)
        with _exclusive(ledger.lock):  # right after the delivery, before anything else
            if pending.exists():
                _append_linkage(Path(options.linkage_path), {
                    **json.loads(pending.read_text()),
                    "package": name, "delivered_to": destination.key,
                    "delivered_at": dt.datetime.now(dt.UTC).isoformat()})
            ledger.record(key, outcome)
            if destination.kind == "directory":
                _update_manifest(Path(destination.target), profile, outcome)
    pending.unlink(missing_ok=True)
    staged.unlink(missing_ok=True)
    if not options.keep_anonymized:
        with credentials.get_client() as orthanc:
            orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)
    return outcome


def _publish(staged: Path, final: Path) -> Path:
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
    _fsync_dir(final.parent)
    return final


def _update_manifest(directory: Path, profile: DeidProfile, study: SharedStudy) -> Path:
    """Put ``study``'s entry in ``manifest.json`` (one entry per study, keyed by its
    pseudonymous StudyID: the newest package, and the packages it supersedes), atomically
    (temporary file, fsync, rename). Call under the ledger's lock."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"studies": []}
    manifest.update({"profile": profile.name, "profile_version": profile.version,
                     "deidentification_method": list(profile.method_values()),
                     "method_codes": [c.value for c in profile.method_codes()]})
    entry = {"study": study.pseudo_study, "patient": study.pseudo_patient,
             "pseudonym_from": study.pseudonym_from, "file": Path(study.file).name,
             "version": study.version, "supersedes": list(study.supersedes),
             "instances": study.instances_out, "bytes": study.size, "sha256": study.sha256}
    manifest["studies"] = [e for e in manifest["studies"]
                           if e.get("study") != study.pseudo_study
                           and e.get("file") not in (entry["file"], *entry["supersedes"])]
    manifest["studies"].append(entry)
    partial = directory / f".manifest.json.{uuid.uuid4().hex}.partial"
    with partial.open("x") as handle:
        handle.write(json.dumps(manifest, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    _fsync_dir(directory)
    return path


@orthanc_task(name="share_study", run_name=lambda p: f"share-{short_id(p['source_id'])}",
              retries=0)
def share_study(credentials: OrthancCredentials, source_id: str, request: SharingOptions,
                secret: bytes) -> SharedStudy:
    """One study, start to end, under its lock (``tasks.study_lock``): skip it if the ledger
    holds its current content version, else ``deidentify_study`` then, when verified,
    ``deliver_study``; an unverified study's anonymized copy is removed (unless
    ``keep_anonymized``). Two runs given the same study (duplicate events) take turns: the
    second finds it delivered.

    Example:
        ```python
        outcome = share_study(creds, study_id, request, project_secret(None))
        ```
    """
    ledger = _Ledger(Path(request.ledger_path))
    key = _Ledger.study(source_id, request.destination, request.profile)
    with study_lock(source_id):
        with credentials.get_client() as orthanc:
            version = content_version(orthanc.instances(Level.STUDY, source_id))
        if ledger.delivered(key, version):
            return SharedStudy(source_id=source_id, outcome="delivered_before",
                               content_version=version)
        study = deidentify_study(credentials, source_id, request, secret)
        if study.outcome == "verified":
            return deliver_study(credentials, study, request)
        if study.anonymized_id and not request.keep_anonymized:
            with credentials.get_client() as orthanc:
                orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)
        return study


def _select(credentials: OrthancCredentials, request: SharingRequest) -> list[str]:
    if request.study_ids:
        return list(request.study_ids)
    with credentials.get_client() as orthanc:
        return [study_id for study_id in orthanc.find(Level.STUDY)
                if orthanc.metadata(Level.STUDY, study_id, COLLECTED_METADATA)
                == request.project]


def _nothing_selected(request: SharingRequest) -> State[list[SharedStudy]]:
    """A run that selected no study: Completed, with a warning in its message and artifact."""
    what = (f"project {request.project!r} has no collected study in the research Orthanc "
            f"(collect it first, or check the project name)" if request.project else
            "none of the study_ids is in the research Orthanc")
    warning = f"WARNING: no study selected: {what}; nothing shared"
    get_run_logger().warning(warning)
    create_markdown_artifact(key="sharing-report", markdown=f"**{warning}**",
                             description="Sharing: nothing was selected.")
    return Completed(message=warning, data=[])


def _checked_request(values: dict[str, object]) -> SharingRequest:
    """The request with absolute paths; ``ValueError`` (one line) for what would fail later."""
    request = request_from(SharingRequest, values)
    site = SiteSettings.load()
    updates: dict[str, object] = {name: str(site.path(getattr(request, name), name))
                                  for name in ("linkage_path", "staging_dir", "ledger_path")}
    if request.destination.kind == "directory":
        updates["destination"] = request.destination.model_copy(update={
            "target": str(site.path(request.destination.target, "destination.target"))})
    request.check_paths(site.data_dir)
    return request.model_copy(update=updates)


@flow(name="share-deidentified", flow_run_name="share-{package}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True,
      persist_result=False)
@described_by(SharingRequest, credentials_block="Name of the OrthancCredentials block of the "
              "research Orthanc (empty: the ORTHANC_* environment variables).")
def share_studies(
    project: str | None = None,
    study_ids: list[str] | None = None,
    destination: Destination = SHARED_DIRECTORY,
    profile: DeidProfile = DeidProfile(),
    secret_block: str | None = None,
    linkage_path: str = "linkage/linkage.csv",
    staging_dir: str = "sharing/staging",
    ledger_path: str = "sharing/ledger.jsonl",
    package: str = "share",
    keep_anonymized: bool = False,
    credentials_block: str | None = None,
) -> State[list[SharedStudy]]:
    """Share a de-identified copy of studies, with proof that no identifier leaves.

    Give what to share (a project or study IDs) and a destination; the rest has defaults, so
    a deployment run that overrides one parameter (``--param project=lung-2026``) keeps the
    deployment's others. Returns one ``SharedStudy`` per selected study, in selection order,
    each with its ``outcome``. Completed when every selected study was delivered (now or
    before) or excluded (every instance held back by the profile: the message then starts
    with ``WARNING``), and with a warning when nothing was selected; Failed when any study was
    quarantined or failed, with nothing of it delivered, or, before anything is touched,
    when the parameters are unusable (a one-line message).

    Example:
        ```python
        share_studies(project="lung-2026",
                      destination=Destination(kind="modality", target="partner"))
        ```
    """
    try:
        request = _checked_request(dict(locals()))
    except (ValueError, SiteError) as error:
        get_run_logger().error("sharing not started: %s", error)
        return Failed(message=f"sharing not started: {error}")
    return _share(request, credentials_block)


def _share(request: SharingRequest, credentials_block: str | None
           ) -> State[list[SharedStudy]]:
    logger = get_run_logger()
    secret = project_secret(request.secret_block)
    credentials = load_credentials(credentials_block)
    selected = _select(credentials, request)
    if not selected:
        return _nothing_selected(request)
    logger.info("%d studies selected", len(selected))
    futures = {share_study.submit(credentials, s, request, secret): s for s in selected}
    outcomes: list[SharedStudy] = []
    for future in as_completed(list(futures)):
        try:
            outcomes.append(future.result())
        except Exception as error:  # sanitized by the task policy: PHI-free messages only
            outcomes.append(SharedStudy(source_id=futures[future], outcome="failed",
                                        findings=(f"{type(error).__name__}: {error}"[:300],)))
    order = {source_id: row for row, source_id in enumerate(selected, start=1)}
    outcomes.sort(key=lambda s: order[s.source_id])
    return _report(request, outcomes, logger)


def _report(request: SharingRequest, outcomes: list[SharedStudy], logger: Any
            ) -> State[list[SharedStudy]]:
    """The run's artifact, log lines and final state, by source study: never a pseudonym.

    A pseudonym next to a source Orthanc ID (a hash of source identifiers) is linkage, and
    so is a pseudonym next to a row number when the rows follow the run's ``study_ids``
    parameter, or a study's outcome told once with its source ID (a log line) and once with
    its pseudonym (an artifact). So nothing the run gives Prefect holds a pseudonym: the
    data owner acts on source studies; pseudonyms are in the manifest and linkage table."""
    create_table_artifact(key="sharing-report", table=[{
        "row": row, "study": s.source_id, "outcome": s.outcome,
        "pseudonym_from": s.pseudonym_from, "package_version": s.version or "",
        "instances_in": s.instances_in, "instances_out": s.instances_out,
        "excluded": s.excluded,
        "excluded_reasons": ", ".join(f"{r}: {n}" for r, n in s.excluded_reasons.items()),
        "findings": len(s.findings), "delivered_to": s.delivered or "no"}
        for row, s in enumerate(outcomes, start=1)],
        description=f"Sharing with profile {request.profile.name} v{request.profile.version}: "
                    f"one row per selected source study (Orthanc ID), in selection order. "
                    f"No pseudonyms here: they are in the destination's manifest and the "
                    f"linkage table. Findings by tag path are in the flow logs.")
    for study in outcomes:
        if study.outcome == "excluded":
            logger.warning("study %s: nothing shared, every instance held back (%s)",
                           short_id(study.source_id),
                           ", ".join(f"{r}: {n}" for r, n in study.excluded_reasons.items()))
        for finding in study.findings:
            logger.warning("study %s %s: %s", short_id(study.source_id), study.outcome,
                           finding)
        if study.outcome == "delivered" and study.pseudonym_from == "StudyInstanceUID":
            logger.info("study %s: no PatientID, its pseudonym is keyed on its "
                        "StudyInstanceUID (not linked to the patient's other studies)",
                        short_id(study.source_id))
    count = Counter(s.outcome for s in outcomes)
    manifest = " (manifest.json updated)" if count["delivered"] and \
        request.destination.kind == "directory" else ""
    summary = (f"{count['delivered']} delivered{manifest}, {count['delivered_before']} "
               f"delivered before, {count['excluded']} excluded (every instance held back), "
               f"{count['quarantined']} quarantined, {count['failed']} failed")
    if count["quarantined"] or count["failed"]:
        return Failed(message=summary, data=outcomes)
    if count["excluded"]:
        summary = f"WARNING: {count['excluded']} studies had nothing to share; {summary}"
        logger.warning(summary)
    return Completed(message=summary, data=outcomes)
