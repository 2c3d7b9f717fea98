"""Where every second goes, per study: the collection flow and the task layer, instrumented.

Runs, in one process and alternating with the raw REST baseline (``bench/_raw.py``), the
collection flow (``collect_cohort``) and/or the task layer (``retrieve_study`` tasks in one
flow, as ``bench/task_overhead.py``), and records every HTTP request at the httpx transport
(each attempt: a request Prefect's client retries after a 503 shows up twice, with the
back-off between), the time spent acquiring and releasing PACS slots, and each task's wall
time. Prints, per study: Prefect API calls by route (count, seconds, non-2xx answers), Orthanc
calls, slot time, and what is left inside the tasks (the task engine and our own Python).

    .venv/bin/python bench/breakdown.py --what collection --sizes 10 50
    .venv/bin/python bench/breakdown.py --what tasks --sizes 20 --rounds 3

Uses PREFECT_API_URL when set, else the embedded server. Writes bench/results/breakdown.json.
Nothing recorded holds a UID: routes are templated (IDs replaced by ``{id}``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import loaded_lab, quiet_prefect, write_accession_cohort

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
quiet_prefect()

import httpx

from bench import _raw


@dataclasses.dataclass
class Call:
    kind: str  # "prefect" or "orthanc"
    route: str
    status: int
    start: float
    seconds: float
    thread: int


@dataclasses.dataclass
class Span:
    kind: str  # "task:<name>", "slot-acquire", "slot-release"
    start: float
    seconds: float
    thread: int


class Recorder:
    """Every HTTP attempt and every span, from any thread."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.spans: list[Span] = []
        self.on = False
        self._lock = threading.Lock()

    def call(self, call: Call) -> None:
        if self.on:
            with self._lock:
                self.calls.append(call)

    def span(self, span: Span) -> None:
        if self.on:
            with self._lock:
                self.spans.append(span)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.calls, self.spans, self.on = [], [], True
        try:
            yield
        finally:
            self.on = False


RECORDER = Recorder()
_ID = re.compile(r"^([0-9a-f]{8}(-[0-9a-f]{4,12}){3,4}|[0-9a-f]{12,}|\d+|"
                 r"orthanc[-_](slot-holder|retrieving|study-lock)[-_].*|orthanc-modality-.*)$")


def route_of(request: httpx.Request) -> tuple[str, str]:
    path = request.url.path
    kind = "prefect" if path.startswith("/api/") or path == "/api" else "orthanc"
    parts = [("{id}" if _ID.match(p) else p) for p in path.removeprefix("/api").split("/")]
    return kind, f"{request.method} {'/'.join(parts)}"


