"""The new-study flow: run when an ``orthanc.study.stable`` event arrives, apply routing rules.

Rules are plain configuration (deployment parameters, editable in the UI): each matches on the
study's modalities and on the AET that sent it, and then labels the study, forwards it to a
DICOM modality or an Orthanc peer, or shares a de-identified copy (the sharing flow, as a
subflow). Once every matched rule succeeded the study is marked with its LastUpdate, so a
second event for the same stable study (after Prefect's own 30-minute de-duplication) changes
nothing, while a study that grew and became stable again is routed again.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from prefect import State, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_orthanc.flows.sharing import SharingOptions, share_studies
from prefect_orthanc.flows.states import fail_run
from prefect_orthanc.orthanc_client import Level, OrthancNotFound
from prefect_orthanc.tasks import OrthancCredentials, orthanc_task, store_to_modality, store_to_peer
from prefect_orthanc.tasks.credentials import load_credentials
from prefect_orthanc.tasks.labels import LABEL_PATTERN, LABELS_METADATA, attach_labels
from prefect_orthanc.tasks.origin import Origin, study_origin
from prefect_orthanc.tasks.policy import orthanc_flow, short_id, shown_error

__all__ = [
    "LABELS_METADATA",
    "ROUTED_METADATA",
    "RouteReport",
    "RouteRule",
    "StudyFacts",
    "SweepReport",
    "inspect_study",
    "label_study",
    "route_new_study",
    "sweep_failed_routes",
]

#: LastUpdate of the study when its rules last all succeeded (declare in UserMetadata)
ROUTED_METADATA = "PrefectOrthancRouted"


class RouteRule(BaseModel):
    """One routing rule: when the study matches, do one action."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$", description="Shown in run summaries.")
    action: Literal["label", "forward", "share"] = Field(
        description="label: tag the study; forward: send it to a modality or peer; share: "
                    "de-identify it and deliver it (the sharing flow's checks included).")
    modalities: list[str] = Field(default_factory=list, description="Match studies holding "
                                  "any of these modalities, e.g. CT, MR (empty = any).")
    calling_aets: list[str] = Field(default_factory=list, description="Match studies sent by "
                                    "one of these AETs (empty = any sender).")
    labels: list[str] = Field(default_factory=list, description="For label: the labels to "
                              "add.")
    target_kind: Literal["modality", "peer"] = Field("modality", description="For forward: "
                                                     "a DICOM modality or an Orthanc peer.")
    target: str = Field("", description="For forward: the modality or peer name, as "
                        "configured in the research Orthanc.")
    share: SharingOptions | None = Field(None, description="For share: where the "
                                         "de-identified copy goes and how it is made.")

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value if v.strip()]

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str]) -> list[str]:
        if any(not re.fullmatch(LABEL_PATTERN, v) for v in value):
            raise ValueError("labels are 1-64 letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _complete(self) -> RouteRule:
        needed = {"label": bool(self.labels), "forward": bool(self.target),
                  "share": self.share is not None}
        if not needed[self.action]:
            what = {"label": "labels", "forward": "target", "share": "share"}[self.action]
            raise ValueError(f"rule {self.name}: action {self.action} needs {what}")
        return self

    def matches(self, facts: StudyFacts) -> bool:
        if self.modalities and not set(self.modalities) & set(facts.modalities):
            return False
        return not (self.calling_aets and facts.calling_aet not in self.calling_aets)


class StudyFacts(BaseModel):
    """What the rules match on. Held in memory only (never persisted, never logged)."""

    model_config = ConfigDict(frozen=True)

    study_id: str
    last_update: str
    instances: int
    modalities: tuple[str, ...] = Field((), repr=False)
    calling_aet: str | None = Field(None, repr=False)
    routed_at: str | None = None
    origin: Origin = "received"


class RouteReport(BaseModel):
    """Outcome: rule names and counts, no values."""

    study_id: str
    matched: tuple[str, ...] = ()
    done: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    skipped: bool = False


@orthanc_task(name="inspect_study", run_name=lambda p: f"inspect-{short_id(p['study_id'])}")
def inspect_study(credentials: OrthancCredentials, study_id: str) -> StudyFacts | None:
    """The facts routing rules match on, or None when the study is gone.

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        study_id: Orthanc ID of the study.

    Returns:
        The study's ``StudyFacts`` (instance count, modalities, the sender's AET, when it was
        last routed, where it came from), or None when the study is gone.

    Raises:
        OrthancError: The research Orthanc did not answer or refused (retried by Prefect when
            transient).
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        facts = inspect_study(creds, study_id)
        ```
    """
    with credentials.get_client() as orthanc:
        try:
            study = orthanc.resource(Level.STUDY, study_id)
        except OrthancNotFound:
            return None
        metadata = orthanc.all_metadata(Level.STUDY, study_id)
        series = orthanc.children(Level.STUDY, study_id)
        instances = orthanc.instances(Level.STUDY, study_id)
        sender = orthanc.metadata(Level.INSTANCE, instances[0], "RemoteAET") if instances else None
        return StudyFacts(
            study_id=study_id, last_update=study.last_update or "", instances=len(instances),
            modalities=tuple(sorted({s.main_dicom_tags.get("Modality", "") for s in series}
                                    - {""})),
            calling_aet=sender, routed_at=metadata.get(ROUTED_METADATA),
            origin=study_origin(metadata, study.main_dicom_tags.get("StudyInstanceUID")))


@orthanc_task(name="label_study", run_name=lambda p: f"label-{short_id(p['study_id'])}")
def label_study(credentials: OrthancCredentials, study_id: str, labels: Sequence[str]) -> str:
    """Label a study, keeping its other labels: Orthanc labels from 1.12, else the
    ``PrefectOrthancLabels`` metadata set (``tasks.labels``). Returns which one was used.

    Args:
        credentials: The research Orthanc (``OrthancCredentials`` block).
        study_id: Orthanc ID of the study.
        labels: Labels to attach: 1-64 letters, digits, ``-`` or ``_`` each.

    Returns:
        ``"label"`` or ``"metadata"``, how the labels were stored.

    Raises:
        OrthancUsageError: A label is not 1-64 letters, digits, ``-`` or ``_``.
        OrthancNotFound: The study does not exist.
        OrthancConflict: The label set kept changing under concurrent writers.
        TaskFailure: Any other error, its message withheld (it may hold patient data).

    Example:
        ```python
        label_study(creds, study_id, ["new", "ct"])
        ```
    """
    with credentials.get_client() as orthanc:
        return attach_labels(orthanc, Level.STUDY, study_id, labels)


@orthanc_task(name="mark_routed", run_name=lambda p: f"routed-{short_id(p['study_id'])}")
def mark_routed(credentials: OrthancCredentials, study_id: str, last_update: str) -> None:
    """Record that the study's rules all succeeded at this LastUpdate."""
    with credentials.get_client() as orthanc:
        orthanc.set_metadata(Level.STUDY, study_id, ROUTED_METADATA, last_update)


def _apply(rule: RouteRule, credentials: OrthancCredentials, credentials_block: str | None,
           study_id: str) -> bool:
    if rule.action == "label":
        label_study(credentials, study_id, rule.labels)
    elif rule.action == "forward" and rule.target_kind == "modality":
        store_to_modality(credentials, rule.target, [study_id])
    elif rule.action == "forward":
        store_to_peer(credentials, rule.target, [study_id])
    else:
        assert rule.share is not None
        options = {name: getattr(rule.share, name) for name in SharingOptions.model_fields}
        state = share_studies(study_ids=[study_id], credentials_block=credentials_block,
                              **options, return_state=True)
        return state.is_completed()
    return True


@orthanc_flow(name="route-new-study", flow_run_name="new-study-{study_id}",
              validate_parameters=True)
def route_new_study(study_id: str, rules: list[RouteRule] | None = None, server: str = "research",
                    credentials_block: str | None = None, include_retrieved: bool = False,
                    include_copies: bool = False) -> State[RouteReport]:
    """Apply the routing rules to one new stable study (the trigger passes its Orthanc ID).

    Not every stable study is new (``tasks.origin``): studies this package retrieved itself
    (the collection flow's C-MOVEs) are skipped unless ``include_retrieved``, and copies made
    inside Orthanc by anonymize/modify (the sharing flow's de-identified copies) unless
    ``include_copies``. A skipped study ends the run Completed, no rule applied.

    Rules run in order; a failing rule does not stop the others, but the study is then not
    marked routed and the run fails, so a re-run retries (labels and forwards are idempotent,
    sharing keeps a ledger).

    Example:
        ```python
        route_new_study("27f7126f-4f66ab19-6d2fbc77-3b9e1bd4-5cbc3bbf",
                        rules=[RouteRule(name="tag", action="label", labels=["new"])])
        ```

    Args:
        study_id: Orthanc ID of the new stable study (the event trigger fills it in).
        rules: The routing rules, applied in order (replaced whole by an override).
        server: Name of the research Orthanc in the events this flow answers.
        credentials_block: Name of the OrthancCredentials block of the research Orthanc
            (empty: the ORTHANC_* environment variables).
        include_retrieved: Also route studies this package retrieved itself (the collection
            flow's C-MOVEs); off by default, since they are not new studies.
        include_copies: Also route copies made inside Orthanc by anonymize/modify (e.g. the
            sharing flow's de-identified copies); off by default.

    Returns:
        The run's final state, its data a ``RouteReport`` (rule names matched, done and failed,
        or ``skipped``). Completed when every matched rule succeeded or the study was skipped
        (gone, retrieved by this package, a copy made in Orthanc, already routed at its
        LastUpdate); Failed when a rule failed (the study is not marked routed).

    Raises:
        ValueError: ``credentials_block`` names no saved ``OrthancCredentials`` block.
        OrthancError: The research Orthanc did not answer or refused while the study was
            inspected or marked routed (after the tasks' retries).
    """
    logger = get_run_logger()
    credentials = load_credentials(credentials_block)
    facts = inspect_study(credentials, study_id)
    if facts is None:
        return Completed(message="study no longer in Orthanc: nothing to do",
                         data=RouteReport(study_id=study_id, skipped=True))
    if facts.origin == "retrieved" and not include_retrieved:
        return Completed(message="retrieved by this package (e.g. the collection flow), not a "
                                 "new study: skipped (set include_retrieved to route it)",
                         data=RouteReport(study_id=study_id, skipped=True))
    if facts.origin == "copy" and not include_copies:
        return Completed(message="an anonymized or modified copy made in Orthanc, not a new "
                                 "study: skipped (set include_copies to route it)",
                         data=RouteReport(study_id=study_id, skipped=True))
    if facts.routed_at and facts.routed_at == facts.last_update:
        return Completed(message="already routed at this LastUpdate: nothing to do",
                         data=RouteReport(study_id=study_id, skipped=True))
    matched = [rule for rule in rules or [] if rule.matches(facts)]
    done: list[str] = []
    failed: list[str] = []
    for rule in matched:
        try:
            ok = _apply(rule, credentials, credentials_block, study_id)
        except Exception as exc:
            shown = shown_error(f"rule {rule.name}", exc)  # a safe message, or the type only
            logger.warning("rule %s failed: %s: %s", rule.name, type(shown).__name__, shown)
            ok = False
        (done if ok else failed).append(rule.name)
    report = RouteReport(study_id=study_id, matched=tuple(r.name for r in matched),
                         done=tuple(done), failed=tuple(failed))
    summary = (f"study {short_id(study_id)} ({facts.instances} instances): "
               f"{len(matched)}/{len(rules or [])} rules matched, {len(done)} done, "
               f"{len(failed)} failed")
    create_markdown_artifact(
        key="new-study-routing",
        markdown="\n".join([f"**{summary}**", "", "| rule | outcome |", "|---|---|",
                            *[f"| {r.name} | {'done' if r.name in done else 'failed'} |"
                              for r in matched]]),
        description="Routing of a new stable study (rule names only).")
    logger.info(summary)
    if failed:
        return fail_run(summary, report)
    mark_routed(credentials, study_id, facts.last_update)
    return Completed(message=summary, data=report)


class SweepReport(BaseModel):
    """What one sweep did: counts of studies, no identifiers."""

    failed_runs: int
    studies: int
    routed: int
    still_failing: int


def _failed_routes(lookback_hours: float) -> dict[str, dict[str, Any]]:
    """study_id -> the parameters of its latest route-new-study run, for the studies whose
    latest run in the look-back window failed (a later success means nothing to redo)."""
    import asyncio
    import datetime as dt

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.sorting import FlowRunSort

    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=lookback_hours)

    async def read() -> list[FlowRun]:
        async with get_client() as client:
            return await client.read_flow_runs(
                flow_filter=FlowFilter(name={"any_": ["route-new-study"]}),
                flow_run_filter=FlowRunFilter(start_time={"after_": since},
                                              state={"type": {"any_": ["COMPLETED", "FAILED",
                                                                       "CRASHED"]}}),
                sort=FlowRunSort.START_TIME_DESC, limit=200)

    latest: dict[str, Any] = {}
    for run in asyncio.run(read()):
        study_id = run.parameters.get("study_id")
        if study_id and study_id not in latest:
            latest[study_id] = run
    return {study_id: dict(run.parameters) for study_id, run in latest.items()
            if run.state and run.state.type.value in ("FAILED", "CRASHED")}


