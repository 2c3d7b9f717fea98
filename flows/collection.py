"""Research data collection: a cohort in, exactly those studies in the research Orthanc, verified.

Plan first (every row resolved by C-FIND, nothing moved), then retrieve only what is missing,
one task per study, within the PACS's global concurrency limit and the allowed hours (every
PACS exchange of the run, planning included, passes ``flows.window``'s gate); each
study is counted against the PACS and marked collected only when complete. Re-running the same
cohort moves nothing that is already complete, so an interrupted run is finished by re-running.

Example:
    ```python
    from prefect_orthanc.flows.collection import collect_cohort

    collect_cohort(cohort_file="cohorts/lung.csv", project="lung-2026",  # under the data dir
                   credentials_block="research")  # the block `setup` saved (None: ORTHANC_*)
    ```
"""

from __future__ import annotations

import contextlib
import csv
import functools
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import State, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from prefect_orthanc.flows.cohort import CollectionRequest, Criteria, TimeWindow
from prefect_orthanc.flows.cohort_file import (
    CohortFile,
    CohortRow,
    resolve_cohort_file,
)
from prefect_orthanc.flows.parameters import described_by, request_from
from prefect_orthanc.flows.planning import PlanRow, RowStatus, plan_criteria, plan_rows
from prefect_orthanc.flows.site import SiteError, SiteSettings
from prefect_orthanc.flows.states import cancel_run, fail_run, stop_run
from prefect_orthanc.flows.window import OutsideWindow, admit, window_gate
from prefect_orthanc.orthanc_client import (
    Level,
    Orthanc,
    OrthancError,
    RetrieveOutcome,
    RetrieveResult,
    SafeMessageError,
)
from prefect_orthanc.tasks import (
    OrthancCredentials,
    UnknownModality,
    load_credentials,
    modality_slot,
    orthanc_task,
    require_modality,
    retrieve_study,
)
from prefect_orthanc.tasks.labels import attach_labels
from prefect_orthanc.tasks.origin import end_retrievals_left_behind
from prefect_orthanc.tasks.policy import orthanc_flow
from prefect_orthanc.tasks.slots import release_idle

__all__ = ["CollectionReport", "collect_cohort", "mark_collected", "plan_cohort"]


@orthanc_task(name="plan_cohort", run_name=lambda p: f"plan-{p['request'].source_modality}",
              retries=2)
def plan_cohort(credentials: OrthancCredentials, request: CollectionRequest,
                rows: Sequence[CohortRow] | None = None) -> list[PlanRow]:
    """Resolve the cohort (checked file rows, or the criteria) against the PACS; moves nothing.

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        request: The checked collection request: ``source_modality``, ``criteria`` and ``find_cap``
            are read.
        rows: The cohort file's rows (``read_cohort``); None plans ``request.criteria`` instead.

    Returns:
        One ``PlanRow`` per cohort row (or, for criteria, per study the PACS answered), each with
        its status (``found``, ``not_found``, ``ambiguous``, ``already_present``, ``duplicate``,
        ``too_many_matches``, ``excluded``, ``query_failed``) and the studies it matched.

    Raises:
        UnknownModality: The research Orthanc knows no modality named ``request.source_modality``.
        ModalityLimitMissing: The source modality has no concurrency limit.
        SlotWaitExceeded: No slot of the source modality's limit became free in time.
        CohortTooBroad: Criteria whose C-FIND returns the PACS's cap even for a single day.
        OrthancDimseError: The PACS did not answer or refused a query (transient ones are retried
            by Prefect first); a row whose own query is refused is ``query_failed`` instead.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        request = CollectionRequest(cohort_file="cohort.csv")
        plan = plan_cohort(creds, request, read_cohort(request.cohort_file))  # flows.cohort_file
        ```
    """
    with credentials.get_client() as orthanc:
        require_modality(orthanc, request.source_modality)
        modality = request.source_modality
        slot = functools.partial(modality_slot, modality)  # shared: kept for the moves
        if rows is not None:
            return plan_rows(orthanc, modality, rows, request.find_cap,
                             concurrency=request.concurrency, slot=slot)
        assert request.criteria is not None
        return plan_criteria(orthanc, modality, request.criteria, request.find_cap,
                             concurrency=request.concurrency, slot=slot)


