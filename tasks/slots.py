"""Holding slots of Prefect global concurrency limits so that they can never be orphaned.

``hold(names)`` takes one slot of each named limit in one lease and keeps it until the block
ends. Bounds (``SlotSettings``, from ``PREFECT_ORTHANC_SLOT_*``):

- the lease is short (``lease_seconds``, 60: Prefect's minimum) and renewed every
  ``renew_seconds`` (15) by one thread per process, which also rewrites the process's
  holder record (``tasks.slot_holders``): its heartbeat;
- a waiter that has been refused for ``check_seconds`` (10) reclaims, under a mutex: it
  releases by ID the leases of holders whose heartbeat is older than ``stale_seconds`` (30),
  then frees slots that ``active_slots`` counts but no live holder explains (a server
  restart with in-memory lease storage, a holder killed before it could publish its lease),
  when two observations ``settle_seconds`` apart agree;
- nobody waits more than ``wait_seconds`` (3600): then ``SlotWaitExceeded``.

``hold_shared(name)`` holds one slot the same way but shares the process's slots: a slot given
back stays leased to the process for ``linger_seconds`` (2) and the next holder in the
process takes it without asking the server; one thread at a time asks the server for more.
The PACS slots (``tasks.limits.modality_slot``) are held this way.

docs/concurrency.md gives the argument and the measured recovery times.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from uuid import UUID

import httpx
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_orthanc.orthanc_client.errors import SafeMessageError
from prefect_orthanc.tasks.server_writes import write
from prefect_orthanc.tasks.slot_holders import (
    HOLDER_PREFIX,
    HolderEntry,
    LeaseRecord,
    pack_shards,
    plan_reclaim,
    stable_orphans,
    unpack_leases,
)

__all__ = [
    "RECLAIM_MUTEX",
    "SlotLimitMissing",
    "SlotSettings",
    "SlotWaitExceeded",
    "hold",
    "hold_shared",
    "reclaim",
    "release_idle",
]

log = logging.getLogger(__name__)

#: the Prefect Variable whose existence is the reclaim mutex (one reclaimer at a time)
RECLAIM_MUTEX = "orthanc-slot-reclaimer"


class SlotSettings(BaseSettings):
    """Bounds of slot holding, from ``PREFECT_ORTHANC_SLOT_<FIELD>`` (seconds)."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_ORTHANC_SLOT_", extra="ignore")

    wait_seconds: float = Field(3600.0, gt=0, description="Longest wait for a slot before "
                                "SlotWaitExceeded.")
    lease_seconds: float = Field(60.0, ge=60, le=86400, description="Lease duration asked "
                                 "of the server (its minimum is 60).")
    renew_seconds: float = Field(15.0, gt=0, description="How often a holder renews its "
                                 "leases and rewrites its holder record (its heartbeat).")
    stale_seconds: float = Field(30.0, gt=0, description="A holder whose heartbeat is older "
                                 "is dead.")
    check_seconds: float = Field(10.0, gt=0, description="A waiter refused this long "
                                 "reclaims dead holders' and orphaned slots (then again "
                                 "every check_seconds).")
    settle_seconds: float = Field(3.0, gt=0, description="Between the two observations that "
                                  "must agree before orphans are freed.")
    poll_seconds: float = Field(2.0, gt=0, description="A waiter asks again at least this "
                                "often (Prefect's Retry-After can reach 30 s).")
    margin_seconds: float = Field(10.0, ge=0, description="Safety margin around a dead "
                                  "holder's lease expiry, where the server's repossessor "
                                  "may act.")
    repossessor_seconds: float = Field(15.0, gt=0, description="The server's "
                                       "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS.")
    mutex_seconds: float = Field(60.0, gt=0, description="A reclaim mutex older than this "
                                 "belongs to a dead reclaimer and is taken over.")
    linger_seconds: float = Field(2.0, ge=0, description="A shared slot given back is kept "
                                  "this long for the next user in the same process before it "
                                  "is released to the server (hold_shared).")

    @model_validator(mode="after")
    def _consistent(self) -> SlotSettings:
        if self.renew_seconds * 2 > self.stale_seconds:
            raise ValueError("PREFECT_ORTHANC_SLOT_STALE_SECONDS must be at least twice "
                             "PREFECT_ORTHANC_SLOT_RENEW_SECONDS (a live holder may miss one "
                             "heartbeat)")
        if self.renew_seconds * 2 > self.lease_seconds:
            raise ValueError("PREFECT_ORTHANC_SLOT_RENEW_SECONDS must be at most half of "
                             "PREFECT_ORTHANC_SLOT_LEASE_SECONDS")
        return self


