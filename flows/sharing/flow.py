"""The sharing flow (``share_studies``) and its per-study task under the study's lock
(``share_study``)."""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import State, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.parameters import described_by, request_from
from prefect_orthanc.flows.sharing.deidentify import deidentify_study
from prefect_orthanc.flows.sharing.delivery import deliver_study
from prefect_orthanc.flows.sharing.ledger import Ledger, content_version
from prefect_orthanc.flows.sharing.models import (
    SHARED_DIRECTORY,
    Destination,
    SharedStudy,
    SharingOptions,
    SharingRequest,
)
from prefect_orthanc.flows.sharing.secret import project_secret
from prefect_orthanc.flows.sharing.staging import remove_staged
from prefect_orthanc.flows.site import SiteError, SiteSettings
from prefect_orthanc.flows.states import fail_run, stop_run
from prefect_orthanc.orthanc_client import Level, SafeMessageError
from prefect_orthanc.tasks import (
    OrthancCredentials,
    UnknownModality,
    orthanc_task,
    require_modality,
    study_lock,
)
from prefect_orthanc.tasks.credentials import load_credentials
from prefect_orthanc.tasks.labels import project_studies
from prefect_orthanc.tasks.policy import orthanc_flow, short_id

__all__ = ["share_studies", "share_study"]


@orthanc_task(name="share_study", run_name=lambda p: f"share-{short_id(p['source_id'])}",
              retries=0)
def share_study(credentials: OrthancCredentials, source_id: str, request: SharingOptions,
                secret: bytes, locked: bool = False) -> SharedStudy:
    """One study, start to end, under its lock (``tasks.study_lock``; ``locked=True`` when
    the caller already holds it, as ``share_studies`` does for its whole selection, one
    acquisition per run instead of one per study): skip it if the ledger
    holds its current content version (removing what a run killed after that record left:
    its staging files and anonymized copy), else ``deidentify_study`` then, when verified,
    ``deliver_study`` (both inside this one task run); the anonymized copy is then removed
    whatever happened (unless ``keep_anonymized``). Two runs given the same study (duplicate
    events) take turns: the second finds it delivered. Returns the study's ``SharedStudy``;
    raises what the steps raise (PHI-free ``SafeMessageError`` messages, or the type only).

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        source_id: Orthanc ID of the source study.
        request: The sharing options (destination, profile, paths, ``keep_anonymized``).
        secret: The project secret (``project_secret``), at least 16 bytes.
        locked: True when the caller already holds the study's lock.

    Returns:
        The study's ``SharedStudy``, whose ``outcome`` is ``delivered``, ``delivered_before``,
        ``excluded`` or ``quarantined``.

    Raises:
        SlotWaitExceeded: The study's lock was not free within the wait bound.
        DeliveryError: The destination already holds other bytes under the package's name.
        OrthancError: The research Orthanc or the destination did not answer or refused.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        outcome = share_study(creds, study_id, request, project_secret(None))
        ```
    """
    ledger = Ledger(Path(request.ledger_path))
    key = Ledger.study(source_id, request.destination, request.profile)
    with contextlib.nullcontext() if locked else study_lock(source_id):
        with credentials.get_client() as orthanc:
            version = content_version(orthanc.instances(Level.STUDY, source_id))
        recorded = ledger.delivery(key, version)
        if recorded is not None:  # what a run killed after its record left: removed
            _remove_leftovers(credentials, request, recorded)
            return SharedStudy(source_id=source_id, outcome="delivered_before",
                               content_version=version)
        # the steps' own functions, in this task run: a task run each would only add
        # Prefect's per-run cost (their errors are sanitized by their own wrappers)
        study = deidentify_study.fn(credentials, source_id, request, secret)
        try:
            if study.outcome == "verified":
                return deliver_study.fn(credentials, study, request)
            return study
        finally:  # delivered, refused or failed: neither its staged package (made again by
            # the next run) nor the anonymized copy is kept around
            if study.outcome == "verified" and study.file:
                remove_staged(Path(study.file))
            if study.anonymized_id and not request.keep_anonymized:
                with credentials.get_client() as orthanc:
                    orthanc.delete(Level.STUDY, study.anonymized_id, missing_ok=True)


