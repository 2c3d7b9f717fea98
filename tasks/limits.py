"""PACS-safe concurrency: one Prefect global concurrency limit per DICOM modality, and
per-study locks (``study_lock``) so two flow runs never work on one study at once.

Every C-FIND and C-MOVE against a modality holds one slot of the limit named
``orthanc-modality-<name>`` for as long as the Orthanc job runs (not just while it is
submitted), so the number of operations in flight against one PACS never exceeds its limit,
across all flow runs and workers. A missing limit is an error, never "unlimited". Slots are
held through ``tasks.slots``: a dead holder's slot is free again within a bound, and no one
waits without bound (docs/concurrency.md).

Create or update limits (needs ``PREFECT_API_URL``, or uses the embedded server)::

    prefect-orthanc-limits pacs=2 other-pacs=1
    prefect-orthanc-limits --list
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import re
import sys
import threading
from collections.abc import Iterator, Mapping

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from prefect_orthanc.orthanc_client.errors import SafeMessageError
from prefect_orthanc.tasks.slots import SlotLimitMissing, SlotWaitExceeded, hold, hold_shared

__all__ = [
    "ModalityLimitMissing",
    "SlotWaitExceeded",
    "ensure_limits",
    "limit_name",
    "modality_slot",
    "study_lock",
    "study_lock_name",
]

PREFIX = "orthanc-modality-"
STUDY_LOCK_PREFIX = "orthanc-study-lock-"
#: stripes of study locks: few enough to bound the limits a server holds (made on first
#: use), many enough that two studies in flight rarely share one (4 in flight: ~0.6 %)
STUDY_LOCKS = 1024
#: a waiter on a study lock polls at least this often (Prefect's Retry-After follows the
#: limit's average occupancy and can reach 30 s)
STUDY_LOCK_POLL_SECONDS = 0.25


class ModalityLimitMissing(SafeMessageError, RuntimeError):
    """No global concurrency limit exists for a modality: refusing to run unlimited."""

    def __init__(self, name: str) -> None:
        modality = name.removeprefix(PREFIX)
        super().__init__(
            f"no Prefect global concurrency limit named {name!r}: create it with "
            f"`prefect-orthanc-limits {modality}=2` (or `prefect gcl create {name} --limit 2`)"
        )
        self.limit = name

    def __reduce__(self) -> tuple[object, ...]:
        return (ModalityLimitMissing, (self.limit,))


def limit_name(modality: str) -> str:
    """The global concurrency limit guarding a modality (names are slugified)."""
    return PREFIX + re.sub(r"[^a-z0-9-]+", "-", modality.lower()).strip("-")


@contextlib.contextmanager
def modality_slot(modality: str, *, timeout: float | None = None) -> Iterator[None]:
    """Hold one slot of the modality's limit for the duration of the block.

    The slot is a short Prefect lease renewed while held, published in this process's holder
    record, and reclaimed by waiters once this process is dead (``tasks.slots``;
    docs/concurrency.md gives the bounds). It is shared within the process
    (``tasks.slots.hold_shared``): given back, it stays with the process for
    ``PREFECT_ORTHANC_SLOT_LINGER_SECONDS`` (2 s) for the next C-FIND or C-MOVE of the same
    run, so a run asks the server for a slot only when it has one more operation in flight,
    not once per study. ``timeout`` bounds the wait for a slot (default
    ``PREFECT_ORTHANC_SLOT_WAIT_SECONDS``, 1 h): then ``SlotWaitExceeded`` naming the limit
    and the wait. ``ModalityLimitMissing`` when the limit does not exist.

    Example:
        ```python
        with modality_slot("pacs"):
            ...  # one C-FIND or C-MOVE
        ```
    """
    name = limit_name(modality)
    try:
        slot = hold_shared(name, wait=timeout)
        slot.__enter__()
    except SlotLimitMissing:
        raise ModalityLimitMissing(name) from None
    with contextlib.ExitStack() as stack:
        stack.push(slot)
        yield


def study_lock_name(orthanc_id: str) -> str:
    """The limit that serializes work on one Orthanc resource: one of ``STUDY_LOCKS``
    stripes (``orthanc-study-lock-NNNN``), chosen by a hash of the ID, so the server holds a
    bounded number of limits and no name carries a resource's ID."""
    stripe = int(hashlib.sha256(orthanc_id.encode()).hexdigest(), 16) % STUDY_LOCKS
    return f"{STUDY_LOCK_PREFIX}{stripe:04d}"