class SlotLimitMissing(SafeMessageError, RuntimeError):
    """A named limit does not exist on the server (refusing to run unlimited)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no Prefect global concurrency limit named {name!r}")
        self.limit = name

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.limit,))


class SlotWaitExceeded(SafeMessageError, RuntimeError):
    """No slot became free within the wait bound; names the limit and the wait.

    Not a ``TimeoutError``: Prefect records a run ended by a ``TimeoutError`` as TimedOut (a
    run past its own ``timeout_seconds``), which this is not."""

    def __init__(self, limit: str, waited: float, setting: str = "") -> None:
        bound = f" (the bound: {setting})" if setting else ""
        super().__init__(
            f"no free slot on the Prefect global concurrency limit {limit!r} after waiting "
            f"{waited:.0f} s{bound}; the slots are held by live runs: see who holds them in "
            f"the Prefect variables {HOLDER_PREFIX}* (host, pid, flow run), and check the "
            f"limit with `prefect gcl inspect {limit.split('+')[0]}`")
        self.limit, self.waited, self.setting = limit, waited, setting

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.limit, self.waited, self.setting))


# ------------------------------------------------------------------ client helpers


@contextlib.contextmanager
def _client() -> Iterator[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


def _connector() -> Any:
    """A factory of fresh clients on the current settings' server, for a thread that must
    not share a flow run's client (it closes when the run ends while the thread lives on)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:  # ephemeral mode: whatever get_client makes in that thread
        return _client
    auth, key = PREFECT_API_AUTH_STRING.value(), PREFECT_API_KEY.value()
    return lambda: SyncPrefectClient(url, auth_string=auth, api_key=key)


def _status(error: BaseException) -> int | None:
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code
    return None


def _unreachable(error: BaseException) -> bool:
    """The server is down or restarting (worth waiting for), not refusing."""
    status = _status(error)
    return isinstance(error, httpx.TransportError) or (status is not None and status >= 500)


def _server_now(response: httpx.Response) -> datetime:
    header = response.headers.get("date")
    if header:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(header)
    return datetime.now(UTC)


def _parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _release(client: Any, lease_id: str) -> None:
    """Release a lease (``decrement-with-lease``), a write conflict asked again at once."""
    write(client, "POST", "/v2/concurrency_limits/decrement-with-lease",
          json={"lease_id": str(lease_id)})


def _current_flow_run() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = getattr(context, "flow_run", None) if context else None
    return str(run.id) if run is not None else None


# ------------------------------------------------------------------ this process's records


