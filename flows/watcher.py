"""The changes watcher: ``orthanc.study.stable`` events for servers without the Lua emitter.

It polls Orthanc's ``/changes`` log from a cursor kept in a Prefect Variable, posts one event per
``StableStudy`` change (same contract and event IDs as the Lua script, see ``flows/events.py``)
and only then advances the cursor: a crash re-sends the last batch, and Prefect drops the
duplicates by event ID. Each run watches for ``run_for`` seconds and ends, so a deployment on an
interval schedule (concurrency 1, queued) keeps one watcher alive with bounded runs.
"""

from __future__ import annotations

import time
from typing import Literal

from prefect import State, get_run_logger
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict

from prefect_orthanc.flows.events import post_events, retrieved_by_us, study_event
from prefect_orthanc.flows.states import fail_run
from prefect_orthanc.orthanc_client import Level, Orthanc, OrthancError
from prefect_orthanc.tasks.changes import cursor_position, cursor_variable
from prefect_orthanc.tasks.credentials import load_credentials
from prefect_orthanc.tasks.origin import RETRIEVED_METADATA
from prefect_orthanc.tasks.policy import orthanc_flow, shown_error
from prefect_orthanc.tasks.variables import put_variable

__all__ = ["WatchReport", "watch_changes"]

STABLE_STUDY = "StableStudy"
_PAGE = 200
#: The cursor is saved at most this often (and when the run ends). Saving it right after each
#: post collided with the trigger creating the flow run on a SQLite-backed Prefect server
#: ("database is locked", a 2-6 s stall, bench/event_latency.py). Events are posted before the
#: cursor moves, so a crash re-sends at most this many seconds of them: same IDs, no new runs.
SAVE_EVERY = 5.0


class WatchReport(BaseModel):
    """What one watcher run saw: counts and the cursor, nothing else."""

    model_config = ConfigDict(frozen=True)

    server: str
    cursor: int
    polls: int = 0
    events: int = 0
    errors: int = 0


def _retrieved(orthanc: Orthanc, study_id: str) -> bool:
    """Whether this package retrieved the study (``flows.events.retrieved_by_us``); an
    Orthanc that refuses the metadata name (not declared in its ``UserMetadata``) or lost the
    study makes an ordinary event."""
    try:
        return retrieved_by_us(orthanc.metadata(Level.STUDY, study_id, RETRIEVED_METADATA))
    except OrthancError:
        return False


@orthanc_flow(name="watch-orthanc-changes", flow_run_name="watch-{server}", log_prints=False)
def watch_changes(server: str = "research", run_for: float = 600, poll_interval: float = 0.75,
                  start_at: Literal["end", "beginning"] = "end",
                  credentials_block: str | None = None) -> State[WatchReport]:
    """Post ``orthanc.study.stable`` events for new stable studies for ``run_for`` seconds.

    ``server`` names the Orthanc in the events' resource IDs (match it in triggers) and in the
    cursor's Variable (``orthanc_changes_events_<server>``). A new cursor starts at the end of
    the change log (only studies that become stable from now on) unless ``start_at`` is
    ``beginning``. The default poll interval stays under Orthanc's 1 s HTTP keep-alive, so the
    connection is reused instead of racing the server closing it. Transient Orthanc or Prefect
    errors are logged (without values) and retried at the next poll; the run fails only if the
    last poll failed.

    Example:
        ```python
        watch_changes(server="research", run_for=3600, poll_interval=2)
        ```

    Args:
        server: Name of the watched Orthanc in the events' resource IDs and the cursor.
        run_for: How long this run watches, in seconds (a schedule starts the next run).
        poll_interval: Seconds between two reads of the change log.
        start_at: Where a new cursor starts: the end of the change log or its beginning.
        credentials_block: Name of the OrthancCredentials block of the watched Orthanc
            (empty: the ORTHANC_* environment variables).

    Returns:
        The run's final state, its data a ``WatchReport`` (polls, events posted, errors, the
        cursor's position): Completed, or Failed when the last poll failed.

    Raises:
        ValueError: ``credentials_block`` names no saved ``OrthancCredentials`` block.
        OrthancError: The watched Orthanc did not answer when a new cursor was placed at the
            end of its change log (errors of later polls are counted, not raised).
    """
    logger = get_run_logger()
    credentials = load_credentials(credentials_block)
    cursor = f"events-{server}"
    name = cursor_variable(cursor)
    polls = events = errors = 0
    last_error: str | None = None
    deadline = time.monotonic() + max(0.0, run_for)
    with credentials.get_client() as orthanc:
        since = saved = cursor_position(orthanc, cursor, 0 if start_at == "beginning" else None)
        saved_at = time.monotonic()
        logger.info("watching %s from change %d for %.0f s", server, since, run_for)
        while True:
            polls += 1
            try:
                page = orthanc.changes(since, _PAGE)
                batch = []
                for change in page.changes:
                    if change.change_type != STABLE_STUDY:
                        continue
                    stamp = orthanc.metadata(Level.STUDY, change.id, "LastUpdate")
                    if stamp:  # None: the study was deleted since
                        batch.append(study_event(server, change.id, stamp, emitter="changes",
                                                 retrieved=_retrieved(orthanc, change.id)))
                events += post_events(batch)
                since = page.last
                if since != saved and time.monotonic() - saved_at >= SAVE_EVERY:
                    put_variable(name, since)
                    saved, saved_at = since, time.monotonic()
                last_error = None
            except (OrthancError, OSError) as exc:  # a safe message, or the type only
                errors += 1
                last_error = type(exc).__name__
                logger.warning("poll %d failed (%s); retrying from change %d", polls,
                               shown_error("poll", exc), since)
                page = None
            except Exception as exc:  # the Prefect API refused the events
                errors += 1
                last_error = type(exc).__name__
                logger.warning("posting events failed (%s); retrying from change %d",
                               shown_error("posting events", exc), since)
                page = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if page is None or page.done:
                time.sleep(min(poll_interval if page else max(poll_interval, 5.0), remaining))
        if since != saved:
            put_variable(name, since)
    report = WatchReport(server=server, cursor=since, polls=polls, events=events, errors=errors)
    summary = f"{events} events in {polls} polls, {errors} errors; cursor at {since}"
    logger.info(summary)
    if last_error:
        return fail_run(f"last poll failed ({last_error}): {summary}", report)
    return Completed(message=summary, data=report)