def _mark(orthanc: Orthanc, study_id: str, project: str) -> str:
    return attach_labels(orthanc, Level.STUDY, study_id, [project])


@orthanc_task(name="mark_collected", run_name=lambda p: f"mark-{len(p['study_ids'])}")
def mark_collected(credentials: OrthancCredentials, study_ids: Sequence[str],
                   project: str) -> str:
    """Add ``project`` to the projects of complete studies (a study keeps the others): an
    Orthanc label from 1.12, else the ``PrefectOrthancLabels`` metadata set (declare it in
    Orthanc's ``UserMetadata``); see ``tasks.labels``. Returns "label" or "metadata".

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        study_ids: Orthanc IDs of the studies to mark.
        project: The project's name: 1-64 letters, digits, ``-`` or ``_``.

    Returns:
        ``"label"`` or ``"metadata"``, how the project was recorded (``""`` when ``study_ids`` is
        empty).

    Raises:
        OrthancUsageError: ``project`` is not a valid label.
        OrthancNotFound: A study does not exist.
        OrthancConflict: A study's project set kept changing under concurrent writers.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        mark_collected(creds, result.study_ids, "lung-2026")
        ```
    """
    with credentials.get_client() as orthanc:
        how = ""
        for study_id in study_ids:
            how = _mark(orthanc, study_id, project)
        return how


class RowReport(BaseModel):
    """The outcome of one cohort row: counts and Orthanc IDs, no patient identifiers.
    ``index`` is the row's line number in the cohort file (a criteria cohort: the C-FIND
    answer's number)."""

    model_config = ConfigDict(frozen=True)

    index: int
    status: str
    studies: int = 0
    expected_instances: int = 0
    received_instances: int = 0
    moved: int = 0
    study_ids: tuple[str, ...] = ()
    note: str = ""


class CollectionReport(BaseModel):
    """What a collection run did: one ``RowReport`` per plan row, studies found, complete and
    moved, studies deferred by the time window, and the report CSV's path. No identifiers."""

    model_config = ConfigDict(frozen=True)

    rows: tuple[RowReport, ...]
    studies_found: int
    studies_complete: int
    studies_moved: int
    deferred: int
    report_path: str | None

    @property
    def complete(self) -> bool:
        return self.studies_complete == self.studies_found and not self.deferred


def _row_report(row: PlanRow, results: dict[str, RetrieveResult], deferred: set[str]) -> RowReport:
    if row.status in (RowStatus.NOT_FOUND, RowStatus.AMBIGUOUS, RowStatus.DUPLICATE,
                      RowStatus.TOO_MANY, RowStatus.EXCLUDED, RowStatus.QUERY_FAILED):
        return RowReport(index=row.index, status=row.status.value, note=row.note)
    mine = [results[s.key] for s in row.studies if s.key in results]
    waiting = [s for s in row.studies if s.key in deferred]
    complete = sum(r.complete for r in mine)
    if waiting:
        status = "deferred"
    elif row.status is RowStatus.ALREADY_PRESENT and all(not r.moved for r in mine):
        status = "already_present"
    elif complete == len(row.studies):
        status = "collected"
    else:
        worst = [r.outcome.value for r in mine if not r.complete]
        status = worst[0] if worst else "incomplete"
    return RowReport(
        index=row.index, status=status, studies=len(row.studies),
        expected_instances=sum(r.expected_instances or 0 for r in mine),
        received_instances=sum(r.received_instances for r in mine),
        moved=sum(r.moved for r in mine),
        study_ids=tuple(i for r in mine for i in r.study_ids),
        # the reason code first, then what to fix (no values): "move_destination_unknown: ..."
        note="; ".join([row.note] * bool(row.note) + [f"{r.reason}: {r.failure}" for r in mine
                                                      if r.reason and not r.complete]),
    )