class _Registry:
    """This process's leases: renewed and published by one thread, ``renew_seconds`` apart."""

    def __init__(self, settings: SlotSettings) -> None:
        self.settings = settings
        self.process = uuid.uuid4().hex[:16]
        self.identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self._leases: dict[str, LeaseRecord] = {}
        self._renewed: dict[str, float] = {}  # lease -> monotonic time of last renewal
        self._lock = threading.Lock()  # guards the two dicts
        self._write = threading.Lock()  # one write of the records at a time
        self._version = 0
        self._written_version = 0
        self._shards: set[str] = set()  # variable names this process has created
        self._failing = False
        self._keeper_client: Any = None
        self._wake = threading.Event()
        self._connect = _connector()  # the server of the first holder (registries: per URL)
        self._thread = threading.Thread(target=self._run, name="slot-keeper", daemon=True)
        self._thread.start()

    # -- changes by holders

    def add(self, record: LeaseRecord, client: Any = None) -> None:
        """Hold ``record`` and publish it before returning: a waiter that reads the records
        must see this lease as soon as its holder can use it, or it would count the slot as
        an orphan, free it, and the server would free it a second time when the lease
        expires. Raises (after Prefect's client's own retries) when it cannot be published;
        the lease is then dropped from the records and the caller releases it."""
        with self._lock:
            self._leases[record.lease_id] = record
            self._renewed[record.lease_id] = time.monotonic()
            self._version += 1
            version = self._version
        try:
            self._publish(version, client, strict=True)
        except Exception:
            with self._lock:
                self._leases.pop(record.lease_id, None)
                self._renewed.pop(record.lease_id, None)
                self._version += 1
            raise

    def remove(self, lease_id: str, client: Any = None) -> LeaseRecord | None:
        with self._lock:
            record = self._leases.pop(lease_id, None)
            self._renewed.pop(lease_id, None)
            self._version += 1
            version = self._version
        self._publish(version, client)
        return record

    def is_lost(self, lease_id: str) -> bool:
        with self._lock:
            record = self._leases.get(lease_id)
            return bool(record and record.lost)

    # -- publishing

    def _snapshot(self) -> tuple[int, list[LeaseRecord]]:
        now = time.monotonic()
        with self._lock:
            records = [LeaseRecord(r.lease_id, r.limits, r.slots, r.flow_run, r.lost,
                                   max(0.0, now - self._renewed.get(r.lease_id, now)))
                       for r in self._leases.values()]
            return self._version, records

    def _publish(self, version: int | None = None, client: Any = None,
                 strict: bool = False) -> None:
        """Write the records (coalesced: a writer that finds its version already written by
        another thread's write returns at once). Errors are logged, not raised: the next
        tick writes again, and until then readers still count the previous records; with
        ``strict`` they are raised too (a new lease is not held until it is published)."""
        with self._write:
            if version is not None and self._written_version >= version:
                return
            current, records = self._snapshot()
            try:
                with contextlib.nullcontext(client) if client else self._connect() as using:
                    self._write_shards(using, records)
                self._written_version = current
                self._failing = False
            except Exception as error:
                if not self._failing:  # once per outage, not once a second
                    log.warning("could not publish this process's slot holder record (%s); "
                                "retrying every second", type(error).__name__)
                self._failing = True
                self._wake.set()
                if strict:
                    raise

    def _write_shards(self, client: Any, records: list[LeaseRecord]) -> None:
        values = pack_shards(self.identity, records) if records else []
        wanted = {f"{HOLDER_PREFIX}{self.process}-{i}": v for i, v in enumerate(values)}
        for name, value in wanted.items():
            if name in self._shards:
                try:
                    write(client, "PATCH", "/variables/name/{name}",
                                   path_params={"name": name}, json={"value": value})
                    continue
                except httpx.HTTPStatusError as error:
                    if _status(error) != 404:  # 404: a reclaimer took us for dead
                        raise
            try:
                write(client, "POST", "/variables/", json={"name": name, "value": value})
            except httpx.HTTPStatusError as error:
                if _status(error) != 409:
                    raise
                write(client, "PATCH", "/variables/name/{name}",
                               path_params={"name": name}, json={"value": value})
            self._shards.add(name)
        for name in sorted(self._shards - set(wanted)):
            try:
                write(client, "DELETE", "/variables/name/{name}", path_params={"name": name})
            except httpx.HTTPStatusError as error:
                if _status(error) != 404:
                    raise
            self._shards.discard(name)

    # -- the keeper thread

    def _run(self) -> None:
        while True:
            self._wake.wait(self.settings.renew_seconds)
            retry = self._wake.is_set()
            self._wake.clear()
            with self._lock:
                held = bool(self._leases)
                leases = [r for r in self._leases.values() if not r.lost]
            if not held and not retry:
                continue  # nothing held: no heartbeat (the records are deleted)
            failed = self._tick(leases)
            if failed:  # the server is unreachable: try again soon, not a tick later
                time.sleep(min(1.0, self.settings.renew_seconds))
                self._wake.set()

    def _tick(self, leases: list[LeaseRecord]) -> bool:
        failed = False
        try:
            if self._keeper_client is None:  # one client for the thread's life (CSRF once)
                self._keeper_client = self._connect().__enter__()
            client = self._keeper_client
            for record in leases:
                try:
                    client.renew_concurrency_lease(UUID(record.lease_id),
                                                   self.settings.lease_seconds)
                except Exception as error:
                    if _status(error) == 410:
                        self._mark_lost(record.lease_id)
                    else:
                        failed = True
                    continue
                with self._lock:
                    if record.lease_id in self._renewed:
                        self._renewed[record.lease_id] = time.monotonic()
        except Exception:
            failed = True
        if failed:
            self._drop_keeper_client()
        self._publish(client=self._keeper_client)
        return failed

    def _drop_keeper_client(self) -> None:
        client, self._keeper_client = self._keeper_client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.__exit__(None, None, None)

    def _mark_lost(self, lease_id: str) -> None:
        with self._lock:
            record = self._leases.get(lease_id)
            if record is None or record.lost:
                return
            self._leases[lease_id] = LeaseRecord(record.lease_id, record.limits,
                                                 record.slots, record.flow_run, True)
            self._version += 1
        log.warning("the Prefect server no longer knows a concurrency lease of this process "
                    "(%s): it expired or the server restarted; its slot stays counted as "
                    "held by this process until the block ends", ", ".join(record.limits))


