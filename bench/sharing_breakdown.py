"""Where a sharing run's time goes, per study: Orthanc calls (by route), Prefect's task engine
and API calls, and our own Python work (parse, rewrite, scan, package, records).

Stores a cohort in a lab's research Orthanc (``--kind tiny|ct``), runs ``share_studies`` once
to warm up, then once more with every step below timed (``bench._timing``: exclusive
thread-seconds, so nested steps are counted once) and prints thread-seconds per study by
category next to the warm run's wall time. With ``--concurrency`` 4 on 2 cores, the threads'
seconds add up to more than the wall time; the process pool's work (when sharing uses one) is
counted as the time the threads wait for it.

    .venv/bin/python bench/sharing_breakdown.py --kind ct --studies 10

Uses PREFECT_API_URL when set, else starts Prefect's server on SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import quiet_prefect

quiet_prefect()

#: (target, category): our Python work, by step. Missing targets are skipped, so the script
#: measures the code before and after a change alike.
PYTHON_STEPS = [
    ("prefect_orthanc.flows.sharing.deidentify:dcmread", "ours: parse DICOM (pydicom)"),
    ("prefect_orthanc.flows.deid.scan:dcmread", "ours: parse DICOM (pydicom)"),
    ("prefect_orthanc.flows.deid.rewrite:Rewriter.rewrite", "ours: rewrite (pydicom)"),
    ("prefect_orthanc.flows.deid.rewrite:Rewriter.to_bytes", "ours: write DICOM (pydicom)"),
    ("prefect_orthanc.flows.sharing.deidentify:identifiers_from", "ours: source identifiers"),
    ("prefect_orthanc.flows.sharing.deidentify:build_request", "ours: pseudonyms, request"),
    ("prefect_orthanc.flows.sharing.deidentify:risk_reason", "ours: risk check"),
    ("prefect_orthanc.flows.sharing.deidentify:scan_zip", "ours: scan the package"),
    ("prefect_orthanc.flows.deid.scan:_count_if_surely_clean", "ours: scan the package"),
    ("prefect_orthanc.flows.deid.scan:scan_dataset", "ours: scan the package"),
    ("prefect_orthanc.flows.sharing.deidentify:deterministic_zip", "ours: repack the ZIP"),
    ("prefect_orthanc.flows.sharing.delivery:publish", "ours: publish (copy, fsync)"),
    ("prefect_orthanc.flows.sharing.delivery:update_manifest", "ours: records (fsync)"),
    ("prefect_orthanc.flows.sharing.delivery:append_linkage", "ours: records (fsync)"),
    ("prefect_orthanc.flows.sharing.ledger:Ledger.record", "ours: records (fsync)"),
    ("prefect_orthanc.flows.sharing.ledger:Ledger.delivery", "ours: records (fsync)"),
    ("prefect_orthanc.flows.sharing.ledger:Ledger.history", "ours: records (fsync)"),
    ("prefect_orthanc.flows.sharing.staging:remove_staged", "ours: staging clean-up"),
    ("prefect_orthanc.flows.sharing.delivery:remove_staged", "ours: staging clean-up"),
    ("prefect_orthanc.flows.sharing.flow:remove_staged", "ours: staging clean-up"),
    ("prefect_orthanc.flows.sharing.deidentify:remove_staged", "ours: staging clean-up"),
    ("prefect_orthanc.flows.sharing.deidentify:package_files", "ours: write the package"),
    ("prefect_orthanc.flows.sharing.deidentify:scan_package", "ours: source identifiers"),
]
#: Prefect's UUIDs and Orthanc's IDs in paths, grouped
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                 r"|[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


def _orthanc_category(self: Any, step: Any) -> str:
    call = getattr(step, "call", None)
    if call is None:
        return "orthanc: retry back-off sleep"
    return f"orthanc: {call.method} {_ID.sub('{id}', call.route)}"


def _prefect_category(self: Any, request: Any, *args: Any, **kwargs: Any) -> str:
    path = _ID.sub("{id}", request.url.path.removeprefix("/api"))
    return f"prefect API: {request.method} {path}"


def instrument(timers: Any) -> None:
    timers.wrap("prefect_orthanc.orthanc_client.client:Orthanc._execute", _orthanc_category)
    timers.wrap("prefect.client.base:PrefectHttpxSyncClient.send", _prefect_category)
    timers.wrap("prefect.client.base:PrefectHttpxAsyncClient.send", _prefect_category,
                is_async=True)
    for target in ("prefect.task_engine:run_task_sync", "prefect.task_engine:run_task"):
        timers.wrap(target, "prefect: task engine (ours excluded)")
    timers.wrap("prefect_orthanc.tasks.slots:study_lock", "prefect: study locks (setup)")
    for target, category in PYTHON_STEPS:
        timers.wrap(target, category)
    from prefect_orthanc.flows.sharing import flow as sharing_flow

    for name in ("share_study", "deidentify_study", "deliver_study"):
        task = getattr(sharing_flow, name, None) or getattr(
            __import__("prefect_orthanc.flows.sharing", fromlist=[name]), name, None)
        if task is not None and hasattr(task, "fn"):
            timers.wrap(f"{task.fn.__module__}:{name}.fn", "ours: other Python in the task")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("tiny", "ct"), default="ct")
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--instances", type=int, default=None)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    instances = args.instances or (100 if args.kind == "ct" else 20)

    from bench._server import prefect_server
    from bench._timing import Timers
    from bench.sharing_flow import SECRET, load_studies
    from prefect_orthanc.deployments.lab.servers import OrthancLab

    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as tmp_name:
        tmp = Path(tmp_name)
        with OrthancLab.start() as lab, prefect_server(args.database, tmp / "server") \
                as api_url:
            os.environ.update({
                "PREFECT_API_URL": os.environ.get("PREFECT_API_URL") or api_url,
                "ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": lab.research.username or "",
                "ORTHANC_PASSWORD": lab.research.password or "",
                "PREFECT_ORTHANC_DEID_SECRET": SECRET})
            ids = load_studies(lab, args.kind, args.studies, instances, tmp)
            from prefect_orthanc.flows.sharing import Destination, share_studies

            def share(target: Path) -> float:
                started = time.perf_counter()
                state = share_studies(
                    study_ids=ids, destination=Destination(kind="directory",
                                                           target=str(target / "shared")),
                    linkage_path=str(target / "linkage.csv"),
                    staging_dir=str(target / "staging"),
                    ledger_path=str(target / "ledger.jsonl"), return_state=True)
                assert state.is_completed(), state.message
                return time.perf_counter() - started

            cold = share(tmp / "cold")
            timers = Timers()
            instrument(timers)
            try:
                warm = share(tmp / "warm")
            finally:
                timers.restore()
    totals, counts = timers.totals(), timers.counts()
    n = len(ids)
    print(f"\n{n} {args.kind} studies x {instances} instances; cold run {cold:.2f} s, "
          f"timed warm run {warm:.2f} s wall ({warm / n:.3f} s per study)")
    print("| category | thread-s per study | calls per study |")
    print("|---|---|---|")
    for category, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {category} | {seconds / n:.4f} | {counts[category] / n:.1f} |")
    print(f"| **sum** | {sum(totals.values()) / n:.4f} | |")
    if args.json:
        args.json.write_text(json.dumps({"kind": args.kind, "studies": n,
                                         "instances": instances, "cold_s": cold,
                                         "warm_s": warm, "totals": totals,
                                         "counts": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