def _publish(request: CollectionRequest, cohort: CohortFile | None,
             reports: Sequence[RowReport]) -> Path:
    """The run's report: the CSV (``_write_csv``) and the ``collection-report`` table
    artifact (counts and statuses, no identifiers, no Orthanc IDs). Returns the CSV's path."""
    from prefect.runtime import flow_run

    path = _write_csv(request, cohort, reports, str(flow_run.get_id() or "local"))
    create_table_artifact(
        key="collection-report",
        table=[{k: v for k, v in r.model_dump().items() if k != "study_ids"} for r in reports],
        description=f"Collection of project {request.project}: per-row outcome (a row is "
                    f"its line number in the cohort file; no identifiers here).")
    return path


#: the report's result columns, prefixed: never clash with the user's own
REPORT_COLUMNS = ["result_" + name for name in ("row", "status", "studies", "expected_instances",
                                                "received_instances", "moved",
                                                "orthanc_study_ids", "note")]


def _write_csv(request: CollectionRequest, cohort: CohortFile | None,
               reports: Sequence[RowReport], run_id: str) -> Path:
    """The full per-row outcome. For a cohort file, the file itself line for line with the
    result columns added, in its own delimiter, encoding and line ends, next to it
    (``<name>.report<suffix>``: it holds the user's identifiers, keep it where the cohort is
    kept); ``result_row`` is the row's line number. For criteria, one row per answer and no
    identifiers."""
    results = {r.index: [r.index, r.status, r.studies, r.expected_instances,
                         r.received_instances, r.moved, " ".join(r.study_ids), r.note]
               for r in reports}
    if cohort is not None:
        path = cohort.path.with_name(f"{cohort.path.stem}.report{cohort.path.suffix}")
        return cohort.write_report(path, REPORT_COLUMNS, results)
    path = Path(request.report_dir) / f"collection-{run_id}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(REPORT_COLUMNS)
        writer.writerows(results.values())
    tmp.replace(path)
    return path


def _checked_request(values: dict[str, Any]) -> tuple[CollectionRequest, CohortFile | None]:
    """The request with absolute paths, and the cohort file as read; ``ValueError`` (one line,
    no cell values) for anything that would only fail later. Touches no server."""
    request = request_from(CollectionRequest, values)
    site = SiteSettings.load()
    updates = {"report_dir": str(site.path(request.report_dir, "report_dir"))}
    cohort = None
    if request.cohort_file:
        path = resolve_cohort_file(request.cohort_file)
        updates["cohort_file"] = str(path)
        cohort = CohortFile.read(path)  # a malformed file: every bad line and column named
    return request.model_copy(update=updates), cohort


@orthanc_flow(name="collect-research-cohort", flow_run_name="collect-{project}",
      task_runner=ThreadPoolTaskRunner(max_workers=32),
      validate_parameters=True)
@described_by(CollectionRequest, credentials_block="Name of the OrthancCredentials block of "
              "the research Orthanc (empty: the ORTHANC_* environment variables).")
