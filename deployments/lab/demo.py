"""The main job on the embedded default: a local Orthanc lab and a local Prefect server.

1. starts a local Prefect server (SQLite, UI included) and a "pacs" and a "research" Orthanc
   (Debian's 1.10.1) on free loopback ports; research runs the project's Lua emitter, which
   posts an ``orthanc.study.stable`` event to Prefect for every new stable study;
2. creates the work pool, the PACS concurrency limit and the blocks (``deployments setup``)
   and serves prefect.yaml's deployments from a second process (``deployments serve``);
3. loads a synthetic demo cohort (made-up patients, PHI planted on purpose) into the pacs and
   writes its cohort CSV of accession numbers (plus one the PACS does not know) where the
   nightly deployment looks for it: ``cohorts/research.csv`` under the site's data directory
   (``PREFECT_ORTHANC_DATA_DIR``, here ``demo-output/data``);
4. runs the served ``collect-research-cohort/nightly`` deployment with one parameter
   overridden (``time_window: null``, the rest stays the deployment's): plan by C-FIND,
   C-MOVE the missing studies into research as jobs, verify instance counts, mark them
   collected; then again, to show nothing moves twice;
5. runs the served ``share-deidentified/ad-hoc`` deployment with its defaults: project
   research, de-identified into ``demo-output/data/shared`` (keyed pseudonyms, shifted dates,
   every instance scanned before delivery);
6. C-STOREs a new study into research and waits for the served new-study deployment to run
   once for it (Lua emitter -> Prefect event -> trigger);
7. waits for a run the server's scheduler made (the changes watcher, its interval shortened to
   20 s for the demo) to complete, checks the Prefect server's log for tracebacks from its
   services, and prints a summary.

    scripts/demo   # or (the UI stays up):
    .venv/bin/python -m prefect_orthanc.deployments.lab.demo --keep
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
from typing import cast

ROOT = Path(__file__).resolve().parents[2]


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefect_orthanc.deployments.lab.demo",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo-output",
                        help="where the cohort, reports and lab data go (default: demo-output)")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--keep", action="store_true",
                        help="keep Prefect (with its UI), the lab and the served deployments "
                             "running until Ctrl-C after the demo")
    args = parser.parse_args(argv)

    from prefect_orthanc.deployments.lab.prefect_server import LocalPrefectServer

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
                           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                           # the site's data (cohorts, reports, linkage, shared packages):
                           # synthetic here, so allowed inside the checkout's demo-output/
                           "PREFECT_ORTHANC_DATA_DIR": str(out / "data"),
                           "PREFECT_ORTHANC_ALLOW_DATA_IN_CHECKOUT": "true"})
        # run logs go to the UI at INFO; the console shows warnings only
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        return _with_prefect(args, out, started, prefect_server.url)


def _with_prefect(args: argparse.Namespace, out: Path, started: float, ui_url: str) -> int:
    from prefect_orthanc.deployments.files import STUDY_EVENTS_LUA
    from prefect_orthanc.deployments.lab.processes import stop_group
    from prefect_orthanc.deployments.lab.servers import OrthancLab

    _banner("starting the Orthanc lab (pacs + research, Debian's Orthanc)")
    lua = Path(str(STUDY_EVENTS_LUA))
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
        from prefect_orthanc.flows.sharing import SECRET_ENV

        os.environ.setdefault(SECRET_ENV, secrets.token_hex(24))  # a throwaway demo secret

        _banner("setup: work pool, PACS concurrency limit, blocks "
                "(python -m prefect_orthanc.deployments setup)")
        from prefect_orthanc.deployments.setup import setup

        for what, outcome in setup().items():
            print(f"{what}: {outcome}")

        _banner("serving prefect.yaml's deployments (python -m prefect_orthanc.deployments serve)")
        spec = _demo_prefect_yaml(out)
        print(f"as shipped, except the changes watcher: every {WATCHER_DEMO_INTERVAL} s for "
              f"{WATCHER_DEMO_RUN_FOR} s (shipped: 600 s for 590 s), so that a run made by "
              f"the schedule completes during the demo ({spec})")
        serve_log = out / "serve.log"
        with serve_log.open("wb") as log:
            served = subprocess.Popen([sys.executable, "-m", "prefect_orthanc.deployments", "serve",
                                       "--file", str(spec)], cwd=ROOT,
                                      env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"},
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            return _demo(args, out, started, ui_url, lab, served, serve_log)
        finally:
            stop_group(served)


def _deployment_parameters(name: str) -> dict:
    import yaml

    from prefect_orthanc.deployments.spec import PREFECT_YAML

    data = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in data["deployments"] if d["name"] == name)["parameters"]


WATCHER = "watch-orthanc-changes/research-changes"
WATCHER_DEMO_INTERVAL, WATCHER_DEMO_RUN_FOR = 20, 10


def _demo_prefect_yaml(out: Path) -> Path:
    """The shipped prefect.yaml with the changes watcher's schedule brought forward."""
    import yaml

    from prefect_orthanc.deployments.spec import PREFECT_YAML

    data = yaml.safe_load(PREFECT_YAML.read_text())
    for deployment in data["deployments"]:
        if f"watch-orthanc-changes/{deployment['name']}" == WATCHER:
            deployment["schedules"] = [{"interval": WATCHER_DEMO_INTERVAL, "active": True}]
            deployment["parameters"]["run_for"] = WATCHER_DEMO_RUN_FOR
    path = out / "prefect.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _server_tracebacks() -> int:
    """Tracebacks in the Prefect server's log (its services: scheduler, triggers, ...)."""
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    return log.read_text(errors="replace").count("Traceback (most recent call last)")