def instrument() -> None:
    """Wrap httpx's transports (every attempt, both clients) and the project's slot and task
    entry points."""
    sync_send = httpx.HTTPTransport.handle_request
    async_send = httpx.AsyncHTTPTransport.handle_async_request

    def handle_request(self: Any, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        status = 0
        try:
            response = sync_send(self, request)
            status = response.status_code
            return response
        finally:
            kind, route = route_of(request)
            RECORDER.call(Call(kind, route, status, started, time.perf_counter() - started,
                               threading.get_ident()))

    async def handle_async_request(self: Any, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        status = 0
        try:
            response = await async_send(self, request)
            status = response.status_code
            return response
        finally:
            kind, route = route_of(request)
            RECORDER.call(Call(kind, route, status, started, time.perf_counter() - started,
                               threading.get_ident()))

    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore

    from prefect_orthanc.flows import collection
    from prefect_orthanc.tasks import network
    from prefect_orthanc.tasks.limits import modality_slot as original

    @contextlib.contextmanager
    def timed_slot(*args: Any, **kwargs: Any) -> Iterator[Any]:
        started = time.perf_counter()
        with original(*args, **kwargs) as held:
            entered = time.perf_counter()
            RECORDER.span(Span("slot-acquire", started, entered - started,
                               threading.get_ident()))
            try:
                yield held
            finally:
                leaving = time.perf_counter()
        RECORDER.span(Span("slot-release", leaving, time.perf_counter() - leaving,
                           threading.get_ident()))

    # the modules that call it look it up in their own namespace at call time
    for module in (network, collection):
        setattr(module, "modality_slot", timed_slot)  # noqa: B010 - a bench's patch
    for task in (network.retrieve_study, collection.mark_collected, collection.plan_cohort):
        task.fn = _timed(task.fn, f"task:{task.name}")


def _timed(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    @functools.wraps(fn)  # the task engine binds parameters by the signature
    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            RECORDER.span(Span(kind, started, time.perf_counter() - started,
                               threading.get_ident()))
    return run


def cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds (user + system) used so far by this process, by its other live children
    (the embedded Prefect server) and by its Orthanc children, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(stat: str) -> float:
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    me = used(Path("/proc/self/stat").read_text())
    children = orthancs = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                if "(Orthanc)" in stat:
                    orthancs += used(stat)
                else:
                    children += used(stat)
    return me, children, orthancs


@contextlib.contextmanager
def cpu_used(into: list[tuple[float, ...]]) -> Iterator[None]:
    before = cpu_seconds()
    yield
    into.append(tuple(a - b for a, b in zip(cpu_seconds(), before, strict=True)))


def _cpu(values: list[tuple[float, ...]]) -> str:
    """``this process + the Prefect server + the Orthancs`` CPU seconds, per round."""
    return ", ".join("+".join(f"{v:.1f}" for v in value) for value in values)


def _dump(label: str) -> None:
    """With BREAKDOWN_TIMELINE set: every call and span of the last run, in time order."""
    if not os.environ.get("BREAKDOWN_TIMELINE"):
        return
    rows = sorted([(c.start, c.thread, c.kind, c.route, c.status, c.seconds)
                   for c in RECORDER.calls] +
                  [(s.start, s.thread, "span", s.kind, 0, s.seconds) for s in RECORDER.spans])
    origin = rows[0][0] if rows else 0.0
    threads = {t: i for i, t in enumerate(dict.fromkeys(r[1] for r in rows))}
    out = ROOT / "bench" / "results" / f"timeline-{label}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(f"{r[0] - origin:8.3f} t{threads[r[1]]:<3} {r[2]:8} {r[3]:60} "
                           f"{r[4]:4} {r[5]:.3f}\n" for r in rows))


def summarize(calls: list[Call], spans: list[Span], wall: float, studies: int
              ) -> dict[str, Any]:
    """Per-study figures of one instrumented run."""
    by_route: dict[str, list[Call]] = collections.defaultdict(list)
    for call in calls:
        by_route[f"{call.kind} {call.route}"].append(call)
    routes = {name: {"calls": len(items), "seconds": sum(c.seconds for c in items),
                     "not_2xx": sum(not 200 <= c.status < 300 for c in items),
                     "5xx": sum(c.status >= 500 for c in items)}
              for name, items in sorted(by_route.items())}
    tasks = [s for s in spans if s.kind == "task:retrieve_study"]
    inside: dict[str, float] = collections.defaultdict(float)
    for task in tasks:
        end = task.start + task.seconds
        mine = [c for c in calls if c.thread == task.thread and task.start <= c.start <= end]
        inside["orthanc"] += sum(c.seconds for c in mine if c.kind == "orthanc")
        inside["prefect api"] += sum(c.seconds for c in mine if c.kind == "prefect")
        inside["task wall"] += task.seconds
    # C-MOVE jobs: from the retrieve request to the poll that saw the end, per thread
    moves: list[float] = []
    for thread in {c.thread for c in calls}:
        mine = sorted((c for c in calls if c.thread == thread), key=lambda c: c.start)
        begun: float | None = None
        for c in mine:
            if c.route.endswith("/retrieve"):
                begun = c.start
            elif begun is not None and c.route == "GET /jobs/{id}":
                last = c.start + c.seconds
            elif begun is not None and c.route != "GET /jobs/{id}":
                moves.append(last - begun)
                begun = None
    slot_wait = sum(s.seconds for s in spans if s.kind == "slot-acquire")
    slot_release = sum(s.seconds for s in spans if s.kind == "slot-release")
    prefect = [c for c in calls if c.kind == "prefect"]
    return {
        "studies": studies, "wall_s": wall, "per_study_s": wall / studies,
        "prefect_calls_per_study": len(prefect) / studies,
        "prefect_call_s_per_study": sum(c.seconds for c in prefect) / studies,
        "prefect_5xx": sum(c.status >= 500 for c in prefect),
        "orthanc_calls_per_study": sum(c.kind == "orthanc" for c in calls) / studies,
        "orthanc_call_s_per_study": sum(c.seconds for c in calls if c.kind == "orthanc")
        / studies,
        "move_and_poll_s_mean": statistics.mean(moves) if moves else 0.0,
        "slot_acquire_s_per_study": slot_wait / studies,
        "slot_release_s_per_study": slot_release / studies,
        "slot_acquisitions": sum(s.kind == "slot-acquire" for s in spans),
        "slot_acquire_longest_s": sorted((round(s.seconds, 2) for s in spans
                                          if s.kind == "slot-acquire"), reverse=True)[:6],
        "retrieve_task_s_per_study": inside["task wall"] / studies,
        "in_task_orthanc_s_per_study": inside["orthanc"] / studies,
        "in_task_prefect_api_s_per_study": inside["prefect api"] / studies,
        "in_task_rest_s_per_study": (inside["task wall"] - inside["orthanc"]
                                     - inside["prefect api"]) / studies,
        "task_runs": collections.Counter(s.kind for s in spans if s.kind.startswith("task:")),
        "routes": routes,
    }


def print_summary(label: str, raw: float, s: dict[str, Any]) -> None:
    n = s["studies"]
    print(f"\n### {label}: {n} studies, raw {raw:.2f} s, instrumented {s['wall_s']:.2f} s "
          f"({s['wall_s'] / raw:.2f}x)")
    print(f"per study: wall {s['per_study_s']:.3f} s (raw {raw / n:.3f}); Prefect API "
          f"{s['prefect_calls_per_study']:.1f} calls / {s['prefect_call_s_per_study']:.3f} s "
          f"({s['prefect_5xx']} answered 5xx in all); Orthanc {s['orthanc_calls_per_study']:.1f} "
          f"calls / {s['orthanc_call_s_per_study']:.3f} s; slot acquire "
          f"{s['slot_acquire_s_per_study']:.3f} s, release {s['slot_release_s_per_study']:.3f} s "
          f"({s['slot_acquisitions']} acquisitions; longest {s['slot_acquire_longest_s']})")
    print(f"inside retrieve_study, per study: {s['retrieve_task_s_per_study']:.3f} s = Orthanc "
          f"{s['in_task_orthanc_s_per_study']:.3f} + Prefect API "
          f"{s['in_task_prefect_api_s_per_study']:.3f} + rest (engine, sleeps, our Python) "
          f"{s['in_task_rest_s_per_study']:.3f}")
    print(f"task runs: {dict(s['task_runs'])}; C-MOVE request to the poll that saw it end: "
          f"{s['move_and_poll_s_mean']:.3f} s on average")
    print("| route | calls/study | s/study | non-2xx | 5xx |")
    print("|---|---|---|---|---|")
    for name, r in sorted(s["routes"].items(), key=lambda kv: -kv[1]["seconds"]):
        if name.startswith("prefect") or r["calls"] >= n / 2:
            print(f"| {name} | {r['calls'] / n:.2f} | {r['seconds'] / n:.4f} | "
                  f"{r['not_2xx']} | {r['5xx']} |")


def empty_flow() -> None:
    """Prefect's floor for a flow run: a flow doing nothing (run creation, states, teardown)."""
    from prefect import flow

    @flow(name="nothing")
    def nothing() -> None:
        return None

    nothing()


def collection(sizes: list[int], instances: int, concurrency: int, rounds: int
               ) -> list[dict[str, Any]]:
    from prefect_orthanc.flows.collection import collect_cohort
    from prefect_orthanc.tasks.limits import ensure_limits

    asyncio.run(ensure_limits({"pacs": concurrency}))
    out = []
    for size in sizes:
        with loaded_lab(size, instances, seed=size) as (lab, cohort, auth, tmp):
            accessions = [s.accession for s in cohort.studies]
            path = write_accession_cohort(tmp / "cohort.csv", accessions)
            os.environ.update({"ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": auth[0],
                               "ORTHANC_PASSWORD": auth[1]})
            from bench.collection_flow import raw_collect

            raws, flows, summaries, floors = [], [], [], []
            raw_cpu: list[tuple[float, ...]] = []
            flow_cpu: list[tuple[float, ...]] = []
            for _ in range(rounds):
                started = time.perf_counter()
                empty_flow()
                floors.append(time.perf_counter() - started)
                _raw.clear(lab.research.url, auth)
                with cpu_used(raw_cpu):
                    raws.append(raw_collect(lab.research.url, auth, accessions, concurrency))
                _raw.clear(lab.research.url, auth)
                with RECORDER.recording(), cpu_used(flow_cpu):
                    started = time.perf_counter()
                    report = collect_cohort(cohort_file=str(path), concurrency=concurrency)
                    wall = time.perf_counter() - started
                assert report.studies_complete == size, report
                flows.append(wall)
                summaries.append(summarize(RECORDER.calls, RECORDER.spans, wall, size))
                _dump(f"collection-{size}")
        median = sorted(range(rounds), key=lambda i: flows[i])[rounds // 2]
        raw = statistics.median(raws)
        print_summary(f"collection flow (median of {rounds}; raw "
                      f"{', '.join(f'{r:.2f}' for r in raws)}; flow "
                      f"{', '.join(f'{f:.2f}' for f in flows)}; a flow doing nothing "
                      f"{', '.join(f'{f:.2f}' for f in floors)}; CPU s of this process + the "
                      f"embedded server + the Orthancs: raw {_cpu(raw_cpu)}, flow "
                      f"{_cpu(flow_cpu)})", raw,
                      summaries[median])
        out.append({"what": "collection", "raw_s": raws, "flow_s": flows, "floor_s": floors,
                    "median": summaries[median]})
    return out


def _flows(creds: Any, uids: list[str], concurrency: int) -> tuple[Any, Any]:
    """The task-layer flow (UIDs from the closure, never flow parameters) and Prefect's floor:
    as many plain ``@task``s doing nothing, on the same runner."""
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from prefect_orthanc.tasks import network

    @task
    def nothing(i: int) -> int:
        return i

    # Prefect #16938: mypy sees ThreadPoolTaskRunner as no TaskRunner[PrefectFuture[Any]]
    @flow(task_runner=ThreadPoolTaskRunner(max_workers=concurrency))  # type: ignore[arg-type]
    def pull_all() -> int:
        futures = [network.retrieve_study.submit(creds, "pacs", uid) for uid in uids]
        return sum(f.result().received_instances for f in futures)

    # Prefect #16938: mypy sees ThreadPoolTaskRunner as no TaskRunner[PrefectFuture[Any]]
    @flow(task_runner=ThreadPoolTaskRunner(max_workers=concurrency))  # type: ignore[arg-type]
    def floor() -> int:
        return sum(f.result() for f in [nothing.submit(i) for i in range(len(uids))])

    return pull_all, floor


def tasks(sizes: list[int], instances: int, concurrency: int, rounds: int
          ) -> list[dict[str, Any]]:
    from prefect_orthanc.tasks import OrthancCredentials
    from prefect_orthanc.tasks.limits import ensure_limits

    asyncio.run(ensure_limits({"pacs": concurrency}))
    out = []
    for size in sizes:
        with loaded_lab(size, instances, seed=5) as (lab, cohort, auth, _):
            uids = [s.study_uid for s in cohort.studies]
            creds = OrthancCredentials(url=lab.research.url, username=auth[0],
                                       password=auth[1])

            pull_all, floor = _flows(creds, uids, concurrency)

            floor()  # warm-up: starts the embedded server
            raws, flows, floors, summaries, raw_moves = [], [], [], [], []
            raw_cpu: list[tuple[float, ...]] = []
            flow_cpu: list[tuple[float, ...]] = []
            for _ in range(rounds):
                _raw.clear(lab.research.url, auth)
                with RECORDER.recording(), cpu_used(raw_cpu):
                    raws.append(_raw.retrieve_all(lab.research.url, auth, "pacs", "RESEARCH",
                                                  uids, concurrency))
                raw_moves.append(summarize(RECORDER.calls, [], raws[-1], size)
                                 ["move_and_poll_s_mean"])
                _raw.clear(lab.research.url, auth)
                with RECORDER.recording(), cpu_used(flow_cpu):
                    started = time.perf_counter()
                    assert pull_all() == cohort.instance_count
                    wall = time.perf_counter() - started
                flows.append(wall)
                summaries.append(summarize(RECORDER.calls, RECORDER.spans, wall, size))
                _dump(f"tasks-{size}")
                started = time.perf_counter()
                floor()
                floors.append(time.perf_counter() - started)
        median = sorted(range(rounds), key=lambda i: flows[i])[rounds // 2]
        raw = statistics.median(raws)
        print_summary(f"task layer (median of {rounds}; raw "
                      f"{', '.join(f'{r:.2f}' for r in raws)}; tasks "
                      f"{', '.join(f'{f:.2f}' for f in flows)}; no-op @task floor "
                      f"{', '.join(f'{f:.2f}' for f in floors)}; raw C-MOVE request to the "
                      f"poll that saw it end {statistics.mean(raw_moves):.3f} s; CPU s of "
                      f"this process + the embedded server + the Orthancs: raw "
                      f"{_cpu(raw_cpu)}, tasks "
                      f"{_cpu(flow_cpu)})", raw, summaries[median])
        out.append({"what": "tasks", "raw_s": raws, "flow_s": flows, "floor_s": floors,
                    "median": summaries[median]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["collection", "tasks", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--instances", type=int, default=20, help="per study (2 series)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    instrument()
    results: list[dict[str, Any]] = []
    if args.what in ("tasks", "both"):
        results += tasks(args.sizes, args.instances, args.concurrency, args.rounds)
    if args.what in ("collection", "both"):
        results += collection(args.sizes, args.instances, args.concurrency, args.rounds)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(results, indent=2, default=dict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
