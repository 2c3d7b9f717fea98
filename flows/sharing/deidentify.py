"""One study de-identified, packaged and scanned (``deidentify_study``)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from prefect_orthanc.flows.deid import (
    Rewriter,
    build_request,
    risk_reason,
    scan_package,
)
from prefect_orthanc.flows.sharing.files import package_files
from prefect_orthanc.flows.sharing.ledger import content_version
from prefect_orthanc.flows.sharing.linkage import pending_linkage
from prefect_orthanc.flows.sharing.models import SharedStudy, SharingOptions
from prefect_orthanc.flows.sharing.staging import remove_staged, work_dir
from prefect_orthanc.orthanc_client import (
    Level,
    Orthanc,
    OrthancBadRequest,
    OrthancNotFound,
    UploadResult,
)
from prefect_orthanc.tasks import OrthancCredentials, orthanc_task
from prefect_orthanc.tasks.origin import mark_copy
from prefect_orthanc.tasks.policy import short_id

__all__ = ["STORE_WHOLE_BYTES", "deidentify_study", "store_package"]


@orthanc_task(name="deidentify_study", run_name=lambda p: f"deid-{short_id(p['source_id'])}")
def deidentify_study(credentials: OrthancCredentials, source_id: str,
                     request: SharingOptions, secret: bytes) -> SharedStudy:
    """De-identify one study, instance by instance, ZIP it, scan the ZIP.

    Each source file is read (``GET /instances/{id}/file``); risky ones are held back and
    counted by reason (``flows.deid.risk_reason``); the others go through Orthanc's Basic
    Profile (``POST /instances/{id}/anonymize``, not stored), then ``flows.deid.Rewriter``
    (keyed pseudonyms and UIDs, shifted dates, at every depth) and packaged as a ZIP
    (``files.package_files``, from the study's work folder in staging: the same study makes
    the same bytes, under names that hold no value of it). The package itself is stored
    back in Orthanc as the new study, one request (``store_package``: Orthanc stores each
    member as it is; its answer and the stored copy's instance count and total size are
    checked against the package), and scanned against the identifiers of the source files.
    Returns the
    outcome (``verified``, ``excluded`` or ``quarantined``) with pseudonyms, counts, checksum
    and the content version it was made from. A verified study's linkage row waits next to
    its ZIP in staging; ``deliver_study`` appends it to the linkage table once delivered.
    Run it under ``tasks.study_lock(source_id)`` when other runs may share the same study: it
    first deletes what a crashed run left of this study (its anonymized copy in Orthanc, its
    files in staging, found by name).

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        source_id: Orthanc ID of the source study.
        request: The sharing options: ``profile``, ``staging_dir`` and ``package`` are read.
        secret: The project secret (``project_secret``), at least 16 bytes.

    Returns:
        The study's ``SharedStudy``, with ``outcome`` ``verified`` (its ZIP in ``file``, with
        ``size`` and ``sha256``), ``excluded`` (every instance held back, counted in
        ``excluded_reasons``) or ``quarantined`` (``findings`` say why; the ZIP is moved to
        ``quarantine/`` in staging).

    Raises:
        OrthancError: The research Orthanc did not answer or refused (e.g. ``OrthancNotFound``
            for a study that no longer exists).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

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
        sources: dict[str, Dataset] = {}
        headers: list[bytes] = []  # each source file cut before its pixel data
        for instance in instance_ids:  # headers only in memory
            data = orthanc.instance_file(instance)
            stream = io.BytesIO(data)
            sources[instance] = dcmread(stream, stop_before_pixels=True, force=True)
            headers.append(data[:stream.tell()])
        body, linkage = build_request(profile, secret, sources[instance_ids[0]])
        base: dict[str, Any] = {"source_id": source_id, "content_version": version,
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
        name = f"{request.package}-{linkage.patient_id}-{linkage.study_id}"
        staged = staging / f"{name}.zip"
        pending = pending_linkage(staged)
        remove_staged(staged)  # a crashed run's: this study is made again
        work = work_dir(staged)
        work.mkdir(parents=True, exist_ok=True)
        try:
            rewriter = Rewriter(profile, secret, linkage)
            written: list[tuple[str, str, str, int, Path]] = []
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
                path = work / f"{index}.dcm"
                path.write_bytes(data)
                written.append((str(out.get("SeriesInstanceUID", "")),
                                str(out.get("SOPInstanceUID", "")),
                                hashlib.sha256(data).hexdigest(), len(data), path))
            if not written:
                return SharedStudy(**base, outcome="quarantined", excluded=len(instance_ids)
                                   - len(kept), excluded_reasons=excluded,
                                   findings=tuple(findings))
            size, sha256 = package_files(_member_names(written), staged)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # the package itself is stored in Orthanc (one request; Orthanc stores each member
        # as it is, so the copy in Orthanc is the very bytes delivered)
        parents, refused = store_package(orthanc, staged, len(written))
        findings += refused
        new_id = min(parents) if parents else None  # none: counted below, quarantined
        out_count = 0
        if new_id is not None:
            stored = orthanc.request("GET", f"/studies/{new_id}/statistics")
            out_count = int(stored.get("CountInstances", 0))
            stored_size = stored.get("DicomUncompressedSize")
            if stored_size is not None and int(stored_size) != sum(w[3] for w in written):
                findings.append("the copy stored in Orthanc differs in size from the package")
    report = scan_package(staged, headers)  # bytes and a path in, a ScanReport out
    findings = [*(str(f) for f in report.findings), *findings]
    counts_ok = out_count == len(kept) and report.instances == out_count
    if not counts_ok:
        findings.append(f"instance count: {len(instance_ids)} in, "
                        f"{len(instance_ids) - len(kept)} excluded, {out_count} out, "
                        f"{report.instances} in the ZIP")
    verified = report.clean and counts_ok and not findings
    path = staged
    if verified:  # the linkage row waits for the delivery, owner-side, readable by the owner
        pending.write_text(json.dumps({**linkage.model_dump(), "source_orthanc_id": source_id}))
        os.chmod(pending, 0o600)
    else:  # quarantine: never delivered, kept for the data owner to inspect
        quarantine = staging / "quarantine"
        quarantine.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        path = Path(shutil.move(str(staged), quarantine / f"{name}-{stamp}.zip"))
    return SharedStudy(**base, outcome="verified" if verified else "quarantined",
                       anonymized_id=new_id, instances_out=out_count,
                       excluded=len(instance_ids) - len(kept), excluded_reasons=excluded,
                       file=str(path), size=size, sha256=sha256,
                       verified=verified, findings=tuple(findings))


#: a package up to this size is stored with one request (held whole in memory by this
#: process and by Orthanc for that request); a bigger one member by member, so memory does
#: not grow with the study
STORE_WHOLE_BYTES = 64 << 20


def store_package(orthanc: Orthanc, package: Path, members: int) -> tuple[set[str], list[str]]:
    """Store the de-identified package (a ZIP of ``members`` DICOM files) in Orthanc: one
    ``POST /instances`` of the ZIP, or of each member when the package is larger than
    ``STORE_WHOLE_BYTES`` (the same bytes either way). Each study the answers name is
    marked as a copy (``tasks.origin.mark_copy``) as soon as it is named: a study becomes
    stable ``StableAge`` seconds after its last instance, so the mark comes first. Returns
    the Orthanc IDs of the studies made and the findings, without values: Orthanc 1.10.1
    skips a ZIP member it cannot read without saying so (its answer lists only what it
    stored) and refuses such a file sent alone (HTTP 400, or 404 for a file cut short), so
    fewer answers than members, or any answer other than ``Success`` (``AlreadyStored``: a
    copy was there already), is a finding.

    Raises:
        OrthancError: Orthanc did not answer, or refused the package as a whole.
    """
    parents: set[str] = set()
    answers: list[UploadResult] = []

    def stored(new: list[UploadResult]) -> None:
        answers.extend(new)
        for parent in sorted({a.parent_study for a in new if a.parent_study} - parents):
            mark_copy(orthanc, parent, "deidentified")
            parents.add(parent)

    if package.stat().st_size <= STORE_WHOLE_BYTES:
        stored(orthanc.upload(package))
    else:
        with zipfile.ZipFile(package) as archive:
            for info in archive.infolist():
                try:
                    stored(orthanc.upload(archive.read(info)))
                except (OrthancBadRequest, OrthancNotFound):  # this file refused (a file
                    continue  # cut short gets 404 "Inexistent tag"): counted below
    findings: list[str] = []
    if len(answers) != members:
        findings.append(f"Orthanc stored {len(answers)} of the package's {members} instances")
    statuses = Counter(a.status for a in answers if a.status != "Success")
    if statuses:
        findings.append("instances of the package not stored as new: " + ", ".join(
            f"{count} {status}" for status, count in sorted(statuses.items())))
    if len(parents) > 1:
        findings.append(f"the rewritten instances landed in {len(parents)} studies")
    return parents, findings


def _member_names(written: list[tuple[str, str, str, int, Path]]) -> dict[str, Path]:
    """Package names that hold no value of the study: series and instances numbered in the
    order of their (keyed, pseudonymous) UIDs, then of their content, so the same instances
    get the same names whatever order they were made in."""
    series = {uid: number for number, uid in enumerate(sorted({w[0] for w in written}),
                                                       start=1)}
    ordered = sorted(written, key=lambda w: (series[w[0]], w[1], w[2]))
    return {f"SERIES{series[w[0]]:03d}/IM{index:05d}.dcm": w[4]
            for index, w in enumerate(ordered, start=1)}