@orthanc_flow(name="sweep-failed-routes", flow_run_name="sweep-routes", validate_parameters=True)
def sweep_failed_routes(lookback_hours: float = 24.0) -> State[SweepReport]:
    """Route again every study whose latest ``route-new-study`` run (within ``lookback_hours``)
    failed, with that run's own parameters (same rules), one subflow each. Run it on a schedule
    (e.g. every 15 minutes): a partner down for an hour gets its studies when it returns, once
    each (the new-study flow skips a study already routed at its LastUpdate, and a sweep only
    picks studies whose latest run failed).

    Example:
        ```python
        sweep_failed_routes(lookback_hours=6)
        ```

    Args:
        lookback_hours: How far back to look for failed route-new-study runs, in hours.

    Returns:
        The run's final state, its data a ``SweepReport`` (counts of studies found with a
        failed route, routed again, still failing): Completed when every study was routed,
        Failed when some still fail.

    Raises:
        httpx.HTTPError: The Prefect API did not answer or refused while the failed runs were
            listed.
    """
    logger = get_run_logger()
    todo = _failed_routes(lookback_hours)
    routed = failing = 0
    for parameters in todo.values():
        state = route_new_study(**parameters, return_state=True)
        if state.is_completed():
            routed += 1
        else:
            failing += 1
    report = SweepReport(failed_runs=len(todo), studies=len(todo), routed=routed,
                         still_failing=failing)
    summary = f"{len(todo)} studies with a failed route: {routed} routed, {failing} still failing"
    logger.info(summary)
    if failing:
        return fail_run(summary, report)
    return Completed(message=summary, data=report)
