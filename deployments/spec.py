"""``prefect.yaml``, read strictly: the one definition of this project's deployments.

``prefect deploy`` ignores keys it does not know (a misspelt ``schedule`` silently deploys
nothing on a timer), so ``load()`` checks every deployment against Prefect's own models *and*
rejects unknown keys, loads each entrypoint, validates the parameters against the flow's
signature and the triggers and schedules against Prefect's classes. ``runner_deployments()``
turns the same entries into ``RunnerDeployment`` objects for ``serve``.

    specs = load()                       # raises SpecError listing every problem
    python -m prefect_orthanc.deployments check          # the same, from the shell
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from prefect_orthanc.deployments.files import PREFECT_YAML
from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["PREFECT_YAML", "DeploymentSpec", "SpecError", "load", "runner_deployments"]

_TOP_LEVEL = {"name", "prefect-version", "build", "push", "pull", "definitions", "deployments"}
_SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "anchor_date", "active", "parameters",
                  "slug", "day_or"}
_STRATEGIES = {"ENQUEUE", "CANCEL_NEW"}


class SpecError(SafeMessageError, ValueError):
    """prefect.yaml is not what it should be; the message lists every problem."""


def _brief(exc: Exception) -> str:
    """A pydantic error as ``loc: msg`` pairs (its default text runs to dozens of lines)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors()
            text = ", ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in items[:3])
            return text + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        except Exception:
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _event_trigger(raw: dict[str, Any]) -> Any:
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger.model_validate({k: v for k, v in raw.items() if k != "type"})


@dataclass
class DeploymentSpec:
    """One deployment of prefect.yaml, checked."""

    name: str
    entrypoint: str
    flow_name: str
    parameters: dict[str, Any]
    description: str = ""
    tags: list[str] = field(default_factory=list)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    concurrency_limit: int | dict[str, Any] | None = None
    triggers: list[dict[str, Any]] = field(default_factory=list)
    work_pool: str | None = None
    enforce_parameter_schema: bool = True
    #: the directory of the prefect.yaml it came from (file entrypoints are relative to it)
    base_dir: Path = field(default_factory=Path.cwd)
    _flow: Any = field(default=None, init=False, repr=False)

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    def load_flow(self) -> Any:
        """The flow object (its module is executed once per spec, not once per use)."""
        if self._flow is None:
            from prefect.flows import load_flow_from_entrypoint

            # module entrypoints (prefect_orthanc.flows.collection:collect_cohort) import the
            # installed package; a file entrypoint of a user's own is read relative to its file
            entrypoint = self.entrypoint
            path, _, func = entrypoint.rpartition(":")
            if path.endswith(".py") and not Path(path).is_absolute():
                entrypoint = f"{self.base_dir / path}:{func}"
            self._flow = load_flow_from_entrypoint(entrypoint)
        return self._flow

    def prefect_schedules(self) -> list[Any]:
        from prefect.schedules import Cron, Interval

        made = []
        for item in self.schedules:
            active = bool(item.get("active", True))
            if "cron" in item:
                made.append(Cron(item["cron"], timezone=item.get("timezone"), active=active,
                                 parameters=item.get("parameters") or {}))
            else:
                made.append(Interval(dt.timedelta(seconds=float(item["interval"])),
                                     timezone=item.get("timezone"), active=active,
                                     parameters=item.get("parameters") or {}))
        return made

    def prefect_triggers(self) -> list[Any]:
        return [_event_trigger(t) for t in self.triggers]

    def prefect_concurrency(self) -> Any:
        from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

        limit = self.concurrency_limit
        if isinstance(limit, dict):
            return ConcurrencyLimitConfig(
                limit=limit["limit"],
                collision_strategy=ConcurrencyLimitStrategy(limit.get("collision_strategy",
                                                                      "ENQUEUE")))
        return limit