_REGISTRIES: dict[str, _Registry] = {}
_REGISTRIES_GUARD = threading.Lock()


def _registry(settings: SlotSettings) -> _Registry:
    from prefect.settings import PREFECT_API_URL

    key = str(PREFECT_API_URL.value() or "ephemeral")
    with _REGISTRIES_GUARD:
        registry = _REGISTRIES.get(key)
        if registry is None:
            registry = _REGISTRIES[key] = _Registry(settings)
        elif settings.renew_seconds < registry.settings.renew_seconds:
            registry.settings = settings  # the tightest bounds any holder asked for
            registry._wake.set()
        return registry


# ------------------------------------------------------------------ reading the records


def read_holders(client: Any) -> tuple[datetime, list[HolderEntry]]:
    """Every process's records (grouped by process) and the server's clock."""
    entries: dict[str, HolderEntry] = {}
    now: datetime | None = None
    offset = 0
    while True:
        response = client.request("POST", "/variables/filter", json={
            "variables": {"name": {"like_": HOLDER_PREFIX}}, "limit": 200,
            "offset": offset, "sort": "NAME_ASC"})
        now = now or _server_now(response)
        page = response.json()
        for variable in page:
            name = variable["name"]
            if not name.startswith(HOLDER_PREFIX):
                continue
            process = name.removeprefix(HOLDER_PREFIX).rsplit("-", 1)[0]
            updated = _parse_time(variable["updated"])
            entry = entries.setdefault(process, HolderEntry(process, [], updated))
            entry.variables.append(name)
            entry.heartbeat = max(entry.heartbeat, updated)
            try:
                entry.leases.extend(unpack_leases(variable["value"]))
            except (ValueError, KeyError, TypeError):
                entry.unreadable = True
                log.warning("a slot holder record is unreadable: no orphan is freed while "
                            "its holder is live")
        if len(page) < 200:
            return now, list(entries.values())
        offset += 200


def _active_slots(client: Any, names: Sequence[str]) -> dict[str, int]:
    """``active_slots`` of each named limit that exists: one read per name, or the whole
    list by pages of 200 when a study selection asks about many stripes."""
    active: dict[str, int] = {}
    if len(names) <= 8:
        for name in names:
            try:
                response = client.request("GET", "/v2/concurrency_limits/{id_or_name}",
                                          path_params={"id_or_name": name})
            except httpx.HTTPStatusError as error:
                if _status(error) == 404:
                    continue
                raise
            active[name] = int(response.json()["active_slots"])
        return active
    wanted, offset = set(names), 0
    while True:
        page = client.request("POST", "/v2/concurrency_limits/filter",
                              json={"limit": 200, "offset": offset}).json()
        active.update({item["name"]: int(item["active_slots"]) for item in page
                       if item["name"] in wanted})
        if len(page) < 200:
            return active
        offset += 200


