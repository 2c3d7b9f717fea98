"""One command for the whole table of issue 15: every ratio, on Prefect's server with SQLite
(what a new user starts with) and, with ``--database postgres`` (or ``both``), on a
PostgreSQL cluster it starts itself (Debian's postgresql).

For each database, one Prefect server (``bench._server``) serves every measurement:

* **collection** at each size (``--sizes``, default 10 50; ``--big`` adds 200): the same
  cohort pulled PACS → research by, alternating round by round, the raw REST script
  (``bench.collection_flow.raw_collect``), the project's ``collect_cohort`` (in a fresh
  process after one untimed warm-up flow, so its wall time and peak RSS are its own), and
  PyOrthanc threaded and sequential (``bench.pyorthanc_peer``), research emptied between
  runs; ratios are per round, medians reported with their spread;
* **task layer**: ``bench/task_overhead.py`` (``retrieve_study`` tasks vs raw REST);
* **sharing**: ``bench.sharing_flow.run`` on tiny and CT-sized studies (warm ratio to raw
  anonymize + archive, and what a process's first run adds);
* **growth**: per-study wall time and peak RSS of the collection flow's process per size.

    .venv/bin/python bench/run_all.py                      # SQLite, sizes 10 50
    .venv/bin/python bench/run_all.py --database both --big
    .venv/bin/python bench/run_all.py --quick              # a smoke run of every part
    .venv/bin/python bench/run_all.py --parts collection --sizes 1000 --instances 2 \
        --flow-only --rounds 1                             # growth of the flow alone

The machine's other load shows in the spread: run it on a quiet machine for the closing
table. Results: ``bench/results/run_all.json`` (``run_all.quick.json`` for ``--quick``).
PyOrthanc (the peer) is in the ``bench`` extra: ``.venv/bin/pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import loaded_lab, peak_rss_mb, quiet_prefect, write_accession_cohort

quiet_prefect()

TARGETS = {"collection vs raw": 1.10, "task layer vs raw": 1.10, "sharing tiny vs raw": 2.0,
           "sharing CT vs raw": 1.5}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


# ------------------------------------------------------------------ collection


def collect_child(cohort_file: str, concurrency: int) -> dict[str, float]:
    """In a fresh process: one untimed warm-up flow, then ``collect_cohort``, timed."""
    from prefect import flow

    from prefect_orthanc.flows.collection import collect_cohort

    @flow
    def warm_up() -> None:
        return None

    warm_up()
    before = peak_rss_mb()
    started = time.perf_counter()
    report = collect_cohort(cohort_file=cohort_file, concurrency=concurrency)
    seconds = time.perf_counter() - started
    complete = getattr(report, "studies_complete", None)
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "before_mb": before,
            "complete": float(complete if complete is not None else -1)}


def collection(size: int, rounds: int, concurrency: int, instances: int,
               sequential: bool, flow_only: bool = False) -> dict[str, Any]:
    from bench import _raw
    from bench.collection_flow import raw_collect
    from bench.pyorthanc_peer import pyorthanc_collect

    runs: dict[str, list[dict[str, float]]] = {"raw": [], "flow": [], "pyorthanc": [],
                                               "pyorthanc sequential": []}
    with loaded_lab(size, instances, seed=size) as (lab, cohort, auth, tmp):
        accessions = [s.accession for s in cohort.studies]
        path = write_accession_cohort(tmp / "cohort.csv", accessions)
        url = lab.research.url
        env = {**os.environ, "ORTHANC_URL": url, "ORTHANC_USERNAME": auth[0],
               "ORTHANC_PASSWORD": auth[1]}
        for round_index in range(rounds):
            order = ["raw", "flow", "pyorthanc"] + (
                ["pyorthanc sequential"] if sequential and round_index == 0 else [])
            if round_index % 2:  # alternate who goes first
                order[:3] = order[:3][::-1]
            if flow_only:  # growth only: wall time and peak RSS of the flow's process
                order = ["flow"]
            for path_name in order:
                _raw.clear(url, auth)
                if path_name == "raw":
                    result = {"seconds": raw_collect(url, auth, accessions, concurrency)}
                elif path_name == "pyorthanc":
                    result = {"seconds": pyorthanc_collect(url, auth, accessions,
                                                           concurrency=concurrency)}
                elif path_name == "pyorthanc sequential":
                    result = {"seconds": pyorthanc_collect(url, auth, accessions,
                                                           concurrency=1)}
                else:
                    done = subprocess.run(
                        [sys.executable, __file__, "--child-collect", str(path),
                         "--concurrency", str(concurrency)],
                        env=env, cwd=ROOT, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"collection flow failed:\n{done.stdout[-2000:]}"
                                           f"\n{done.stderr[-4000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    if result["complete"] not in (-1, size):
                        raise RuntimeError(f"collection flow: {result['complete']} of "
                                           f"{size} studies complete")
                runs[path_name].append(result)
                log(f"  collection {size} round {round_index + 1} {path_name}: "
                    f"{result['seconds']:.2f} s")
    raw = [r["seconds"] for r in runs["raw"]]
    flow = [r["seconds"] for r in runs["flow"]]
    peer = [r["seconds"] for r in runs["pyorthanc"]]
    out: dict[str, Any] = {
        "studies": size, "runs": runs,
        "flow_vs_raw": [f / r for f, r in zip(flow, raw, strict=True)] if raw else [],
        "flow_vs_pyorthanc": [f / p for f, p in zip(flow, peer, strict=True)] if peer else [],
        "flow_s_per_study": statistics.median(flow) / size,
        "flow_peak_mb": max(r["peak_mb"] for r in runs["flow"]),
    }
    if runs["pyorthanc sequential"]:
        out["sequential_vs_flow"] = runs["pyorthanc sequential"][0]["seconds"] / flow[0]
    return out


# ------------------------------------------------------------------ task layer, sharing


def task_layer(studies: int, rounds: int, concurrency: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "task_overhead.py"),
                           "--studies", str(studies), "--rounds", str(rounds),
                           "--concurrency", str(concurrency)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"task_overhead failed:\n{done.stderr[-4000:]}")
    result = json.loads((ROOT / "bench" / "results" / "task_overhead.json").read_text())
    raw, tasks = result["raw REST"], result["prefect tasks"]
    log(f"  task layer: raw {spread(raw)} s, tasks {spread(tasks)} s")
    return {"raw": raw, "tasks": tasks,
            "tasks_vs_raw": [t / r for t, r in zip(tasks, raw, strict=True)]}


def sharing(kind: str, studies: int, instances: int, rounds: int,
            concurrency: int) -> dict[str, Any]:
    from bench.sharing_flow import run

    return run(kind, studies, instances, rounds, concurrency, log=log)


# ------------------------------------------------------------------ the table


def table(database: str, results: dict[str, Any]) -> str:
    rows = [f"\n### Prefect server on {database}\n",
            "| bench | median ratio | per round | target |", "|---|---|---|---|"]

    def row(label: str, ratios: list[float], target: float | None, note: str = "") -> None:
        median = statistics.median(ratios)
        verdict = "" if target is None else (" ✓" if median <= target else " ✗")
        rows.append(f"| {label} | {median:.2f}x{verdict} | "
                    f"{', '.join(f'{r:.2f}' for r in ratios)} | "
                    f"{'≤ ' + format(target, '.2f') + 'x' if target else ''}{note} |")

    for result in results.get("collection", []):
        n = result["studies"]
        if not result["flow_vs_raw"]:  # --flow-only: growth only
            continue
        row(f"collection flow / raw REST, {n} studies", result["flow_vs_raw"],
            TARGETS["collection vs raw"])
        row(f"collection flow / PyOrthanc threaded, {n} studies", result["flow_vs_pyorthanc"],
            1.0)
        if "sequential_vs_flow" in result:
            speedup = result["sequential_vs_flow"]
            rows.append(f"| PyOrthanc sequential / collection flow, {n} studies | "
                        f"{speedup:.2f}x{' ✓' if speedup >= 3 else ' ✗'} | | ≥ 3x |")
    if "tasks" in results:
        row("task layer / raw REST", results["tasks"]["tasks_vs_raw"],
            TARGETS["task layer vs raw"])
    for key, label in (("sharing_tiny", "tiny"), ("sharing_ct", "CT")):
        if key in results:
            s = results[key]
            row(f"sharing warm / raw anonymize + archive, {s['studies']} {label} studies "
                f"({s['instances']} instances)", s["warm_ratios"],
                TARGETS[f"sharing {label} vs raw"])
            extra = statistics.median(
                c["seconds"] - c["warm_seconds"] for c in s["runs"]["flow"])
            rows.append(f"| sharing cold start (first run in a process), {label} | "
                        f"+{extra:.2f} s{' ✓' if extra <= 2 else ' ✗'} | | ≤ +2 s |")
    if results.get("collection"):
        rows += ["", "| studies | flow s/study | flow peak RSS MB | raw s/study |",
                 "|---|---|---|---|"]
        for result in results["collection"]:
            n = result["studies"]
            raw_runs = [r["seconds"] for r in result["runs"]["raw"]]
            raw = f"{statistics.median(raw_runs) / n:.3f}" if raw_runs else "-"
            rows.append(f"| {n} | {result['flow_s_per_study']:.3f} | "
                        f"{result['flow_peak_mb']:.0f} | {raw} |")
    return "\n".join(rows)


def run_database(database: Literal["sqlite", "postgres"],
                 args: argparse.Namespace) -> dict[str, Any]:
    from bench._server import prefect_server
    from prefect_orthanc.tasks.limits import ensure_limits

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"bench-all-{database}-") as home, \
            prefect_server(database, Path(home)) as api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = api_url  # for every process started below
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            asyncio.run(ensure_limits({"pacs": args.concurrency}))
        q = args.quick
        if "collection" in args.parts:
            results["collection"] = [
                collection(size, args.rounds, args.concurrency, 4 if q else args.instances,
                           sequential=not args.no_sequential, flow_only=args.flow_only)
                for size in ([4] if q else args.sizes + ([200] if args.big else []))]
        if "tasks" in args.parts:
            results["tasks"] = task_layer(4 if q else 20, 1 if q else args.rounds,
                                          args.concurrency)
        if "sharing" in args.parts:
            results["sharing_tiny"] = sharing("tiny", 4 if q else 20, 4 if q else 20,
                                              1 if q else args.rounds, args.concurrency)
            results["sharing_ct"] = sharing("ct", 2 if q else 10, 10 if q else 100,
                                            1 if q else args.rounds, args.concurrency)
    os.environ.pop("PREFECT_API_URL", None)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"),
                        default="sqlite")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--big", action="store_true", help="collection at 200 studies too")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--parts", nargs="+", default=["collection", "tasks", "sharing"],
                        choices=("collection", "tasks", "sharing"))
    parser.add_argument("--instances", type=int, default=20,
                        help="instances per collected study (2 series; default 20)")
    parser.add_argument("--flow-only", action="store_true",
                        help="collection: time only the flow (growth: s/study, peak RSS), "
                             "e.g. --sizes 1000 --instances 2 --parts collection --flow-only")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip PyOrthanc's sequential script (slow at 200 studies)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one round: a smoke run of every part")
    parser.add_argument("--child-collect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_collect:
        print(json.dumps(collect_child(args.child_collect, args.concurrency)))
        return 0
    if args.quick:
        args.rounds = 1
    needs_peer = "collection" in args.parts and not args.flow_only
    if needs_peer and importlib.util.find_spec("pyorthanc") is None:
        parser.error("the PyOrthanc peer is not installed: .venv/bin/pip install -e '.[bench]' "
                     "(or --flow-only, or --parts tasks sharing)")
    started = time.perf_counter()
    databases: list[Literal["sqlite", "postgres"]] = (
        ["sqlite", "postgres"] if args.database == "both" else [args.database])
    everything = {database: run_database(database, args) for database in databases}
    if args.quick:
        print("\n**--quick: a smoke run** (4 studies, one round): the ratios below say the "
              "parts run, not whether the targets are met")
    for database, results in everything.items():
        print(table(database, results))
    print(f"\n(run_all: {time.perf_counter() - started:.0f} s; spread = min-max of the "
          f"rounds; the machine's other load widens it)")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    # a smoke run never overwrites a full run's figures
    name = "run_all.quick.json" if args.quick else "run_all.json"
    (out / name).write_text(json.dumps({"arguments": sys.argv[1:], **everything}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
