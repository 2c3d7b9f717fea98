"""The main job on the embedded default: a local Orthanc lab and a local Prefect server.

1. starts a local Prefect server (SQLite, UI included) and a "pacs" and a "research" Orthanc
   (Debian's 1.10.1) on free loopback ports; research runs the project's Lua emitter, which
   posts an ``orthanc.study.stable`` event to Prefect for every new stable study;
2. creates the work pool, the PACS concurrency limit and the blocks (``deployments setup``)
   and serves prefect.yaml's deployments from a second process (``deployments serve``);
3. loads a synthetic demo cohort (made-up patients, PHI planted on purpose) into the pacs and
   writes a cohort CSV of accession numbers (plus one the PACS does not know);
4. runs the research collection flow: plan by C-FIND, C-MOVE the missing studies into research
   as jobs, verify instance counts, mark them collected; then again, to show nothing moves twice;
5. runs the de-identified sharing flow on the collected studies into ``demo-output/shared``
   (keyed pseudonyms, shifted dates, every instance scanned before delivery);
6. C-STOREs a new study into research and waits for the served new-study deployment to run
   once for it (Lua emitter -> Prefect event -> trigger), and prints a summary.

    scripts/demo            # or: .venv/bin/python -m deployments.demo --keep  (UI stays up)
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import shutil
import signal
import subprocess
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
                        help="keep Prefect (with its UI), the lab and the served deployments "
                             "running until Ctrl-C after the demo")
    args = parser.parse_args(argv)

    from deployments.lab.prefect_server import LocalPrefectServer

    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.monotonic()

    _banner("starting a local Prefect server (SQLite, with its UI)")
    with LocalPrefectServer.start(out / "prefect") as prefect_server:
        print(f"Prefect UI {prefect_server.url}   API {prefect_server.api_url}")
        os.environ.update({"PREFECT_API_URL": prefect_server.api_url,
                           "PREFECT_HOME": str(out / "prefect"),
                           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
        # run logs go to the UI at INFO; the console shows warnings only
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        return _with_prefect(args, out, started, prefect_server.url)


def _with_prefect(args: argparse.Namespace, out: Path, started: float, ui_url: str) -> int:
    from deployments.lab.processes import stop_group
    from deployments.lab.servers import OrthancLab

    _banner("starting the Orthanc lab (pacs + research, Debian's Orthanc)")
    lua = ROOT / "deployments" / "orthanc" / "study_events.lua"
    events = {"PrefectEvents": {"Url": os.environ["PREFECT_API_URL"] + "/events",
                                "Server": "research"}}
    with OrthancLab.start(out / "lab", stable_age=2, research_lua_scripts=[lua],
                          research_overrides=events) as lab:
        print(f"pacs     {lab.pacs.url}  AET {lab.pacs.aet}  DICOM port {lab.pacs.dicom_port}")
        print(f"research {lab.research.url}  AET {lab.research.aet}  DICOM port "
              f"{lab.research.dicom_port}  (basic auth, throwaway password in "
              f"{out / 'lab' / 'lab.json'}); Lua emitter -> Prefect events")
        lab.write_info(out / "lab" / "lab.json")
        os.environ.update({"ORTHANC_URL": lab.research.url,
                           "ORTHANC_USERNAME": lab.research.username or "",
                           "ORTHANC_PASSWORD": lab.research.password or ""})
        from flows.sharing import SECRET_ENV

        os.environ.setdefault(SECRET_ENV, secrets.token_hex(24))  # a throwaway demo secret

        _banner("setup: work pool, PACS concurrency limit, blocks (python -m deployments setup)")
        from deployments.stack import setup

        for what, outcome in setup().items():
            print(f"{what}: {outcome}")

        _banner("serving prefect.yaml's deployments (python -m deployments serve)")
        serve_log = out / "serve.log"
        with serve_log.open("wb") as log:
            served = subprocess.Popen([sys.executable, "-m", "deployments", "serve"], cwd=ROOT,
                                      env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"},
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            return _demo(args, out, started, ui_url, lab, served, serve_log)
        finally:
            stop_group(served)


def _new_study_run(study_id: str, timeout: float) -> dict | None:
    """The finished route-new-study run for this study (None if none came in time), with the
    number of runs made for the study."""
    from deployments.stack import new_study_runs, wait_until_final

    deadline = time.monotonic() + timeout
    while not (runs := new_study_runs(study_id)):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.3)
    try:
        final = wait_until_final(runs[0]["id"], max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        return None
    return {**final, "count": len(new_study_runs(study_id))}


def _demo(args: argparse.Namespace, out: Path, started: float, ui_url: str, lab,
          served: subprocess.Popen[bytes], serve_log: Path) -> int:
    from deployments.lab.synthetic import load_into, make_cohort, zip_bytes

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

    from flows.cohort import CollectionRequest
    from flows.collection import collect_cohort

    request = CollectionRequest(cohort_file=str(cohort_csv), project="demo", concurrency=4,
                                report_dir=str(out / "reports"))
    _banner("running the research collection flow")
    first_started = time.monotonic()
    state = collect_cohort(request, credentials_block="research", return_state=True)
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
    again = collect_cohort(request, credentials_block="research")
    again_seconds = time.monotonic() - again_started
    print(f"second run: {again.studies_moved} moved, {again.studies_complete}/"
          f"{again.studies_found} complete")

    _banner("sharing the collected studies, de-identified, into a directory")
    from flows.sharing import Destination, SharingRequest, share_studies

    shared_dir = out / "shared"
    sharing = share_studies(SharingRequest(
        project="demo", destination=Destination(kind="directory", target=str(shared_dir)),
        secret_block="deid-secret", linkage_path=str(out / "private" / "linkage.csv"),
        staging_dir=str(out / "sharing" / "staging"),
        ledger_path=str(out / "sharing" / "ledger.jsonl")), credentials_block="research",
        return_state=True)
    shared = sharing.result(raise_on_failure=False)
    print(f"flow state: {sharing.type.value} — {sharing.message}")
    for item in shared:
        print(f"  {Path(item.file).name}: {item.instances_out} instances, verified "
              f"{item.verified}, sha256 {item.sha256[:12]}…")

    _banner("a new study arrives in research (C-STORE) -> event -> new-study flow")
    from deployments.stack import ROUTE_DEPLOYMENT, wait_until_served

    wait_until_served([ROUTE_DEPLOYMENT], served, serve_log)
    from orthanc_client import Orthanc

    extra = make_cohort(out / "dicom-new", patients=1, studies_per_patient=1,
                        series_per_study=1, instances_per_series=4, seed=99)
    with Orthanc(url=lab.pacs.url) as pacs:
        uploaded = pacs.upload(zip_bytes(extra.files))
        study_id = next(item.parent_study for item in uploaded if item.parent_study)
        pacs.store("research", [study_id], synchronous=True)
    sent = time.monotonic()
    print(f"study {study_id[:8]} C-STOREd pacs -> research; waiting (StableAge 2 s) ...")
    routed = _new_study_run(study_id, timeout=60)
    if routed:
        print(f"route-new-study run '{routed['name']}' {routed['state']['type']} "
              f"{time.monotonic() - sent:.1f} s after the C-STORE — "
              f"{routed['state']['message']} ({routed['count']} run for this study)")
    else:
        print(f"no new-study run within 60 s: see {serve_log}")

    _banner("summary")
    print(f"studies collected into research: {report.studies_complete}/"
          f"{report.studies_found} (first run {first_seconds:.1f} s, "
          f"re-run {again_seconds:.1f} s, {again.studies_moved} moved on re-run)")
    print(f"per-row report (holds your cohort's identifiers): {report.report_path}")
    print(f"de-identified packages + manifest: {shared_dir} "
          f"({sum(bool(i.delivered) for i in shared)} studies)")
    print(f"linkage table (re-identification key, keep private): "
          f"{out / 'private' / 'linkage.csv'}")
    print(f"new-study flow: {'1 run, ' + routed['state']['type'] if routed else 'no run'}")
    print(f"Prefect UI: {ui_url}   served deployments' log: {serve_log}")
    print(f"demo data, lab storage and Prefect database: {out}")
    print(f"total {time.monotonic() - started:.1f} s")
    ok = (state.is_completed() and again.studies_moved == 0 and sharing.is_completed()
          and bool(routed) and routed["state"]["type"] == "COMPLETED" and routed["count"] == 1)
    if args.keep:
        print(f"\neverything is still running: open {ui_url} ; Ctrl-C to stop", flush=True)
        # a background job may have inherited SIGINT ignored; SIGTERM stops cleanly too
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
