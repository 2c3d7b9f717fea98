"""Benchmark: the research collection flow end to end versus raw REST, and how it scales.

For each cohort size: a fresh lab with that many studies in the pacs, then (alternating) the
raw path — one C-FIND per cohort row, then C-MOVE jobs ``--concurrency`` at a time, each polled
and counted — and ``collect_cohort`` on a CSV of the same accession numbers at the same
concurrency (plan, retrieve, verify, mark, report). Research is emptied between runs.

    .venv/bin/python bench/collection_flow.py --sizes 10 50 200 --concurrency 4

Uses PREFECT_API_URL when set (e.g. a server on PostgreSQL), else the embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import loaded_lab, quiet_prefect, write_accession_cohort

quiet_prefect()

import httpx

from bench import _raw


def raw_collect(url: str, auth: tuple[str, str], accessions: list[str], concurrency: int
                ) -> float:
    """Raw REST: resolve each accession by C-FIND, then move + verify in parallel."""
    started = time.perf_counter()
    with httpx.Client(base_url=url, auth=auth, timeout=600) as http:
        uids = []
        for accession in accessions:
            query = http.post("/modalities/pacs/query", json={
                "Level": "Study", "Query": {"AccessionNumber": accession,
                                            "StudyInstanceUID": ""}}).json()
            answers = http.get(f"/queries/{query['ID']}/answers",
                               params={"expand": "", "simplify": ""}).json()
            uids += [a["StudyInstanceUID"] for a in answers]
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda uid: _raw.retrieve_one(http, "pacs", "RESEARCH", uid), uids))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--instances", type=int, default=20, help="per study (2 series)")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    from prefect_orthanc.flows.collection import collect_cohort
    from prefect_orthanc.tasks.limits import ensure_limits

    asyncio.run(ensure_limits({"pacs": args.concurrency}))
    rows = []
    for size in args.sizes:
        with loaded_lab(size, args.instances, seed=size) as (lab, cohort, auth, tmp):
            accessions = [s.accession for s in cohort.studies]
            path = write_accession_cohort(tmp / "cohort.csv", accessions)
            os.environ.update({"ORTHANC_URL": lab.research.url, "ORTHANC_USERNAME": auth[0],
                               "ORTHANC_PASSWORD": auth[1]})
            raw = raw_collect(lab.research.url, auth, accessions, args.concurrency)
            _raw.clear(lab.research.url, auth)
            started = time.perf_counter()
            # a flow that returns a State gives that state's data when called: the report
            report: Any = collect_cohort(cohort_file=str(path), concurrency=args.concurrency)
            flow_seconds = time.perf_counter() - started
            assert report.studies_complete == size, report
            again_started = time.perf_counter()
            again: Any = collect_cohort(cohort_file=str(path), concurrency=args.concurrency)
            rerun = time.perf_counter() - again_started
            assert again.studies_moved == 0
        rows.append({"studies": size, "raw_s": raw, "flow_s": flow_seconds, "rerun_s": rerun,
                     "overhead": flow_seconds / raw - 1})
        print(f"{size} studies: raw {raw:.1f} s, flow {flow_seconds:.1f} s "
              f"({flow_seconds / raw - 1:+.1%}), re-run {rerun:.1f} s", flush=True)

    print("\n| studies | raw REST s | flow s | flow vs raw | flow s/study | re-run s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['studies']} | {r['raw_s']:.1f} | {r['flow_s']:.1f} | {r['overhead']:+.1%} "
              f"| {r['flow_s'] / r['studies']:.2f} | {r['rerun_s']:.1f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "collection_flow.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
