"""Who holds which concurrency slot: one record per holding process, readable by any waiter.

Prefect 3 keeps a global concurrency limit's ``active_slots`` in its database but the leases
behind them in a separate lease storage that has no API to list them, and that is lost on a
server restart when it is the default in-memory one. So every process holding slots through
``tasks.slots`` publishes what it holds in Prefect Variables named
``orthanc-slot-holder-<process uuid>-<shard>``: its host and pid, and per lease the lease ID,
the limit names, the slots, the flow run (if any), whether the server said the lease is gone,
and how long before the write the lease was last renewed. The owner rewrites them on every
renewal tick (one write per shard, whatever the number of leases), so the server's
``updated`` timestamp of a record is the holder's heartbeat. No patient data: limit names are
PACS names and study-lock stripes (``orthanc-study-lock-NNNN``), never a study's ID.

This module holds the record format and the pure arithmetic of reclaiming
(:func:`plan_reclaim`); ``tasks.slots`` does the I/O. docs/concurrency.md explains the
argument.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "HOLDER_PREFIX",
    "HolderEntry",
    "LeaseRecord",
    "ReclaimPlan",
    "pack_shards",
    "plan_reclaim",
    "stable_orphans",
    "unpack_leases",
]

HOLDER_PREFIX = "orthanc-slot-holder-"
STUDY_LOCK_PREFIX = "orthanc-study-lock-"
#: Prefect refuses variable values longer than 5000 characters (prefect.types)
MAX_VALUE_CHARS = 4800


@dataclass(frozen=True)
class LeaseRecord:
    """One lease as its holder publishes it."""

    lease_id: str
    limits: tuple[str, ...]
    slots: int = 1
    flow_run: str | None = None
    #: the server answered 410 to a renewal: the lease is gone (repossessed or lost by a
    #: restart); the holder still works, so its slots still count as held
    lost: bool = False
    #: seconds between the lease's last successful renewal (or acquisition) and the write
    renewed_ago: float = 0.0

    def to_json(self) -> dict[str, object]:
        modalities = [n for n in self.limits if not n.startswith(STUDY_LOCK_PREFIX)]
        stripes = sorted(int(n.removeprefix(STUDY_LOCK_PREFIX)) for n in self.limits
                         if n.startswith(STUDY_LOCK_PREFIX))
        out: dict[str, object] = {"id": self.lease_id, "limits": modalities,
                                  "slots": self.slots, "r": round(self.renewed_ago, 1)}
        if stripes:  # a bitmap: 1024 stripes are 256 hex digits, whatever the selection
            out["stripes"] = format(sum(1 << s for s in stripes), "x")
        if self.flow_run:
            out["flow_run"] = self.flow_run
        if self.lost:
            out["lost"] = True
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LeaseRecord:
        names = [str(n) for n in data.get("limits") or []]
        bits = int(str(data.get("stripes") or "0"), 16)
        names += [f"{STUDY_LOCK_PREFIX}{i:04d}" for i in range(bits.bit_length())
                  if bits >> i & 1]
        return cls(lease_id=str(data["id"]), limits=tuple(names),
                   slots=int(data.get("slots", 1)),
                   flow_run=str(data["flow_run"]) if data.get("flow_run") else None,
                   lost=bool(data.get("lost")),
                   renewed_ago=float(data.get("r", 0.0)))


def _size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def pack_shards(process: Mapping[str, object], leases: Iterable[LeaseRecord]
                ) -> list[dict[str, object]]:
    """The values (JSON objects) of one process's records: its leases packed greedily into
    shards that fit Prefect's variable size limit (measured as compact JSON, as Prefect
    does; one shard unless the process holds many leases)."""
    shards: list[list[dict[str, object]]] = [[]]
    base = _size({**process, "leases": []})
    size = base
    for lease in leases:
        item = lease.to_json()
        item_size = _size(item) + 1
        if shards[-1] and size + item_size > MAX_VALUE_CHARS:
            shards.append([])
            size = base
        shards[-1].append(item)
        size += item_size
    return [{**process, "leases": shard} for shard in shards]


def unpack_leases(value: object) -> list[LeaseRecord]:
    """The leases of one record (a variable's value, JSON text or already decoded)."""
    data = json.loads(value) if isinstance(value, str) else value
    if not isinstance(data, Mapping):
        return []
    return [LeaseRecord.from_json(item) for item in data.get("leases") or []]


@dataclass
class HolderEntry:
    """One process's records as a reader sees them."""

    process: str
    variables: list[str]
    #: the newest ``updated`` of its records (server clock): its last heartbeat
    heartbeat: datetime
    leases: list[LeaseRecord] = field(default_factory=list)
    #: a record could not be read: what it holds is unknown
    unreadable: bool = False


@dataclass
class ReclaimPlan:
    """What a reclaimer does with one observation (see :func:`plan_reclaim`)."""

    #: leases of dead holders that are still valid on the server: release them by ID
    release: list[str] = field(default_factory=list)
    #: records of dead holders with nothing left that may still count: delete them
    delete: list[str] = field(default_factory=list)
    #: per limit: slots held by live holders, or by dead ones whose lease the server may
    #: still free itself (the repossessor)
    accounted: dict[str, int] = field(default_factory=dict)
    #: the lease IDs behind ``accounted`` (two observations must agree on them)
    accounted_leases: frozenset[str] = frozenset()
    #: per limit asked about: active slots no live holder and no possible lease explains
    orphans: dict[str, int] = field(default_factory=dict)


def plan_reclaim(entries: Iterable[HolderEntry], active: Mapping[str, int], now: datetime, *,
                 stale_seconds: float, lease_seconds: float, repossessor_seconds: float,
                 margin_seconds: float, trust_staleness: bool) -> ReclaimPlan:
    """Classify every holder and count orphaned slots.

    A holder is live when its heartbeat (server clock) is at most ``stale_seconds`` old, or
    when staleness cannot be trusted (``trust_staleness`` False: the reclaimer has not seen
    the server up for ``stale_seconds`` yet, so live holders may not have had a chance to
    write). A dead holder's lease expires on the server at about ``heartbeat -
    renewed_ago + lease_seconds``; while that is more than ``margin_seconds`` away, the
    repossessor cannot touch it, so the reclaimer releases it by ID (which also revokes it:
    never freed twice). Past that point and until the repossessor has certainly run
    (``+ repossessor_seconds + margin_seconds``) the lease may still be freed by the server:
    its slots stay accounted and nothing is done. After that the lease is gone either way
    (freed, or lost in a restart of in-memory lease storage), and whatever ``active_slots``
    still counts for it is an orphan.

    ``orphans[name] = active[name] - accounted[name]`` (never negative) for each name in
    ``active``; none at all while a record that is unreadable may still stand for leases
    (what it holds is unknown, so nothing can be called an orphan).
    """
    plan = ReclaimPlan()
    unknown = False
    accounted: dict[str, int] = {}
    accounted_leases: set[str] = set()
    for entry in entries:
        age = (now - entry.heartbeat).total_seconds()
        live = age <= stale_seconds or not trust_staleness
        # an unreadable record may hold anything until its leases are certainly gone
        doubtful = entry.unreadable and (
            live or age <= lease_seconds + repossessor_seconds + margin_seconds)
        unknown = unknown or doubtful
        keep = doubtful
        for lease in entry.leases:
            expires_in = lease_seconds - lease.renewed_ago - age
            if live:
                counted = True
            elif lease.lost:
                counted = False  # the holder itself saw it gone, and the holder is dead
            elif expires_in > margin_seconds:
                plan.release.append(lease.lease_id)
                counted = False
            else:
                counted = expires_in > -(repossessor_seconds + margin_seconds)
            if counted:
                keep = True
                accounted_leases.add(lease.lease_id)
                for name in lease.limits:
                    accounted[name] = accounted.get(name, 0) + lease.slots
        if not live and not keep:
            plan.delete.extend(entry.variables)
    plan.accounted = accounted
    plan.accounted_leases = frozenset(accounted_leases)
    plan.orphans = {name: 0 if unknown else max(0, value - accounted.get(name, 0))
                    for name, value in active.items()}
    return plan


def stable_orphans(first: ReclaimPlan, first_active: Mapping[str, int],
                   second: ReclaimPlan, second_active: Mapping[str, int]) -> dict[str, int]:
    """Orphans both observations agree on: per limit, nothing when ``active_slots`` changed
    or the set of accounted leases changed between them (someone acquired, released or
    registered meanwhile: look again later), else the smaller of the two counts."""
    if first.accounted_leases != second.accounted_leases:
        return {}
    return {name: min(first.orphans.get(name, 0), count)
            for name, count in second.orphans.items()
            if count > 0 and first_active.get(name) == second_active.get(name)}