# ------------------------------------------------------------------ reclaiming


class _Mutex:
    """The reclaim mutex: a Prefect Variable that exists while someone reclaims. One older
    than ``mutex_seconds`` (server clock) is a dead reclaimer's: deleted by ID, so two
    reclaimers taking over at once cannot both win."""

    def __init__(self, client: Any, settings: SlotSettings) -> None:
        self.client, self.settings = client, settings
        self.variable_id: str | None = None
        self.since = 0.0

    def acquire(self) -> bool:
        for _ in range(2):
            try:
                response = self.client.request("POST", "/variables/", json={
                    "name": RECLAIM_MUTEX, "value": json.dumps({"host": socket.gethostname(),
                                                                "pid": os.getpid()})})
                self.variable_id, self.since = response.json()["id"], time.monotonic()
                return True
            except httpx.HTTPStatusError as error:
                if _status(error) != 409:
                    raise
            try:
                response = self.client.request("GET", "/variables/name/{name}",
                                               path_params={"name": RECLAIM_MUTEX})
            except httpx.HTTPStatusError as error:
                if _status(error) == 404:  # released meanwhile: try again
                    continue
                raise
            held = response.json()
            age = (_server_now(response) - _parse_time(held["created"])).total_seconds()
            if age <= self.settings.mutex_seconds:
                return False
            with contextlib.suppress(httpx.HTTPStatusError):
                self.client.request("DELETE", "/variables/{id}", path_params={"id": held["id"]})
        return False

    @property
    def fresh(self) -> bool:
        """Still well within its time (a reclaimer that stalled stops before decrementing)."""
        return time.monotonic() - self.since < self.settings.mutex_seconds / 2

    def release(self) -> None:
        if self.variable_id:
            with contextlib.suppress(httpx.HTTPError):
                self.client.request("DELETE", "/variables/{id}",
                                    path_params={"id": self.variable_id})


def reclaim(client: Any, names: Sequence[str], settings: SlotSettings, *,
            trust_staleness: bool = True) -> dict[str, int]:
    """Free what dead holders still hold on ``names`` (and release their leases on any
    limit), then free orphaned slots of ``names``; returns the slots freed per limit (by
    release, approximately; by decrement, exactly). Does nothing while another process
    reclaims. See ``tasks.slot_holders.plan_reclaim`` for the rules."""
    mutex = _Mutex(client, settings)
    if not mutex.acquire():
        return {}
    freed: dict[str, int] = {}
    bounds: dict[str, Any]  # seconds and a flag, passed on as keywords
    bounds = dict(stale_seconds=settings.stale_seconds, lease_seconds=settings.lease_seconds,
                  repossessor_seconds=settings.repossessor_seconds,
                  margin_seconds=settings.margin_seconds, trust_staleness=trust_staleness)
    try:
        now, entries = read_holders(client)
        plan = plan_reclaim(entries, {}, now, **bounds)
        for lease_id in plan.release:
            client.release_concurrency_slots_with_lease(UUID(lease_id))
        for entry in entries:
            for lease in entry.leases:
                if lease.lease_id in plan.release:
                    for name in lease.limits:
                        if name in names:
                            freed[name] = freed.get(name, 0) + lease.slots
        for variable in plan.delete:
            with contextlib.suppress(httpx.HTTPStatusError):
                client.request("DELETE", "/variables/name/{name}",
                               path_params={"name": variable})
        # records first, then the counts: a holder acquiring in between shows as an orphan
        # in this observation but has published by the next one (docs/concurrency.md)
        now, entries = read_holders(client)
        first_active = _active_slots(client, names)
        first = plan_reclaim(entries, first_active, now, **bounds)
        if not any(first.orphans.values()):
            return freed
        time.sleep(settings.settle_seconds)
        now, entries = read_holders(client)
        second_active = _active_slots(client, names)
        second = plan_reclaim(entries, second_active, now, **bounds)
        orphans = stable_orphans(first, first_active, second, second_active)
        if not mutex.fresh:
            return freed
        for name, count in orphans.items():
            client.release_concurrency_slots(names=[name], slots=count,
                                             occupancy_seconds=settings.lease_seconds)
            freed[name] = freed.get(name, 0) + count
            log.warning("freed %d orphaned slot(s) of %s (counted by the server, held by no "
                        "live holder)", count, name)
        return freed
    finally:
        mutex.release()