NIGHTLY = "collect-research-cohort/nightly"
SHARING = "share-deidentified/ad-hoc"
NIGHTLY_PARAMETERS = _deployment_parameters("nightly")
SHARING_PARAMETERS = _deployment_parameters("ad-hoc")


def _run(name: str, parameters: dict):
    """Run a served deployment (parameters: a partial override) and wait for its end."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    run = cast(FlowRun, run_deployment(name, parameters=parameters, timeout=300,
                                       poll_interval=1, as_subflow=False))  # synchronous
    state = run.state
    print(f"{run.name}: {state.type.value if state else 'no state'} — "
          f"{state.message if state else ''}")
    return run


def _report_rows(cohort_csv: Path) -> list[dict[str, str]]:
    """The result_* columns of the cohort's report (the cohort's own columns are left out:
    they are the identifiers)."""
    report = cohort_csv.with_name(f"{cohort_csv.stem}.report.csv")
    with report.open(newline="", encoding="utf-8") as handle:
        return [{k: v for k, v in row.items() if k.startswith("result_")}
                for row in csv.DictReader(handle)]


def _new_study_run(study_id: str, timeout: float) -> dict | None:
    """The finished route-new-study run for this study (None if none came in time), with the
    number of runs made for the study."""
    from prefect_orthanc.deployments.lab.runs import new_study_runs, wait_until_final

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
    from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort, zip_bytes

    _banner("loading a synthetic demo cohort into the pacs")
    cohort = make_cohort(out / "dicom", patients=args.patients, studies_per_patient=2,
                         series_per_study=2, instances_per_series=5, seed=7)
    stored = load_into(lab.pacs.url, cohort.files)
    print(f"{len(cohort.studies)} studies, {stored} instances in the pacs")

    # The nightly deployment reads cohorts/research.csv under the site's data directory: the
    # demo puts its cohort exactly there, so every shipped deployment runs with its defaults.
    from prefect_orthanc.flows.site import SiteSettings

    site = SiteSettings.load()
    cohort_csv = site.path(NIGHTLY_PARAMETERS["cohort_file"])
    cohort_csv.parent.mkdir(parents=True, exist_ok=True)
    wanted = cohort.studies[: max(1, len(cohort.studies) - 2)]
    with cohort_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number"])
        writer.writerows([[s.accession] for s in wanted] + [["ACC00000000"]])
    print(f"cohort: {cohort_csv} ({len(wanted)} known accession numbers + 1 unknown), where "
          f"{NIGHTLY} looks for it")

    from prefect_orthanc.deployments.lab.runs import wait_until_served

    wait_until_served([NIGHTLY, SHARING], served, serve_log)
    _banner(f"running {NIGHTLY} now, with one parameter overridden")
    print("  --param time_window=null: the 19:00-07:00 window is for the schedule; the "
          "cohort, project and paths stay the deployment's")
    first_started = time.monotonic()
    first = _run(NIGHTLY, {"time_window": None})
    first_seconds = time.monotonic() - first_started
    rows = _report_rows(cohort_csv)
    print("\n| row | status | studies | expected | received | moved |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['result_row']} | {row['result_status']} | {row['result_studies']} | "
              f"{row['result_expected_instances']} | {row['result_received_instances']} | "
              f"{row['result_moved']} |")

    _banner("running it again (nothing should move)")
    again_started = time.monotonic()
    again = _run(NIGHTLY, {"time_window": None})
    again_seconds = time.monotonic() - again_started
    moved_again = sum(int(r["result_moved"] or 0) for r in _report_rows(cohort_csv))

    _banner(f"running {SHARING} with its defaults (project research, de-identified)")
    sharing = _run(SHARING, {})
    shared_dir = site.path(SHARING_PARAMETERS["destination"]["target"])
    for item in sorted(shared_dir.glob("*.zip")):
        print(f"  {item.name}: {item.stat().st_size // 1024} KB")
    delivered = len(list(shared_dir.glob("*.zip")))

    _banner("a new study arrives in research (C-STORE) -> event -> new-study flow")
    from prefect_orthanc.deployments.lab.runs import ROUTE_DEPLOYMENT

    wait_until_served([ROUTE_DEPLOYMENT], served, serve_log)
    from prefect_orthanc.orthanc_client import Orthanc

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

    _banner(f"a run made by a schedule: {WATCHER} (every {WATCHER_DEMO_INTERVAL} s here)")
    from prefect_orthanc.deployments.lab.runs import wait_for_scheduled_run

    try:
        scheduled = wait_for_scheduled_run(WATCHER, timeout=3 * WATCHER_DEMO_INTERVAL + 60)
        print(f"scheduled run '{scheduled['name']}' (expected start "
              f"{scheduled['expected_start_time'][11:19]} UTC) {scheduled['state']['type']} — "
              f"{scheduled['state']['message']}")
    except (RuntimeError, TimeoutError) as error:
        scheduled = None
        print(f"{error}: see {serve_log}")
    tracebacks = _server_tracebacks()
    print(f"Prefect server log: {tracebacks} traceback(s) from its services")

    _banner("summary")
    complete = [r for r in rows if r["result_status"] in ("collected", "already_present")]
    print(f"{NIGHTLY}: {first.state.type.value} in {first_seconds:.1f} s, "
          f"{len(complete)} cohort rows collected; re-run {again_seconds:.1f} s, "
          f"{moved_again} moved on re-run")
    print(f"per-row report (holds your cohort's identifiers): "
          f"{cohort_csv.with_name(cohort_csv.stem + '.report.csv')}")
    print(f"{SHARING}: {sharing.state.type.value}, {delivered} de-identified packages + "
          f"manifest in {shared_dir}")
    print(f"linkage table (re-identification key, keep private): "
          f"{site.path(SHARING_PARAMETERS['linkage_path'])}")
    print(f"new-study flow: {'1 run, ' + routed['state']['type'] if routed else 'no run'}")
    print(f"{WATCHER}: {'a scheduled run completed' if scheduled else 'no scheduled run'}; "
          f"server log: {tracebacks} traceback(s)")
    print(f"site data directory (PREFECT_ORTHANC_DATA_DIR): {site.data_dir}")
    print(f"Prefect UI: {ui_url}   served deployments' log: {serve_log}")
    print(f"demo data, lab storage and Prefect database: {out}")
    print(f"total {time.monotonic() - started:.1f} s")
    ok = (first.state.is_completed() and again.state.is_completed() and moved_again == 0
          and sharing.state.is_completed() and delivered == len(wanted)
          and routed is not None and routed["state"]["type"] == "COMPLETED"
          and routed["count"] == 1
          and scheduled is not None and tracebacks == 0)
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
