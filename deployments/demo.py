"""The main job on the embedded default: a local Orthanc lab and Prefect's embedded server.

1. starts a "pacs" and a "research" Orthanc (Debian's 1.10.1) on free loopback ports;
2. loads a synthetic demo cohort (made-up patients, PHI planted on purpose) into the pacs;
3. writes a cohort CSV of accession numbers (plus one that the PACS does not know);
4. runs the research collection flow on Prefect's embedded server: plan by C-FIND, C-MOVE the
   missing studies into research as jobs, verify instance counts, mark them collected;
5. runs it again to show that nothing moves twice;
6. runs the de-identified sharing flow on the collected studies into ``demo-output/shared``
   (keyed pseudonyms, shifted dates, every instance scanned before delivery), and prints a
   summary.

    scripts/demo            # or: .venv/bin/python -m deployments.demo --keep
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output",
                        help="where the cohort, reports and lab data go (default: demo-output)")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--keep", action="store_true",
                        help="keep the lab running until Ctrl-C after the demo")
    args = parser.parse_args(argv)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from deployments.lab.servers import OrthancLab
    from deployments.lab.synthetic import load_into, make_cohort

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.monotonic()

    _banner("starting the Orthanc lab (pacs + research, Debian's Orthanc)")
    with OrthancLab.start(out / "lab", stable_age=2) as lab:
        print(f"pacs     {lab.pacs.url}  AET {lab.pacs.aet}  DICOM port {lab.pacs.dicom_port}")
        print(f"research {lab.research.url}  AET {lab.research.aet}  DICOM port "
              f"{lab.research.dicom_port}  (basic auth, throwaway password in "
              f"{out / 'lab' / 'lab.json'})")
        lab.write_info(out / "lab" / "lab.json")

        _banner("loading a synthetic demo cohort into the pacs")
        cohort = make_cohort(out / "dicom", patients=args.patients, studies_per_patient=2,
                             series_per_study=2, instances_per_series=5, seed=7)
        stored = load_into(lab.pacs.url, cohort.files)
        print(f"{len(cohort.studies)} studies, {stored} instances in the pacs")

        cohort_csv = out / "cohort.csv"
        wanted = cohort.studies[: max(1, len(cohort.studies) - 2)]
        with cohort_csv.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["accession_number"])
            writer.writerows([[s.accession] for s in wanted] + [["ACC00000000"]])
        print(f"cohort: {cohort_csv} ({len(wanted)} known accession numbers + 1 unknown)")

        os.environ.update({"ORTHANC_URL": lab.research.url,
                           "ORTHANC_USERNAME": lab.research.username or "",
                           "ORTHANC_PASSWORD": lab.research.password or ""})
        from flows.cohort import CollectionRequest
        from flows.collection import collect_cohort
        from tasks.limits import ensure_limits

        _banner("Prefect: embedded server, PACS concurrency limit")
        for name, what in asyncio.run(ensure_limits({"pacs": 2})).items():
            print(f"{name}: {what}")

        request = CollectionRequest(cohort_file=str(cohort_csv), project="demo", concurrency=4)
        _banner("running the research collection flow")
        first_started = time.monotonic()
        state = collect_cohort(request, return_state=True)
        first_seconds = time.monotonic() - first_started
        report = state.result(raise_on_failure=False)
        print(f"flow state: {state.type.value} — {state.message}")
        print("\n| row | status | studies | expected | received | moved |")
        print("|---|---|---|---|---|---|")
        for row in report.rows:
            print(f"| {row.index} | {row.status} | {row.studies} | {row.expected_instances} | "
                  f"{row.received_instances} | {row.moved} |")

        _banner("running it again (nothing should move)")
        again_started = time.monotonic()
        again = collect_cohort(request)
        again_seconds = time.monotonic() - again_started
        print(f"second run: {again.studies_moved} moved, {again.studies_complete}/"
              f"{again.studies_found} complete")

        _banner("sharing the collected studies, de-identified, into a directory")
        from flows.sharing import SECRET_ENV, Destination, SharingRequest, share_studies

        os.environ.setdefault(SECRET_ENV, secrets.token_hex(24))  # a throwaway demo secret
        shared_dir = out / "shared"
        sharing = share_studies(SharingRequest(
            project="demo", destination=Destination(kind="directory", target=str(shared_dir)),
            linkage_path=str(out / "private" / "linkage.csv"),
            staging_dir=str(out / "sharing" / "staging"),
            ledger_path=str(out / "sharing" / "ledger.jsonl")), return_state=True)
        shared = sharing.result(raise_on_failure=False)
        print(f"flow state: {sharing.type.value} — {sharing.message}")
        for item in shared:
            print(f"  {Path(item.file).name}: {item.instances_out} instances, verified "
                  f"{item.verified}, sha256 {item.sha256[:12]}…")

        _banner("summary")
        print(f"studies collected into research: {report.studies_complete}/"
              f"{report.studies_found} (first run {first_seconds:.1f} s, "
              f"re-run {again_seconds:.1f} s, {again.studies_moved} moved on re-run)")
        print(f"per-row report (holds your cohort's identifiers): {report.report_path}")
        print(f"de-identified packages + manifest: {shared_dir} "
              f"({sum(bool(i.delivered) for i in shared)} studies)")
        print(f"linkage table (re-identification key, keep private): "
              f"{out / 'private' / 'linkage.csv'}")
        print(f"demo data and lab storage: {out}")
        print(f"total {time.monotonic() - started:.1f} s")
        ok = state.is_completed() and again.studies_moved == 0 and sharing.is_completed()
        if args.keep:
            print("\nlab running; Ctrl-C to stop", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
