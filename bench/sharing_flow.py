"""Benchmark: de-identified sharing (``share_studies``: anonymize, rewrite, verify, package,
deliver) versus Orthanc's raw anonymize + archive calls for the same studies, with peak memory.

The studies are stored in research once; then, alternating round by round, each path runs in
a fresh process (so its peak RSS is its own), ``--concurrency`` studies at a time:

* raw:  POST /studies/{id}/anonymize (job, pseudonyms in Replace) → wait → GET archive to disk
  → delete the copy: what a script that trusts Orthanc's Basic Profile does
* flow: ``share_studies`` to a directory, twice in the process: ``cold`` is the process's first
  flow run (Prefect's client, workers and imports warming up), ``warm`` the second

Two cohorts (``--kind``): ``tiny`` (the lab's synthetic CT/MR studies, 16x16 pixels) and ``ct``
(``bench.ct_studies``: a real CT header from pydicom's test files, 512x512 16-bit pixels).

    .venv/bin/python bench/sharing_flow.py --kind ct --studies 10 --instances 100 --rounds 3

Uses PREFECT_API_URL when set, else starts Prefect's server on SQLite for the run
(``--database postgres``: on a PostgreSQL cluster of its own).
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import peak_rss_mb, quiet_prefect

quiet_prefect()

SECRET = "bench-secret-0123456789abcdef"


def raw_share(ids: list[str], out: Path, concurrency: int) -> None:
    """Orthanc's own anonymize job and archive per study, ``concurrency`` at a time."""
    import httpx

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


def child(mode: str, ids: list[str], out: Path, concurrency: int) -> dict[str, float]:
    from prefect_orthanc.flows.sharing import Destination, share_studies  # imports: untimed

    before = peak_rss_mb()
    started = time.perf_counter()
    if mode == "raw":
        raw_share(ids, out, concurrency)
        return {"seconds": time.perf_counter() - started, "peak_mb": peak_rss_mb(),
                "before_mb": before}

    def share(target: Path) -> None:
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


def load_studies(lab: Any, kind: str, studies: int, instances: int, tmp: Path) -> list[str]:
    """Store the cohort in research; returns its study IDs."""
    from prefect_orthanc.orthanc_client import Orthanc

    with Orthanc(url=lab.research.url, username=lab.research.username,
                 password=lab.research.password) as research:
        if kind == "ct":
            from bench.ct_studies import ct_study_files

            for study in range(studies):
                with ThreadPoolExecutor(2) as pool:
                    list(pool.map(research.upload, ct_study_files(study, instances)))
        else:
            from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort

            cohort = make_cohort(tmp / "dicom", patients=max(1, studies // 2),
                                 studies_per_patient=2, series_per_study=2,
                                 instances_per_series=max(1, instances // 2), seed=9)
            load_into(lab.research.url, cohort.files,
                      auth=(lab.research.username, lab.research.password))
        return research.find("Study")


def run(kind: str = "tiny", studies: int = 20, instances: int = 20, rounds: int = 3,
        concurrency: int = 4, log: Any = print) -> dict[str, Any]:
    """Alternating rounds (raw, flow) on one lab; the medians, spreads and ratios."""
    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.orthanc_client import Orthanc

    with OrthancLab.start() as lab, tempfile.TemporaryDirectory() as tmp:
        ids = load_studies(lab, kind, studies, instances, Path(tmp))
        with Orthanc(url=lab.research.url, username=lab.research.username,
                     password=lab.research.password) as research:
            size_mb = research.statistics()["TotalDiskSizeMB"]
            count = research.statistics()["CountInstances"]
        env = {**os.environ, "ORTHANC_URL": lab.research.url,
               "ORTHANC_USERNAME": lab.research.username or "",
               "ORTHANC_PASSWORD": lab.research.password or "",
               "PREFECT_ORTHANC_DEID_SECRET": SECRET}
        runs: dict[str, list[dict[str, float]]] = {"raw": [], "flow": []}
        for round_index in range(rounds):
            for mode in ("raw", "flow"):
                out = Path(tmp) / f"{mode}-{round_index}"
                out.mkdir()
                done = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--ids", ",".join(ids),
                     "--out", str(out), "--concurrency", str(concurrency)],
                    env=env, cwd=ROOT, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{mode} child failed:\n{done.stdout[-2000:]}\n"
                                       f"{done.stderr[-4000:]}")
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
                log(f"  {kind} round {round_index + 1} {mode}: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in runs[mode][-1].items()))
    raw = [r["seconds"] for r in runs["raw"]]
    cold = [r["seconds"] for r in runs["flow"]]
    warm = [r["warm_seconds"] for r in runs["flow"]]
    return {
        "kind": kind, "studies": len(ids), "instances": count, "size_mb": size_mb,
        "concurrency": concurrency, "rounds": rounds, "runs": runs,
        "raw_s": statistics.median(raw), "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "warm_ratio": statistics.median(w / r for w, r in zip(warm, raw, strict=True)),
        "warm_ratios": [w / r for w, r in zip(warm, raw, strict=True)],
        "cold_extra_s": statistics.median(c - w for c, w in zip(cold, warm, strict=True)),
        "peak_mb": max(r["peak_mb"] for r in runs["flow"]),
        "raw_peak_mb": max(r["peak_mb"] for r in runs["raw"]),
    }


def table(result: dict[str, Any]) -> str:
    n = result["studies"]
    lines = [f"{n} {result['kind']} studies, {result['instances']} instances "
             f"({result['size_mb']} MB), concurrency {result['concurrency']}, "
             f"{result['rounds']} alternating rounds",
             "| path | median s | per study s | all rounds s | peak RSS MB |",
             "|---|---|---|---|---|"]
    rows = (("raw anonymize + archive", "raw", "seconds"), ("flow, cold", "flow", "seconds"),
            ("flow, warm", "flow", "warm_seconds"))
    for label, mode, key in rows:
        values = [r[key] for r in result["runs"][mode]]
        median = statistics.median(values)
        lines.append(f"| {label} | {median:.2f} | {median / n:.3f} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} | "
                     f"{max(r['peak_mb'] for r in result['runs'][mode]):.0f} |")
    lines.append(f"warm flow / raw: {result['warm_ratio']:.2f}x (per round: "
                 f"{', '.join(f'{r:.2f}' for r in result['warm_ratios'])}); cold start adds "
                 f"{result['cold_extra_s']:.2f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("tiny", "ct"), default="tiny")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--instances", type=int, default=None,
                        help="per study (default: 20 tiny, 100 ct)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                        help="when PREFECT_API_URL is not set: the server's database")
    parser.add_argument("--child", choices=("raw", "flow"))
    parser.add_argument("--ids")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ids.split(","), args.out, args.concurrency)))
        return 0
    instances = args.instances or (100 if args.kind == "ct" else 20)
    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as home:
        if os.environ.get("PREFECT_API_URL"):
            result = run(args.kind, args.studies, instances, args.rounds, args.concurrency)
        else:
            from bench._server import prefect_server

            with prefect_server(args.database, Path(home)) as api_url:
                os.environ["PREFECT_API_URL"] = api_url
                result = run(args.kind, args.studies, instances, args.rounds,
                             args.concurrency)
    print(table(result))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"sharing_flow_{args.kind}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