# ------------------------------------------------------------------ holding


def _run_log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The current flow or task run's logger (its lines reach the run's log in Prefect),
    else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _label(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"


def _increment(client: Any, names: list[str], settings: SlotSettings, holder: Any) -> Any:
    """One ``increment-with-lease`` (the body of Prefect's client method), a write conflict
    asked again at once (``tasks.server_writes``) rather than after the client's 2 s."""
    body: dict[str, Any] = {"names": names, "slots": 1, "mode": "concurrency",
                            "lease_duration": settings.lease_seconds}
    if holder is not None:
        body["holder"] = holder.model_dump(mode="json")
    return write(client, "POST", "/v2/concurrency_limits/increment-with-lease", json=body)


def _acquire(client: Any, names: list[str], settings: SlotSettings, wait: float,
             poll: float, registry: _Registry, local: _Pool | None = None) -> str:
    """A new lease of one slot of each of ``names``, published; with ``local``, a slot that
    another thread of this process gives back meanwhile is taken instead."""
    from prefect.types._concurrency import ConcurrencyLeaseHolder

    flow_run = _current_flow_run()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run)) if flow_run else None
    started = time.monotonic()
    blocked_since: float | None = None
    contact_since: float | None = None
    last_check: float | None = None
    while True:
        try:
            response = _increment(client, names, settings, holder)
        except Exception as error:
            status = _status(error)
            now = time.monotonic()
            if status == 423:  # Locked: every slot is taken
                contact_since = contact_since or now
                blocked_since = blocked_since or now
                retry = float(error.response.headers.get("Retry-After", "1"))  # type: ignore[attr-defined]
            elif _unreachable(error):
                contact_since = None
                retry = poll
            else:
                raise
            waited = now - started
            if waited >= wait:
                raise SlotWaitExceeded(_label(names), waited,
                                       "PREFECT_ORTHANC_SLOT_WAIT_SECONDS") from None
            if (status == 423 and blocked_since is not None
                    and now - blocked_since >= settings.check_seconds
                    and (last_check is None or now - last_check >= settings.check_seconds)):
                if last_check is None:  # once per wait: a run that waits says so
                    _run_log().warning(
                        "waiting for a free slot of %s: every slot is in use (gives up after "
                        "%.0f s, PREFECT_ORTHANC_SLOT_WAIT_SECONDS)", _label(names), wait)
                last_check = now
                # live holders publish within renew_seconds of the server answering: only
                # then does a stale heartbeat mean death, not a server that was down
                trust = (contact_since is not None
                         and now - contact_since >= settings.renew_seconds + poll)
                try:
                    if reclaim(client, names, settings, trust_staleness=trust):
                        continue
                except Exception as error:
                    log.warning("could not reclaim slots of %s (%s)", _label(names),
                                type(error).__name__)
            pause = max(0.0, min(retry, poll, wait - (time.monotonic() - started)))
            if local is None:
                time.sleep(pause)
            elif (lease_id := local.wait_idle(pause)) is not None:
                return lease_id  # a slot of this process came free meanwhile
            continue
        body = response.json()
        lease_id = str(body["lease_id"])
        found = {limit.get("name") for limit in body.get("limits") or []}
        missing = [n for n in names if n not in found]
        if missing:  # a missing limit is never "unlimited"
            client.release_concurrency_slots_with_lease(UUID(lease_id))
            raise SlotLimitMissing(missing[0])
        try:
            registry.add(LeaseRecord(lease_id, tuple(names), 1, flow_run), client)
        except BaseException:
            with contextlib.suppress(Exception):  # unpublished: never hold it unseen
                client.release_concurrency_slots_with_lease(UUID(lease_id))
            raise
        return lease_id