def collect_cohort(
    cohort_file: str | None = None,
    criteria: Criteria | None = None,
    project: str = "research",
    source_modality: str = "pacs",
    time_window: TimeWindow | None = None,
    concurrency: int = 4,
    dry_run: bool = False,
    find_cap: int = 0,
    job_timeout: float = 3600,
    report_dir: str = "reports",
    credentials_block: str | None = None,
) -> State[CollectionReport]:
    """Bring a research cohort from the PACS into the research Orthanc, verified complete.

    Give a cohort file or criteria; every other parameter has a default, so a deployment
    run that overrides one (``--param cohort_file=cohorts/lung.csv``) keeps the others. Ends
    Completed only when every study found is complete; Failed (with a summary) when any is
    not, or, before the PACS is touched, when the parameters or the cohort file are unusable
    (a one-line message naming what to fix); Cancelled when the time window closed first
    (re-run to continue).

    Returns:
        The run's final state, its data a ``CollectionReport`` (one row per plan row with
        counts and Orthanc IDs, studies found, complete and moved, rows deferred, the report's
        path). Completed, Failed or Cancelled as above; operational errors (the PACS down, a
        slot wait past its bound) end the run Failed with a one-line message, not an exception.

    Raises:
        CredentialsBlockMissing: ``credentials_block`` names no saved ``OrthancCredentials``
            block (the message names it and how to create one).
        OrthancError: The research Orthanc did not answer, or refused the credentials, when the
            run started.

    Example:
        ```python
        collect_cohort(cohort_file="cohorts/lung.csv", project="lung-2026", concurrency=4,
                       credentials_block="research",  # the block `setup` saved
                       time_window=TimeWindow(start="19:00", end="07:00",
                                              timezone="Europe/Brussels"))
        ```
    """
    values = dict(locals())
    try:
        request, cohort = _checked_request(values)
    except (ValueError, SiteError) as error:  # CohortError too: one line, nothing touched
        get_run_logger().error("collection not started: %s", error)
        return fail_run(f"collection not started: {error}")
    if cohort is not None:  # what was not read as a row, said (counts only, no values)
        kinds = Counter(record.kind for record in cohort.records)
        get_run_logger().info("cohort %s: %d rows; not read: %d line(s) before the header, "
                              "%d blank, %d comment (#)", cohort.path.name, len(cohort.rows),
                              kinds["preamble"], kinds["blank"], kinds["comment"])
        if cohort.extra_columns:  # header names only, never cells
            get_run_logger().warning("cohort %s: columns carried along unread: %s",
                                  cohort.path.name, ", ".join(cohort.extra_columns))
    return _collect(request, cohort, credentials_block)


def _collect(request: CollectionRequest, cohort: CohortFile | None,
             credentials_block: str | None) -> State[CollectionReport]:
    logger = get_run_logger()
    credentials = load_credentials(credentials_block)
    try:  # a typo in the modality is reported as such, before its concurrency limit
        with credentials.get_client() as orthanc:
            require_modality(orthanc, request.source_modality)
    except UnknownModality as error:
        logger.error("collection not started: %s", error)
        return fail_run(f"collection not started: {error}")
    with window_gate(request.time_window):  # every PACS exchange below, in every task
        try:
            rows = list(cohort.rows) if cohort else None
            try:
                plan = _plan(credentials, request, rows)
            except OutsideWindow as error:
                return _not_planned(request, cohort, error)
            return _run_plan(credentials, request, cohort, plan)
        except SafeMessageError as error:  # e.g. SlotWaitExceeded: one line, what to fix
            return stop_run("collection stopped", error)


#: planning attempts when the window closes during planning and outside="wait"
PLAN_ATTEMPTS = 3


def _plan(credentials: OrthancCredentials, request: CollectionRequest,
          rows: list[CohortRow] | None) -> list[PlanRow]:
    """The plan, planned while the window is open; ``OutsideWindow`` when it is closed (and
    ``outside="stop"``, or it would not open within ``max_wait_hours``)."""
    logger = get_run_logger()
    for attempt in range(1, PLAN_ATTEMPTS + 1):
        admit(request.time_window, log=logger)  # waits, or raises: nothing sent yet
        try:
            return plan_cohort(credentials, request, rows)
        except OutsideWindow:
            if attempt == PLAN_ATTEMPTS:
                raise
            logger.warning("the transfer window closed during planning: planning again when "
                           "it opens")
    raise AssertionError("unreachable")


def _not_planned(request: CollectionRequest, cohort: CohortFile | None,
                 error: OutsideWindow) -> State[CollectionReport]:
    """Cancelled before (or during) planning: every row deferred, nothing moved."""
    reports = [RowReport(index=row.index, status="deferred",
                         note="outside the transfer window: not queried")
               for row in (cohort.rows if cohort else ())]
    path = _publish(request, cohort, reports)
    report = CollectionReport(rows=tuple(reports), studies_found=0, studies_complete=0,
                              studies_moved=0, deferred=len(reports), report_path=str(path))
    message = f"not planned: {error}; re-run inside the window (report {path.name})"
    get_run_logger().warning(message)
    return cancel_run(message, report)


