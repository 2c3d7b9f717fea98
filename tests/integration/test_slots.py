"""Slots that can never be orphaned (tasks.slots), on real Prefect servers, with short bounds:
a holder killed with SIGKILL, a server restarted with in-memory lease storage while a dead
and a live process hold slots, and the wait bound. Each test prints its recovery time."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
HOLDER = Path(__file__).with_name("slot_holder.py")
#: short bounds (seconds): the lease itself cannot be shorter than the server's 60 s minimum
SHORT = {"renew_seconds": 2.0, "stale_seconds": 5.0, "check_seconds": 2.0,
         "settle_seconds": 1.0, "poll_seconds": 0.5}
SHORT_ENV = {f"PREFECT_ORTHANC_SLOT_{key.upper()}": str(value) for key, value in SHORT.items()}


class Holder:
    """One ``slot_holder.py`` process and the lines it printed."""

    def __init__(self, api_url: str, limit: str, workdir: Path, label: str,
                 wait: float | None = None) -> None:
        self.stop_file = workdir / f"{label}.stop"
        env = {**os.environ, **SHORT_ENV, "PREFECT_API_URL": api_url}
        args = [sys.executable, str(HOLDER), limit, str(self.stop_file)]
        if wait is not None:
            args.append(str(wait))
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line.strip())

    def expect(self, word: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line.startswith(word):
                return line
        raise AssertionError(f"no {word!r} within {timeout} s:\n{''.join(self.output)}")

    def said(self, word: str) -> bool:
        return any(line.startswith(word) for line in self.output)

    def stop(self) -> None:
        self.stop_file.touch()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.close()


def _active(api_url: str, name: str) -> int:
    return int(httpx.get(f"{api_url}/v2/concurrency_limits/{name}").json()["active_slots"])


def _first_to_acquire(waiters: list[Holder], timeout: float) -> Holder:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for waiter in waiters:
            if waiter.said("acquired"):
                return waiter
        time.sleep(0.1)
    raise AssertionError("no waiter acquired:\n" + "".join(w.output[-1] if w.output else ""
                                                           for w in waiters))


def _records(api_url: str) -> list[dict]:
    return httpx.post(f"{api_url}/variables/filter", json={
        "variables": {"name": {"like_": "orthanc-slot-holder-"}}}).json()


def test_a_killed_holders_slot_is_free_within_the_bound(prefect_server, modality_limit,
                                                        holders, tmp_path):
    """The holder holds a PACS slot and ten study locks in one lease (a sharing selection):
    all are free again within the bound after SIGKILL, nothing freed twice."""
    from prefect_orthanc.tasks.limits import _ensure_lock, limit_name
    from prefect_orthanc.tasks.slots import SlotSettings, hold

    asyncio.run(modality_limit("slot-kill", 1))
    locks = [f"orthanc-study-lock-{stripe:04d}" for stripe in range(1000, 1010)]
    for lock in locks:
        _ensure_lock(lock)
    name, api = limit_name("slot-kill"), prefect_server.api_url
    names = [name, *locks]
    holders.append(Holder(api, ",".join(names), tmp_path, "killed"))
    holders[0].expect("acquired", 60)
    process = holders[0].process.pid
    record = [r["value"] for r in _records(api) if r["value"]["pid"] == process]
    assert len(record) == 1 and "stripes" in record[0]["leases"][0]  # stripes as a bitmap
    holders[0].kill()
    died = time.monotonic()
    settings = SlotSettings(**SHORT)
    with hold(names, settings=settings, wait=60):
        recovered = time.monotonic() - died
        assert all(_active(api, n) == 1 for n in names)  # the waiter's: nothing freed twice
    assert all(_active(api, n) == 0 for n in names)
    assert not any(r["value"]["pid"] == process for r in _records(api))  # record gone
    bound = settings.stale_seconds + 2 * settings.check_seconds + settings.settle_seconds + 5
    print(f"\nkilled holder: slot free again {recovered:.1f} s after SIGKILL "
          f"(bound {bound:.0f} s with stale {settings.stale_seconds:.0f} s)")
    assert recovered < bound


def test_a_waiter_gives_up_after_the_wait_bound_naming_the_limit(prefect_server,
                                                                 modality_limit, holders,
                                                                 tmp_path):
    from prefect_orthanc.tasks.limits import limit_name
    from prefect_orthanc.tasks.slots import SlotSettings, SlotWaitExceeded, hold

    asyncio.run(modality_limit("slot-wait", 1))
    name, api = limit_name("slot-wait"), prefect_server.api_url
    holders.append(Holder(api, name, tmp_path, "live"))
    holders[0].expect("acquired", 60)
    started = time.monotonic()
    with pytest.raises(SlotWaitExceeded) as caught, hold(name, settings=SlotSettings(**SHORT),
                                                         wait=5):
        pass
    waited = time.monotonic() - started
    assert 5 <= waited < 10
    message = str(caught.value)
    assert name in message and "after waiting 5 s" in message
    assert "PREFECT_ORTHANC_SLOT_WAIT_SECONDS" in message
    assert not isinstance(caught.value, TimeoutError)  # Prefect would call the run TimedOut
    # the live holder kept its slot through the waiter's reclaim checks
    assert _active(api, name) == 1 and holders[0].process.poll() is None
    holders[0].stop()
    holders[0].expect("released", 30)
    assert _active(api, name) == 0


def test_server_restart_with_memory_leases_frees_the_dead_holders_slot_only(
        holders, tmp_path, monkeypatch):
    """Limit 2: a dead process and a live one hold a slot each; the server restarts with its
    in-memory lease storage (every lease lost, active_slots still 2). Of two waiters (started
    while the server was down) one gets the dead holder's slot, the other does not get the
    live one's (cap), and the live holder's release does not free anything twice."""
    from prefect_orthanc.deployments.lab.prefect_server import LocalPrefectServer

    monkeypatch.delenv("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", raising=False)
    home = tmp_path / "server"
    server = LocalPrefectServer.start(home, ui=False)
    try:
        api, name = server.api_url, "orthanc-modality-slot-restart"
        httpx.post(f"{api}/v2/concurrency_limits/", json={"name": name, "limit": 2}
                   ).raise_for_status()
        dead, live = Holder(api, name, tmp_path, "dead"), Holder(api, name, tmp_path, "live")
        holders.extend([dead, live])
        dead.expect("acquired", 60)
        live.expect("acquired", 60)
        dead.kill()
        server.stop()
        # two waiters start while the server is down (they wait through it) for one slot
        waiters = [Holder(api, name, tmp_path, f"waiter{i}", wait=60) for i in range(2)]
        holders.extend(waiters)
        server = LocalPrefectServer.start(home, port=server.port, ui=False)
        up = time.monotonic()
        assert _active(api, name) == 2  # the leases are gone, the count is not
        winner = _first_to_acquire(waiters, 60)
        recovered = time.monotonic() - up
        print(f"\nrestart with in-memory leases: the dead holder's slot was free again "
              f"{recovered:.1f} s after the server answered again")
        assert live.process.poll() is None and not live.said("released")
        assert _active(api, name) == 2
        # the cap: the live holder and the winner hold both slots; the other waiter gets
        # nothing through several trusted reclaim checks
        loser = waiters[1 - waiters.index(winner)]
        time.sleep(SHORT["renew_seconds"] + SHORT["poll_seconds"] + 2 * SHORT["check_seconds"]
                   + SHORT["settle_seconds"])
        assert not loser.said("acquired"), loser.output
        loser.close()
        assert _active(api, name) == 2
        live.stop()
        live.expect("released", 30)
        # its lease was lost in the restart: it decremented nothing (the waiter still holds
        # one slot; the live holder's count is an orphan the next waiter frees)
        assert _active(api, name) == 2
        winner.stop()
        winner.expect("released", 30)
        assert _active(api, name) == 1
        log = server.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_shared_slots_are_reused_in_the_process_then_released_for_other_runs(
        prefect_server, modality_limit, holders, tmp_path):
    """Limit 1. Operations of this process one after the other reuse one lease (no call to
    the server); another process waiting for the slot gets it once this process's linger
    has passed; while it holds it, this process waits (the cap across processes) until its
    wait bound; ``release_idle`` gives an idle slot back at once."""
    from prefect_orthanc.tasks.limits import limit_name
    from prefect_orthanc.tasks.slots import (
        SlotSettings,
        SlotWaitExceeded,
        hold_shared,
        release_idle,
    )

    asyncio.run(modality_limit("slot-shared", 1))
    name, api = limit_name("slot-shared"), prefect_server.api_url
    settings = SlotSettings(**SHORT, linger_seconds=2)
    with hold_shared(name, settings=settings) as first:
        assert _active(api, name) == 1
    for _ in range(3):
        with hold_shared(name, settings=settings) as again:
            assert again == first  # the same lease, given back and taken again
    assert _active(api, name) == 1  # idle, lingering: still this process's
    other = Holder(api, name, tmp_path, "other", wait=60)
    holders.append(other)
    other.expect("acquired", 30)  # after the linger
    assert _active(api, name) == 1
    with pytest.raises(SlotWaitExceeded), hold_shared(name, settings=settings, wait=3):
        pass
    other.stop()
    other.expect("released", 30)
    with hold_shared(name, settings=settings) as last:
        assert last != first
    assert _active(api, name) == 1
    release_idle()
    assert _active(api, name) == 0
    assert not [r for r in _records(api) if r["value"]["pid"] == os.getpid()
                and r["value"]["leases"]]