@contextlib.contextmanager
def hold(names: str | Sequence[str], *, wait: float | None = None,
         poll: float | None = None, settings: SlotSettings | None = None) -> Iterator[str]:
    """Hold one slot of each named limit (one lease) for the block; yields the lease ID.

    Waits at most ``wait`` seconds (default ``settings.wait_seconds``), asking again at
    least every ``poll`` seconds, and reclaims dead holders' and orphaned slots while it
    waits. Raises ``SlotWaitExceeded`` (naming the limit and the wait), or
    ``SlotLimitMissing`` when a limit does not exist.

    Example:
        ```python
        with hold("orthanc-modality-pacs"):
            ...  # one C-MOVE
        ```
    """
    settings = settings or SlotSettings()
    names = [names] if isinstance(names, str) else sorted(set(names))
    registry = _registry(settings)
    with _client() as client:
        lease_id = _acquire(client, names, settings,
                            settings.wait_seconds if wait is None else wait,
                            min(poll or settings.poll_seconds, settings.poll_seconds),
                            registry)
        try:
            yield lease_id
        finally:
            try:
                if not registry.is_lost(lease_id):  # a lost lease may have been
                    # repossessed and its slot given to another: never decrement blindly
                    _release(client, lease_id)
            finally:
                registry.remove(lease_id, client)


# ------------------------------------------------------------------ sharing slots in a process


class _Pool:
    """The slots of one limit that this process holds between uses (``hold_shared``).

    A slot given back stays leased, renewed and published like any other, idle, for
    ``linger_seconds``: the next user in this process takes it without a call to the server
    (LIFO, so that the older idle ones expire first when demand falls). Past the linger it
    is released to the server, so other runs get it as this process's queue drains. Only one
    thread at a time asks the server for a new slot; the others wait for it, or for a slot
    given back, whichever comes first (no burst of concurrent increments: on SQLite every
    concurrent write may be refused with a 503)."""

    def __init__(self, name: str, registry: _Registry) -> None:
        self.name, self.registry = name, registry
        self.cond = threading.Condition()
        self.idle: list[tuple[str, float]] = []  # (lease ID, monotonic time given back)
        self.asking = False
        self._reaper: threading.Thread | None = None
        #: the linger asked by the latest holder (``SlotSettings.linger_seconds``)
        self.linger = registry.settings.linger_seconds

    def _pop(self, lost: list[str]) -> str | None:
        """The most recently given back live lease (under ``cond``); lost ones go to
        ``lost`` (their holder record is dropped by the caller, nothing is decremented)."""
        while self.idle:
            lease_id, _ = self.idle.pop()
            if self.registry.is_lost(lease_id):
                lost.append(lease_id)
                continue
            return lease_id
        return None

    def _drop(self, lost: list[str]) -> None:
        for lease_id in lost:
            self.registry.remove(lease_id)

    def wait_idle(self, seconds: float) -> str | None:
        """For the thread asking the server: a slot given back within ``seconds``, if any."""
        lost: list[str] = []
        try:
            with self.cond:
                lease_id = self._pop(lost)
                if lease_id is None and seconds > 0:
                    self.cond.wait(seconds)
                    lease_id = self._pop(lost)
                return lease_id
        finally:
            self._drop(lost)

    def take(self, settings: SlotSettings, wait: float, poll: float) -> str:
        started = time.monotonic()
        lost: list[str] = []
        try:
            with self.cond:
                while True:
                    lease_id = self._pop(lost)
                    if lease_id is not None:
                        return lease_id
                    if not self.asking:
                        self.asking = True
                        break
                    waited = time.monotonic() - started
                    if waited >= wait:
                        raise SlotWaitExceeded(self.name, waited,
                                               "PREFECT_ORTHANC_SLOT_WAIT_SECONDS")
                    self.cond.wait(min(poll, wait - waited))
        finally:
            self._drop(lost)
        try:
            with _client() as client:
                return _acquire(client, [self.name], settings,
                                max(0.0, wait - (time.monotonic() - started)), poll,
                                self.registry, local=self)
        finally:
            with self.cond:
                self.asking = False
                self.cond.notify_all()

    def give(self, lease_id: str) -> None:
        with self.cond:
            self.idle.append((lease_id, time.monotonic()))
            self.cond.notify_all()
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, daemon=True,
                                                name=f"slot-linger-{self.name}")
                self._reaper.start()

    def _reap(self) -> None:
        """Release idle slots past their linger; ends when nothing is idle."""
        while True:
            with self.cond:
                if not self.idle:
                    self._reaper = None
                    return
                linger = self.linger
                now = time.monotonic()
                expired = [lease for lease, since in self.idle if now - since >= linger]
                if not expired:
                    self.cond.wait(min(since + linger for _, since in self.idle) - now)
                    continue
                self.idle = [(lease, since) for lease, since in self.idle
                             if lease not in expired]
            self.release(expired)

    def drain(self) -> None:
        """Release every idle slot now."""
        with self.cond:
            leases = [lease for lease, _ in self.idle]
            self.idle.clear()
        self.release(leases)

    def release(self, leases: Sequence[str]) -> None:
        if not leases:
            return
        try:
            with self.registry._connect() as client:
                for lease_id in leases:
                    try:
                        if not self.registry.is_lost(lease_id):
                            _release(client, lease_id)
                    finally:
                        self.registry.remove(lease_id, client)
        except Exception as error:  # the records no longer hold them: the lease expires
            log.warning("could not release %d idle slot(s) of %s (%s); the server frees them "
                        "when their lease expires", len(leases), self.name,
                        type(error).__name__)
            for lease_id in leases:
                self.registry.remove(lease_id)