def _check_deployment(raw: dict[str, Any], where: str, problems: list[str],
                      base_dir: Path) -> DeploymentSpec | None:
    from prefect.cli.deploy._models import DeploymentConfig

    unknown = set(raw) - set(DeploymentConfig.model_fields)
    if unknown:
        problems.append(f"{where}: unknown keys {sorted(unknown)}")
    try:
        config = DeploymentConfig.model_validate(raw)
    except Exception as exc:
        problems.append(f"{where}: {_brief(exc)}")
        return None
    if not config.name or not config.entrypoint:
        problems.append(f"{where}: name and entrypoint are required")
        return None
    where = f"deployment {config.name!r}"
    spec = DeploymentSpec(
        name=config.name, entrypoint=config.entrypoint, flow_name="",
        parameters=dict(config.parameters), description=config.description or "",
        tags=list(config.tags or []), schedules=[dict(s) for s in raw.get("schedules") or []],
        concurrency_limit=raw.get("concurrency_limit"), triggers=list(config.triggers or []),
        work_pool=config.work_pool.name if config.work_pool else None,
        enforce_parameter_schema=config.enforce_parameter_schema is not False,
        base_dir=base_dir)
    try:
        flow = spec.load_flow()
        spec.flow_name = flow.name
    except Exception as exc:
        problems.append(f"{where}: entrypoint {spec.entrypoint} does not load ({exc})")
        return None
    # Every run must get valid parameters: scheduled and ad-hoc runs get the deployment's,
    # triggered runs get them merged with the trigger's (templates are strings until fired).
    # Flows described by a request model also get its cross-field rules checked (the run
    # would otherwise fail at its start: "give exactly one of cohort_file and criteria").
    from prefect_orthanc.flows.parameters import request_from, request_model

    model = request_model(flow)
    for extra in [t.get("parameters") or {} for t in spec.triggers] or [{}]:
        try:
            flow.validate_parameters({**spec.parameters, **extra})
        except Exception as exc:
            problems.append(f"{where}: parameters do not fit {flow.name}: {exc}")
            continue
        if model is not None:
            try:
                request_from(model, {**spec.parameters, **extra})
            except ValueError as exc:
                problems.append(f"{where}: parameters: {exc}")
    for i, schedule in enumerate(spec.schedules):
        unknown = set(schedule) - _SCHEDULE_KEYS
        if unknown:
            problems.append(f"{where}: schedule {i}: unknown keys {sorted(unknown)}")
        if sum(k in schedule for k in ("cron", "interval", "rrule")) != 1:
            problems.append(f"{where}: schedule {i}: give exactly one of cron, interval, rrule")
        if "rrule" in schedule:
            problems.append(f"{where}: schedule {i}: rrule is not used by this project")
    try:
        spec.prefect_schedules()
    except Exception as exc:
        problems.append(f"{where}: schedules: {_brief(exc)}")
    limit = spec.concurrency_limit
    if isinstance(limit, dict):
        if set(limit) - {"limit", "collision_strategy", "grace_period_seconds"}:
            problems.append(f"{where}: concurrency_limit: unknown keys")
        if limit.get("collision_strategy", "ENQUEUE") not in _STRATEGIES:
            problems.append(f"{where}: collision_strategy is one of {sorted(_STRATEGIES)}")
        if not isinstance(limit.get("limit"), int) or limit["limit"] < 1:
            problems.append(f"{where}: concurrency_limit.limit is a positive integer")
    elif limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"{where}: concurrency_limit is a positive integer")
    for i, trigger in enumerate(spec.triggers):
        if trigger.get("type", "event") != "event":
            problems.append(f"{where}: trigger {i}: only event triggers are used here")
        try:
            made = _event_trigger(trigger)
        except Exception as exc:
            problems.append(f"{where}: trigger {i}: {_brief(exc)}")
            continue
        params = set((made.parameters or {}).keys())
        if params - set(flow.parameters.properties):
            problems.append(f"{where}: trigger {i}: parameters {sorted(params)} are not all "
                            f"parameters of {flow.name}")
    return spec


def load(path: str | Path | Traversable = PREFECT_YAML) -> list[DeploymentSpec]:
    """Read and check a prefect.yaml (default: the shipped one); raise ``SpecError`` naming
    every problem found. File entrypoints (``flows/mine.py:my_flow``) are relative to the
    file's directory."""
    source = Path(path) if isinstance(path, str | os.PathLike) else path
    with source.open(encoding="utf-8") as stream:  # a YAML error then names the file
        raw = yaml.safe_load(stream)
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: not a mapping")
    unknown = set(raw) - _TOP_LEVEL
    if unknown:
        problems.append(f"top level: unknown keys {sorted(unknown)}")
    from prefect.cli.deploy._models import PrefectYamlModel

    try:
        PrefectYamlModel.model_validate(raw)
    except Exception as exc:
        problems.append(f"top level: {_brief(exc)}")
    specs = []
    names: set[str] = set()
    for i, item in enumerate(raw.get("deployments") or []):
        spec = _check_deployment(item if isinstance(item, dict) else {}, f"deployment #{i}",
                                 problems, Path(str(source)).resolve().parent)
        if spec is None:
            continue
        if spec.full_name in names:
            problems.append(f"deployment {spec.name!r}: {spec.full_name} defined twice")
        names.add(spec.full_name)
        specs.append(spec)
    if not specs and not problems:
        problems.append("no deployments")
    if problems:
        raise SpecError(f"{path}: " + "; ".join(problems))
    return specs


def runner_deployments(specs: list[DeploymentSpec] | None = None) -> list[Any]:
    """``RunnerDeployment`` objects for ``serve`` (no work pool: the serving process runs them)."""
    made = []
    for spec in specs if specs is not None else load():
        flow = spec.load_flow()
        made.append(flow.to_deployment(
            name=spec.name, description=spec.description or None, tags=spec.tags,
            parameters=spec.parameters, schedules=spec.prefect_schedules() or None,
            triggers=spec.prefect_triggers() or None,
            concurrency_limit=spec.prefect_concurrency(),
            enforce_parameter_schema=spec.enforce_parameter_schema))
    return made