def _run_plan(credentials: OrthancCredentials, request: CollectionRequest,
              cohort: CohortFile | None, plan: list[PlanRow]) -> State[CollectionReport]:
    logger = get_run_logger()
    todo = {s.key: s for row in plan if row.status is RowStatus.FOUND
            for s in row.studies if not s.present}
    present = {s.key: s for row in plan if row.status in (RowStatus.FOUND,
                                                          RowStatus.ALREADY_PRESENT)
               for s in row.studies if s.present}
    counts = {status: sum(r.status is status for r in plan) for status in RowStatus}
    logger.info("plan: %d rows, %s; %d studies to move, %d already here", len(plan),
                ", ".join(f"{k.value}={v}" for k, v in counts.items() if v), len(todo),
                len(present))

    results: dict[str, RetrieveResult] = {
        key: RetrieveResult(key=key, outcome=RetrieveOutcome.ALREADY_PRESENT,
                           expected_instances=s.expected, received_instances=s.expected or 0)
        for key, s in present.items()}
    deferred: set[str] = set()
    if not request.dry_run:
        results |= _retrieve_all(credentials, request, list(todo.values()), deferred)
        _mark_present(credentials, request, results, present)

    reports = [_row_report(row, results, deferred) for row in plan] if not request.dry_run \
        else [RowReport(index=r.index, status=r.status.value, studies=len(r.studies),
                        expected_instances=sum(s.expected or 0 for s in r.studies),
                        note=r.note) for r in plan]
    path = _publish(request, cohort, reports)
    found = sum(len(r.studies) for r in plan if r.status in (RowStatus.FOUND,
                                                             RowStatus.ALREADY_PRESENT))
    complete = sum(r.complete for r in results.values())
    report = CollectionReport(rows=tuple(reports), studies_found=found,
                              studies_complete=complete,
                              studies_moved=sum(r.moved for r in results.values()),
                              deferred=len(deferred), report_path=str(path))
    summary = (f"{complete}/{found} studies complete, {report.studies_moved} moved, "
               f"{len(deferred)} deferred; not found {counts[RowStatus.NOT_FOUND]}, "
               f"ambiguous {counts[RowStatus.AMBIGUOUS]}; report {path.name}")
    if counts[RowStatus.QUERY_FAILED]:
        summary += (f"; {counts[RowStatus.QUERY_FAILED]} row(s) could not be queried (see "
                    f"the report)")
    if plan and not found and not counts[RowStatus.QUERY_FAILED]:
        summary = (f"nothing found: no row matched a study on {request.source_modality} "
                   f"(check the cohort's identifiers and source_modality); {summary}")
        logger.warning(summary)
    # the outcome in one line, at a level that reaches the run's logs whatever the site's
    # PREFECT_LOGGING_LEVEL (Prefect's own "Finished in state" line is INFO)
    if request.dry_run:
        logger.info("dry run: %s", summary)
        return Completed(message=f"dry run: {summary}", data=report)
    if deferred:
        message = f"time window closed: {summary}; re-run to continue"
        logger.warning(message)
        return cancel_run(message, report)
    if complete < found or counts[RowStatus.QUERY_FAILED]:
        logger.error("collection incomplete: %s", summary)
        return fail_run(summary, report)
    logger.info(summary)
    return Completed(message=summary, data=report)


#: at most one progress update per this many seconds (each is a write to the Prefect API)
PROGRESS_SECONDS = 2.0


