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
    from flows.sharing import share_studies, Destination

    share_studies(project="lung-2026",
                  destination=Destination(kind="directory", target="/exports"),
                  linkage_path="/secure/linkage.csv")
    ```
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom import dcmread

from orthanc_client import Level
from tasks import OrthancCredentials, modality_slot, orthanc_task
from tasks.labels import project_studies
from tasks.policy import short_id

from .collection import load_credentials
from .deid import (DeidProfile, Rewriter, build_request, identifiers_from, risk_reason,
                   scan_zip)
from .parameters import described_by, request_from
from .site import SiteError, SiteSettings

__all__ = ["Destination", "SharingOptions", "SharingRequest", "SharedStudy", "share_studies", "deidentify_study",
           "deliver_study", "SECRET_ENV"]

SECRET_ENV = "PREFECT_ORTHANC_DEID_SECRET"
_FILE_LOCK = threading.Lock()


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


class SharedStudy(BaseModel):
    """One study's outcome: Orthanc IDs, pseudonyms, counts, checksums. No source values."""

    model_config = ConfigDict(frozen=True)

    source_id: str
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


#: the shortest de-identification secret accepted (checked again by ``deployments setup``)
MIN_SECRET_LENGTH = 16


def project_secret(block: str | None) -> bytes:
    """The de-identification secret: a Secret block's value, or the environment's."""
    if block:
        from prefect.blocks.system import Secret

        value = Secret.load(block).get()
    else:
        value = os.environ.get(SECRET_ENV, "")
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"the project secret must be at least {MIN_SECRET_LENGTH} characters: set "
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
    """De-identify one study, instance by instance, ZIP it, scan the ZIP.

    Each source file is read (``GET /instances/{id}/file``); risky ones are held back and
    counted by reason (``flows.deid.risk_reason``); the others go through Orthanc's Basic
    Profile (``POST /instances/{id}/anonymize``, not stored), then ``flows.deid.Rewriter``
    (keyed pseudonyms and UIDs, shifted dates, at every depth) and are stored back as a new
    study. Its ZIP is scanned against the identifiers of the source files. Returns the
    outcome (verified or not) with pseudonyms, counts and checksum; the linkage row is
    appended to ``request.linkage_path`` only for a verified study.

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
        sources = {i: dcmread(io.BytesIO(orthanc.instance_file(i)), stop_before_pixels=True,
                              force=True) for i in instance_ids}  # headers only in memory
        identifiers = identifiers_from(list(sources.values()))
        body, linkage = build_request(profile, secret, sources[instance_ids[0]])
        patients = {build_request(profile, secret, ds)[1].patient_id for ds in sources.values()}
        if len(patients) > 1:  # one Orthanc study, two identities (issuers): never merged
            return SharedStudy(source_id=source_id, instances_in=len(instance_ids),
                               findings=(f"refused: the study's instances belong to "
                                         f"{len(patients)} patients (PatientID with "
                                         f"different IssuerOfPatientID)",))
        reasons = {i: risk_reason(profile, ds) for i, ds in sources.items()}
        kept = [i for i in instance_ids if reasons[i] is None]
        excluded = dict(Counter(r for r in reasons.values() if r))
        for stale in orthanc.find(Level.STUDY, {"StudyInstanceUID": linkage.study_uid}):
            orthanc.delete(Level.STUDY, stale, missing_ok=True)  # a crashed run's copy
        if not kept:
            return SharedStudy(source_id=source_id, pseudo_patient=linkage.patient_id,
                               instances_in=len(instance_ids), excluded=len(instance_ids),
                               excluded_reasons=excluded,
                               findings=(f"every instance held back: {excluded}",))
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
            return SharedStudy(source_id=source_id, pseudo_patient=linkage.patient_id,
                               instances_in=len(instance_ids), excluded=len(instance_ids)
                               - len(kept), excluded_reasons=excluded,
                               findings=tuple(findings))
        if len(parents) > 1:
            findings.append(f"the rewritten instances landed in {len(parents)} studies")
        new_id = sorted(parents)[0]
        out_count = orthanc.count_instances(Level.STUDY, new_id)
        name = f"{request.package}-{linkage.patient_id}-{linkage.study_id}"
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
    if verified:
        _append_linkage(Path(request.linkage_path), {
            **linkage.model_dump(), "source_orthanc_id": source_id,
            "anonymized_at": dt.datetime.now(dt.UTC).isoformat()})
    else:  # quarantine: never delivered, kept for the data owner to inspect
        quarantine = staging / "quarantine"
        quarantine.mkdir(parents=True, exist_ok=True)
        path = Path(shutil.move(str(archive.path), quarantine / archive.path.name))
    return SharedStudy(source_id=source_id, anonymized_id=new_id,
                       pseudo_patient=linkage.patient_id, instances_in=len(instance_ids),
                       instances_out=out_count, excluded=len(instance_ids) - len(kept),
                       excluded_reasons=excluded, file=str(path), size=archive.size,
                       sha256=archive.sha256, verified=verified, findings=tuple(findings))


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
      task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True)
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
    deployment's others. Completed when every selected study was verified and delivered (or
    had been before), with a warning in its message and artifact when nothing was selected;
    Failed when any study was quarantined or failed, with nothing of it delivered, or, before
    anything is touched, when the parameters are unusable (a one-line message).

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
    ledger = _Ledger(Path(request.ledger_path))
    done_before = ledger.delivered()
    selected = _select(credentials, request)
    todo = [s for s in selected
            if _Ledger.key(s, request.destination, request.profile) not in done_before]
    logger.info("%d studies selected, %d already delivered to this destination",
                len(selected), len(selected) - len(todo))
    if not selected:
        return _nothing_selected(request)

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
