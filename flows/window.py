"""The transfer window as one gate on every PACS exchange of a run.

``window_gate(window)`` installs ``orthanc_client.dicom_gate`` for the block: while it is
active, every request that would make Orthanc start a DICOM exchange (C-ECHO, the planning and
counting C-FINDs, C-MOVE, C-STORE) first checks the window, by whatever code, task or thread of
the run it is sent, and is refused with ``OutsideWindow`` when the window is closed: nothing is
sent. An exchange already started (a C-MOVE job running in Orthanc) is not interrupted; the
next one is refused, so a window that closes mid-planning or mid-retrieval stops the run at
the next exchange.

``admit(window)`` is the same gate seen from the flow, before it starts work: it returns at
once when the window is open, waits for it to open when ``outside="wait"`` (bounded by
``max_wait_hours``), and raises ``OutsideWindow`` otherwise. A task never waits for the window
(it would hold a PACS slot while waiting): it raises, and the flow decides.

Example:
    ```python
    with window_gate(request.time_window):
        admit(request.time_window)          # waits or raises OutsideWindow
        plan = plan_cohort(credentials, request, rows)   # each C-FIND checked again
    ```
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Iterator

from prefect_orthanc.flows.cohort import TimeWindow
from prefect_orthanc.orthanc_client import SafeMessageError, dicom_gate

__all__ = ["OutsideWindow", "admit", "is_open", "window_gate"]

logger = logging.getLogger(__name__)


class OutsideWindow(SafeMessageError):
    """A PACS exchange was refused because the transfer window is closed."""

    reason_code = "outside_time_window"
    #: a purposeful stop, logged in one line by the flow: see ``flows.states``
    purposeful_failure = True


def is_open(window: TimeWindow | None, now: dt.datetime | None = None) -> bool:
    """Whether PACS exchanges are allowed at ``now`` (default: the current time)."""
    return window is None or window.is_open(now or dt.datetime.now(dt.UTC))


def _describe(window: TimeWindow) -> str:
    return f"{window.start}-{window.end} {window.timezone}"


def _refuse(window: TimeWindow, route: str) -> None:
    if not is_open(window):
        raise OutsideWindow(f"outside the transfer window {_describe(window)}: {route} not sent "
                            f"to the PACS")


@contextlib.contextmanager
def window_gate(window: TimeWindow | None) -> Iterator[None]:
    """Refuse every DICOM exchange started in this block (and in the tasks it submits) while
    ``window`` is closed (``OutsideWindow``). No window: no gate."""
    if window is None:
        yield
        return
    with dicom_gate(lambda route: _refuse(window, route)):
        yield


def admit(window: TimeWindow | None, *,
          log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None) -> None:
    """Return when PACS exchanges are allowed: at once when the window is open (or there is
    none), after waiting for it when ``outside="wait"`` and it opens within
    ``max_wait_hours``; ``OutsideWindow`` otherwise."""
    if window is None:
        return
    now = dt.datetime.now(dt.UTC)
    if window.is_open(now):
        return
    delay = window.seconds_until_open(now)
    if window.outside == "stop":
        raise OutsideWindow(f"outside the transfer window {_describe(window)} (outside: stop): "
                            f"nothing sent to the PACS")
    if delay > window.max_wait_hours * 3600:
        raise OutsideWindow(f"outside the transfer window {_describe(window)}: it opens in "
                            f"{delay / 3600:.1f} h, more than max_wait_hours="
                            f"{window.max_wait_hours:g}")
    (log or logger).info("outside the transfer window %s: waiting %.0f s", _describe(window),
                         delay)
    time.sleep(delay)