def _remove_leftovers(credentials: OrthancCredentials, request: SharingOptions,
                      recorded: dict[str, Any]) -> None:
    """A delivered study's staging files and anonymized copy, left by a run killed between
    its ledger record and its clean-up (the record names them)."""
    if recorded.get("staged"):
        remove_staged(Path(request.staging_dir) / Path(str(recorded["staged"])).name)
    if recorded.get("anonymized_id") and not request.keep_anonymized:
        with credentials.get_client() as orthanc:
            orthanc.delete(Level.STUDY, str(recorded["anonymized_id"]), missing_ok=True)


def _select(credentials: OrthancCredentials, request: SharingRequest) -> list[str]:
    if not request.project:  # the request holds exactly one of project and study_ids
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


@orthanc_flow(name="share-deidentified", flow_run_name="share-{package}",
      task_runner=ThreadPoolTaskRunner(max_workers=4),
      validate_parameters=True, persist_result=False)
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

    Returns:
        The run's final state, its data the list of ``SharedStudy`` described above (Orthanc
        IDs, outcomes, counts and checksums; the run's artifact and logs show no pseudonym).

    Raises:
        ValueError: The de-identification secret is missing or shorter than 16 characters, or
            ``credentials_block`` names no saved ``OrthancCredentials`` block.
        OrthancError: The research Orthanc did not answer or refused while the studies were
            selected (each study's own errors end as its ``failed`` outcome instead).

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
        return fail_run(f"sharing not started: {error}")
    return _share(request, credentials_block)


def _share(request: SharingRequest, credentials_block: str | None
           ) -> State[list[SharedStudy]]:
    logger = get_run_logger()
    secret = project_secret(request.secret_block)
    credentials = load_credentials(credentials_block)
    if request.destination.kind == "modality":  # a typo is reported as one, before any work
        try:
            with credentials.get_client() as orthanc:
                require_modality(orthanc, request.destination.target)
        except UnknownModality as error:
            logger.error("sharing not started: %s", error)
            return fail_run(f"sharing not started: {error}")
    selected = _select(credentials, request)
    if not selected:
        return _nothing_selected(request)
    logger.info("%d studies selected", len(selected))
    outcomes: list[SharedStudy] = []
    # every selected study's lock, taken at once for the run: another run given one of
    # them (a duplicate event) waits, then finds it in the ledger
    try:
        with study_lock(*selected):
            futures = {share_study.submit(credentials, s, request, secret, locked=True): s
                       for s in selected}
            for future in as_completed(list(futures)):
                try:
                    outcomes.append(future.result())
                except Exception as error:  # sanitized by the task policy: PHI-free only
                    outcomes.append(SharedStudy(
                        source_id=futures[future], outcome="failed",
                        findings=(f"{type(error).__name__}: {error}"[:300],)))
    except SafeMessageError as error:  # the locks' wait past its bound: nothing delivered
        return stop_run("sharing stopped", error)
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
            # a warning: the study cannot be linked to its patient's other studies
            logger.warning("study %s: no PatientID, its pseudonym is keyed on its "
                           "StudyInstanceUID (not linked to the patient's other studies)",
                           short_id(study.source_id))
    count = Counter(s.outcome for s in outcomes)
    manifest = " (manifest.json updated)" if count["delivered"] and \
        request.destination.kind == "directory" else ""
    summary = (f"{count['delivered']} delivered{manifest}, {count['delivered_before']} "
               f"delivered before, {count['excluded']} excluded (every instance held back), "
               f"{count['quarantined']} quarantined, {count['failed']} failed")
    if count["quarantined"] or count["failed"]:
        return fail_run(summary, outcomes)
    if count["excluded"]:
        summary = f"WARNING: {count['excluded']} studies had nothing to share; {summary}"
        logger.warning(summary)
    return Completed(message=summary, data=outcomes)
