"""The reclaim arithmetic of tasks.slot_holders, and the races it must survive, as pure
functions: who is live, which leases are released by ID, which wait for the server's
repossessor, and how many slots are orphans."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from prefect_orthanc.tasks.slot_holders import (
    MAX_VALUE_CHARS,
    HolderEntry,
    LeaseRecord,
    pack_shards,
    plan_reclaim,
    stable_orphans,
    unpack_leases,
)
from prefect_orthanc.tasks.slots import SlotSettings, SlotWaitExceeded

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
PACS = "orthanc-modality-pacs"
BOUNDS = dict(stale_seconds=30, lease_seconds=60, repossessor_seconds=15, margin_seconds=10)


def entry(process: str, age: float, *leases: LeaseRecord) -> HolderEntry:
    return HolderEntry(process, [f"orthanc-slot-holder-{process}-0"],
                       NOW - timedelta(seconds=age), list(leases))


def lease(lease_id: str, *limits: str, lost: bool = False, renewed_ago: float = 0.0):
    return LeaseRecord(lease_id, limits or (PACS,), 1, None, lost, renewed_ago)


def plan(entries, active, trust=True):
    return plan_reclaim(entries, active, NOW, trust_staleness=trust, **BOUNDS)


def test_live_holders_account_for_every_active_slot():
    result = plan([entry("a", 3, lease("1")), entry("b", 29, lease("2"))], {PACS: 2})
    assert result.orphans == {PACS: 0} and not result.release and not result.delete


def test_a_dead_holders_valid_lease_is_released_by_id_and_its_record_deleted():
    result = plan([entry("a", 3, lease("1")), entry("dead", 35, lease("2"))], {PACS: 2})
    assert result.release == ["2"]
    assert result.delete == ["orthanc-slot-holder-dead-0"]
    assert result.accounted == {PACS: 1}
    # before the release the server still counts it: not an orphan to decrement as well
    # (the reclaimer observes active_slots again after releasing)


def test_a_dead_lease_near_its_expiry_is_left_to_the_repossessor_and_still_counts():
    # heartbeat 45 s old, renewed 8 s before it: expires in 7 s < margin 10
    result = plan([entry("dead", 45, lease("2", renewed_ago=8))], {PACS: 1})
    assert result.release == [] and result.delete == []
    assert result.orphans == {PACS: 0}
    # 20 s past its expiry the repossessor may still be running (15 s loop + 10 s margin)
    result = plan([entry("dead", 80, lease("2"))], {PACS: 1})
    assert result.orphans == {PACS: 0} and result.delete == []


def test_a_lease_certainly_gone_leaves_an_orphan_if_the_server_still_counts_it():
    # 60 + 15 + 10 s after its last renewal: freed by the repossessor or lost in a restart
    gone = entry("dead", 86, lease("2"))
    assert plan([gone], {PACS: 1}).orphans == {PACS: 1}  # lost in a restart: still counted
    assert plan([gone], {PACS: 0}).orphans == {PACS: 0}  # repossessed: nothing to do
    assert plan([gone], {PACS: 0}).delete == ["orthanc-slot-holder-dead-0"]


def test_a_live_holders_lost_lease_still_counts_a_dead_holders_does_not():
    live = entry("live", 2, lease("1", lost=True))
    dead = entry("dead", 40, lease("2", lost=True))
    result = plan([live, dead], {PACS: 2})
    assert result.accounted == {PACS: 1} and result.orphans == {PACS: 1}
    assert result.release == []  # the server no longer knows it
    assert result.delete == ["orthanc-slot-holder-dead-0"]


def test_staleness_is_not_trusted_right_after_the_server_came_back():
    # every heartbeat is old because nobody could write while the server was down
    entries = [entry("a", 50, lease("1")), entry("b", 50, lease("2"))]
    result = plan(entries, {PACS: 2}, trust=False)
    assert result.release == [] and result.delete == [] and result.orphans == {PACS: 0}


def test_an_unregistered_increment_looks_like_an_orphan_until_the_second_observation():
    first_active, second_active = {PACS: 2}, {PACS: 2}
    first = plan([entry("a", 1, lease("1"))], first_active)
    # the other holder published its lease between the two observations
    second = plan([entry("a", 1, lease("1")), entry("b", 0, lease("2"))], second_active)
    assert first.orphans == {PACS: 1} and second.orphans == {PACS: 0}
    assert stable_orphans(first, first_active, second, second_active) == {}


def test_orphans_are_freed_only_when_both_observations_agree():
    records = [entry("a", 1, lease("1"))]
    first = plan(records, {PACS: 2})
    second = plan(records, {PACS: 2})
    assert stable_orphans(first, {PACS: 2}, second, {PACS: 2}) == {PACS: 1}
    # someone acquired or released in between: the count moved, look again later
    moved = plan(records, {PACS: 1})
    assert stable_orphans(first, {PACS: 2}, moved, {PACS: 1}) == {}
    # a holder released (count down) while another acquired (count up) and neither has
    # rewritten its record: the arithmetic still holds (same records, same count)
    assert stable_orphans(first, {PACS: 2}, plan(records, {PACS: 2}), {PACS: 2}) == {PACS: 1}


def test_an_unreadable_live_record_means_no_orphans_a_dead_one_is_deleted():
    unreadable = entry("odd", 1)
    unreadable.unreadable = True
    assert plan([unreadable], {PACS: 2}).orphans == {PACS: 0}
    recent = entry("odd", 50)  # dead, but its leases may still be on the server
    recent.unreadable = True
    assert plan([recent], {PACS: 2}).orphans == {PACS: 0} and not plan([recent], {}).delete
    stale = entry("odd", 200)
    stale.unreadable = True
    result = plan([stale], {PACS: 2})
    assert result.orphans == {PACS: 2} and result.delete == ["orthanc-slot-holder-odd-0"]


def test_two_limits_of_one_lease_count_on_each():
    study = "orthanc-study-lock-0007"
    result = plan([entry("a", 1, lease("1", PACS, study))], {PACS: 1, study: 1})
    assert result.orphans == {PACS: 0, study: 0}


def test_records_round_trip_and_fit_prefects_variable_size():
    stripes = tuple(f"orthanc-study-lock-{i:04d}" for i in range(0, 1024, 3))
    records = [LeaseRecord(f"{i:08d}-0000-0000-0000-000000000000", (PACS, *stripes), 1,
                           "f" * 36, i % 2 == 0, 1.25) for i in range(40)]
    shards = pack_shards({"host": "worker-1", "pid": 42}, records)
    assert len(shards) > 1
    assert all(len(json.dumps(v, separators=(",", ":"))) <= MAX_VALUE_CHARS for v in shards)
    back = [record for value in shards for record in unpack_leases(value)]
    assert [r.lease_id for r in back] == [r.lease_id for r in records]
    assert set(back[0].limits) == {PACS, *stripes} and back[0].lost and back[1].renewed_ago == 1.2
    assert shards[0]["host"] == "worker-1"
    # one modality lease is small
    assert len(json.dumps(pack_shards({"host": "h", "pid": 1}, [lease("x")])[0])) < 200


def test_settings_refuse_a_staleness_a_live_holder_could_reach():
    with pytest.raises(ValueError, match="STALE_SECONDS"):
        SlotSettings(renew_seconds=20, stale_seconds=30)
    with pytest.raises(ValueError):
        SlotSettings(lease_seconds=30)  # below the server's minimum


def test_the_wait_error_names_the_limit_and_the_wait_and_pickles():
    import pickle

    from prefect_orthanc.orthanc_client.errors import SafeMessageError

    error = SlotWaitExceeded("orthanc-modality-pacs", 3600.4, "PREFECT_ORTHANC_SLOT_WAIT_SECONDS")
    assert isinstance(error, SafeMessageError) and not isinstance(error, TimeoutError)
    assert "'orthanc-modality-pacs' after waiting 3600 s" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
