"""Benchmark: de-identified sharing (anonymize + verify + package) versus Orthanc's raw
anonymize and archive calls for the same N studies, with peak memory.

The studies are collected into research once; then, alternating, each path runs in a fresh
process (so its peak RSS is its own), ``--concurrency`` studies at a time:

* raw:  POST /studies/{id}/anonymize (job, pseudonyms in Replace) → wait → GET archive to disk
* flow: ``share_studies`` to a directory (source files read, risky instances held back, per
  instance Orthanc's Basic Profile + the keyed pydicom rewrite + upload, streamed ZIP, full
  PHI scan, manifest, ledger, cleanup)

    .venv/bin/python bench/sharing_flow.py --studies 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import peak_rss_mb, quiet_prefect

quiet_prefect()


def child(mode: str, ids: list[str], out: Path, concurrency: int) -> dict[str, float]:
    import httpx

    from prefect_orthanc.flows.sharing import Destination, share_studies  # imports: untimed

    before = peak_rss_mb()
    started = time.perf_counter()
    if mode == "raw":
        url, user, password = (os.environ[k] for k in ("ORTHANC_URL", "ORTHANC_USERNAME",
                                                        "ORTHANC_PASSWORD"))

        def one(item: tuple[int, str]) -> None:
            index, study_id = item
            with httpx.Client(base_url=url, auth=(user, password), timeout=600) as http:
                job = http.post(f"/studies/{study_id}/anonymize", json={
                    "Replace": {"PatientID": f"P{index:06d}", "PatientName": f"P{index:06d}"},
                    "Force": True, "KeepSource": True, "Asynchronous": True}).json()["ID"]
                delay = 0.1
                while (info := http.get(f"/jobs/{job}").json())["State"] not in (
                        "Success", "Failure"):
                    time.sleep(delay)
                    delay = min(delay * 1.5, 2.0)
                new_id = info["Content"]["ID"]
                with http.stream("GET", f"/studies/{new_id}/archive") as response, \
                        open(out / f"{index}.zip", "wb") as handle:
                    for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
                http.delete(f"/studies/{new_id}")

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, enumerate(ids)))
    else:
        def share(target: Path):
            # the linkage table, staging and ledger beside the shared directory, never in it
            result = share_studies(
                study_ids=ids, destination=Destination(kind="directory",
                                                       target=str(target / "shared")),
                linkage_path=str(target / "linkage.csv"), staging_dir=str(target / "staging"),
                ledger_path=str(target / "ledger.jsonl"), return_state=True)
            assert result.is_completed(), result.message

        share(out / "cold")  # the first flow run of a process also starts Prefect's workers
        cold = time.perf_counter() - started
        started = time.perf_counter()
        share(out / "warm")
        return {"seconds": cold, "warm_seconds": time.perf_counter() - started,
                "peak_mb": peak_rss_mb(), "before_mb": before}
    return {"seconds": time.perf_counter() - started, "peak_mb": peak_rss_mb(),
            "before_mb": before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--pixels", type=int, default=16,
                        help="image side; >16 uses noise images of that size (CT-like 512)")
    parser.add_argument("--child", choices=("raw", "flow"))
    parser.add_argument("--ids")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ids.split(","), args.out, args.concurrency)))
        return 0

    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort
    from prefect_orthanc.orthanc_client import Orthanc

    with OrthancLab.start() as lab, tempfile.TemporaryDirectory() as tmp:
        with Orthanc(url=lab.research.url, username=lab.research.username,
                     password=lab.research.password) as research:
            if args.pixels > 16:  # bigger images: the archive benchmark's noise studies
                from bench.archive_stream import make_study

                for _ in range(args.studies):
                    research.upload(make_study(args.instances, args.pixels))
            else:
                cohort = make_cohort(Path(tmp) / "dicom", patients=args.studies // 2,
                                     studies_per_patient=2, series_per_study=2,
                                     instances_per_series=args.instances // 2, seed=9)
                load_into(lab.pacs.url, cohort.files)
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda s: research.retrieve_study("pacs", s.study_uid),
                                  cohort.studies))
            ids = research.find("Study")
            size_mb = research.statistics()["TotalDiskSizeMB"]
        env = {**os.environ, "ORTHANC_URL": lab.research.url,
               "ORTHANC_USERNAME": lab.research.username or "",
               "ORTHANC_PASSWORD": lab.research.password or "",
               "PREFECT_ORTHANC_DEID_SECRET": "bench-secret-0123456789abcdef"}
        results: dict[str, list[dict[str, float]]] = {"raw": [], "flow": []}
        for round_index in range(args.rounds):
            for mode in ("raw", "flow"):
                out = Path(tmp) / f"{mode}-{round_index}"
                out.mkdir()
                done = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--ids", ",".join(ids),
                     "--out", str(out), "--concurrency", str(args.concurrency)],
                    env=env, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    print(done.stdout[-2000:], done.stderr[-4000:])
                    return 1
                results[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    raw = statistics.median(r["seconds"] for r in results["raw"])
    flow = statistics.median(r["seconds"] for r in results["flow"])
    print(f"\n{len(ids)} studies × {args.instances} instances of {args.pixels}² pixels "
          f"({size_mb} MB), concurrency {args.concurrency}")
    print("| path | median s | per study s | peak RSS MB |")
    print("|---|---|---|---|")
    for mode, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        print(f"| {mode} | {seconds:.2f} | {seconds / len(ids):.3f} | "
              f"{max(r['peak_mb'] for r in runs):.0f} |")
    warm = statistics.median(r["warm_seconds"] for r in results["flow"])
    print(f"| flow, second run in the same process | {warm:.2f} | {warm / len(ids):.3f} | |")
    print(f"flow vs raw: {flow / raw - 1:+.1%} cold, {warm / raw - 1:+.1%} warm "
          f"(target: within 30 %)")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "sharing_flow.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