_POOLS: dict[tuple[int, str], _Pool] = {}


def _pool(name: str, settings: SlotSettings) -> _Pool:
    registry = _registry(settings)
    with _REGISTRIES_GUARD:
        pool = _POOLS.get((id(registry), name))
        if pool is None:
            if not _POOLS:
                atexit.register(release_idle)
            pool = _POOLS[(id(registry), name)] = _Pool(name, registry)
        return pool


def release_idle() -> None:
    """Release every slot this process holds idle (the end of a run's retrievals, and at
    exit), instead of waiting ``linger_seconds``."""
    with _REGISTRIES_GUARD:
        pools = list(_POOLS.values())
    for pool in pools:
        pool.drain()


@contextlib.contextmanager
def hold_shared(name: str, *, wait: float | None = None, poll: float | None = None,
                settings: SlotSettings | None = None) -> Iterator[str]:
    """Hold one slot of the limit ``name`` for the block, sharing slots within this process.

    Like ``hold`` (the same bounds, records and reclaiming) except that the slot is given back
    to this process's pool of idle slots for ``linger_seconds`` instead of being released at
    once: a run that moves study after study holds as many slots as it has operations in
    flight (at most its concurrency) and asks the server for a slot only when it needs one
    more, instead of once per operation. Idle slots are released after the linger, at
    ``release_idle()`` and at exit. Yields the lease ID. Raises ``SlotWaitExceeded`` or
    ``SlotLimitMissing`` like ``hold``.

    Example:
        ```python
        with hold_shared("orthanc-modality-pacs"):
            ...  # one C-MOVE
        ```
    """
    settings = settings or SlotSettings()
    pool = _pool(name, settings)
    pool.linger = settings.linger_seconds
    lease_id = pool.take(settings, settings.wait_seconds if wait is None else wait,
                         min(poll or settings.poll_seconds, settings.poll_seconds))
    try:
        yield lease_id
    finally:
        pool.give(lease_id)