def _retrieve_all(credentials: OrthancCredentials, request: CollectionRequest,
                  studies: list[Any], deferred: set[str]) -> dict[str, RetrieveResult]:
    results: dict[str, RetrieveResult] = {}
    if not studies:
        return results
    progress = cast(UUID, create_progress_artifact(  # synchronous here (not a coroutine)
        progress=0.0, key="collection-progress",
        description="Studies of this run retrieved so far."))
    pending = list(studies)
    in_flight: dict[PrefectFuture[RetrieveResult], Any] = {}
    unmarked: list[str] = []  # complete, to mark in this thread once the next moves are sent
    to_mark: list[str] = []  # their marking failed here: the mark_collected task retries
    done = shown = 0
    shown_at = time.monotonic()
    window_open = True
    with contextlib.ExitStack() as stack:
        orthanc = stack.enter_context(credentials.get_client())
        stack.callback(release_idle)  # this run's PACS slots go back now, not after the linger
        while pending or in_flight:
            while pending and len(in_flight) < request.concurrency and window_open:
                try:
                    admit(request.time_window, log=get_run_logger())  # may wait for the window
                except OutsideWindow:
                    window_open = False
                    break
                study = pending.pop(0)
                future = retrieve_study.submit(credentials, request.source_modality, study.uid,
                                               job_timeout=request.job_timeout)
                in_flight[future] = study
            if not window_open:
                deferred.update(s.key for s in pending)
                pending.clear()
            # the next moves are under way: now the bookkeeping, off their path. Marks are
            # made here as each study completes (a few ms of Orthanc calls; a task run per
            # study was a run and its state writes on the Prefect server per study)
            if unmarked:
                to_mark += _mark_here(orthanc, unmarked, request.project)
                unmarked = []
            if done > shown and time.monotonic() - shown_at >= PROGRESS_SECONDS:
                update_progress_artifact(progress, 100.0 * done / len(studies))
                shown, shown_at = done, time.monotonic()
            if not in_flight:
                break
            finished = next(as_completed(list(in_flight)))
            study = in_flight.pop(finished)
            key = study.key
            try:
                result = finished.result()
            except OutsideWindow:  # the window closed before one of its exchanges: not a failure
                pending.insert(0, study)  # the next admit() waits for the window, or defers it
                continue
            except Exception as error:  # retries exhausted: record it, let the others finish
                result = RetrieveResult(key=key, outcome=RetrieveOutcome.FAILED,
                                       expected_instances=None, received_instances=0,
                                       reason=getattr(error, "reason_code",
                                                      type(error).__name__),
                                       failure=f"{type(error).__name__}: {error}"[:300])
            results[key] = result = _one_patient(result)
            if result.complete:
                unmarked += result.study_ids
            done += 1
        to_mark += _mark_here(orthanc, unmarked, request.project)
    if to_mark:  # a crash before this point is harmless: a re-run marks what's present
        mark_collected(credentials, to_mark, request.project)
    if done > shown:
        update_progress_artifact(progress, 100.0 * done / len(studies))
    return results


def _mark_here(orthanc: Orthanc, study_ids: Sequence[str], project: str) -> list[str]:
    """Mark complete studies for the project in the flow's thread; returns those that could
    not be marked (left to the ``mark_collected`` task and its retries)."""
    for index, study_id in enumerate(study_ids):
        try:
            _mark(orthanc, study_id, project)
        except OrthancError as error:
            get_run_logger().warning("marking a study for the project failed (%s): retried "
                                     "by mark_collected", type(error).__name__)
            return list(study_ids[index:])
    return []


def _mark_present(credentials: OrthancCredentials, request: CollectionRequest,
                  results: dict[str, RetrieveResult], present: dict[str, Any]) -> None:
    """Studies already complete before this run are marked too (idempotent)."""
    if not present:
        return
    with credentials.get_client() as orthanc:
        ids = {key: tuple(orthanc.find(Level.STUDY, {"StudyInstanceUID": s.uid}))
               for key, s in present.items()}
    for key, found in ids.items():
        results[key] = _one_patient(results[key].model_copy(update={"study_ids": found}))
    mark_collected(credentials, [i for key in ids for i in results[key].study_ids
                                 if results[key].complete], request.project)
    # a run killed mid-move left its "being retrieved" records: the studies are here now
    end_retrievals_left_behind(key for key in ids if results[key].complete)


def _one_patient(result: RetrieveResult) -> RetrieveResult:
    """A study that arrived as the studies of several patients (one StudyInstanceUID under
    several PatientIDs at the PACS: a C-MOVE by UID brings them all) is not complete: it is
    not marked for the project, so it is never shared as the cohort's, and the row says why."""
    if not result.complete or len(set(result.study_ids)) <= 1:
        return result
    return result.model_copy(update={
        "outcome": RetrieveOutcome.SEVERAL_PATIENTS, "reason": "several_patients",
        "failure": f"the PACS holds this StudyInstanceUID under {len(set(result.study_ids))} "
                   f"patients; nothing was marked for the project: check the study at the "
                   f"PACS (the studies stay unmarked in research)"})