@contextlib.contextmanager
def study_lock(*orthanc_ids: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the locks of one or more studies (or any Orthanc resources) across every flow
    run and worker for the duration of the block: Prefect global concurrency limits of 1
    (created on first use), all taken at once in one lease (never some held while waiting
    for others: no deadlock), held like ``modality_slot`` (a crashed holder's locks are
    reclaimed by the next waiter). Two studies may share a stripe: they then wait for each
    other, which is safe. ``SlotWaitExceeded`` after ``timeout`` seconds (default
    ``PREFECT_ORTHANC_SLOT_WAIT_SECONDS``).

    One call for a run's whole selection costs one acquisition (about 60 ms on a local
    server, spikes of 2 s under concurrent acquisitions on SQLite) instead of one per study.

    Example:
        ```python
        with study_lock(study_id):
            ...  # check the ledger, de-identify, deliver, record
        ```
    """
    names = sorted({study_lock_name(i) for i in orthanc_ids})
    if not names:
        yield
        return
    for name in names:
        _ensure_lock(name)
    try:
        slot = hold(names, wait=timeout, poll=STUDY_LOCK_POLL_SECONDS)
        slot.__enter__()
    except SlotLimitMissing:  # deleted since this process made them: make them again
        for name in names:
            _LOCKS_MADE.discard(name)
            _ensure_lock(name)
        slot = hold(names, wait=timeout, poll=STUDY_LOCK_POLL_SECONDS)
        slot.__enter__()
    with contextlib.ExitStack() as stack:
        stack.push(slot)
        yield


_LOCKS_MADE: set[str] = set()
_LOCKS_MADE_GUARD = threading.Lock()


def _ensure_lock(name: str) -> None:
    """Create the lock's limit (limit 1) unless it exists; once per process and name, one
    thread at a time (two concurrent creations make the server log an integrity error)."""
    with _LOCKS_MADE_GUARD:
        if name in _LOCKS_MADE:
            return
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=1, active=True))
                except (ObjectAlreadyExists, httpx.HTTPStatusError):  # another process
                    client.read_global_concurrency_limit_by_name(name)
        _LOCKS_MADE.add(name)


async def ensure_limits(limits: Mapping[str, int]) -> dict[str, str]:
    """Create or update ``orthanc-modality-<name>`` limits; returns what was done per limit."""
    done: dict[str, str] = {}
    async with get_client() as client:
        for modality, value in limits.items():
            name = limit_name(modality)
            try:
                await client.read_global_concurrency_limit_by_name(name)
                await client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=value, active=True))
                done[name] = f"updated to {value}"
            except ObjectNotFound:
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=value, active=True))
                done[name] = f"created with {value}"
    return done


async def list_limits() -> dict[str, int]:
    async with get_client() as client:
        limits = await client.read_global_concurrency_limits(limit=200)
    return {item.name: item.limit for item in limits if item.name.startswith(PREFIX)}


def main(argv: list[str] | None = None) -> int:
    """The ``prefect-orthanc-limits`` command; bad input answered in one line (``answer``)."""
    from prefect_orthanc.tasks.command_line import answer

    return answer("prefect-orthanc-limits", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="prefect-orthanc-limits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("limits", nargs="*", metavar="MODALITY=N",
                        help="modality name and its maximum concurrent C-FIND/C-MOVE")
    parser.add_argument("--list", action="store_true", help="show the existing limits")
    args = parser.parse_args(argv)
    wanted: dict[str, int] = {}
    for item in args.limits:
        modality, _, value = item.partition("=")
        if not modality or not value.isdigit() or int(value) < 1:
            parser.error(f"expected MODALITY=N with N >= 1, got {item!r}")
        wanted[modality] = int(value)
    for name, what in asyncio.run(ensure_limits(wanted)).items():
        print(f"{name}: {what}")
    if args.list or not wanted:
        for name, value in asyncio.run(list_limits()).items():
            print(f"{name} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
