"""Screenshots of the Prefect UI for the README, taken with headless Chromium.

Run the demo with ``--keep`` first, then point this at the UI it printed::

    .venv/bin/python -m prefect_orthanc.deployments.lab.demo --keep &
    .venv/bin/python -m prefect_orthanc.deployments.lab.screenshots http://127.0.0.1:PORT \
        docs/screenshots

It captures the deployments page, the sharing deployment's custom-run form, the collection
run's report artifact and the new-study run. Chromium comes from Debian (``apt-get install
chromium``); the flags keep it headless, sandbox-free (containers run as root) and off the
network except for the given UI.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-sync", "--disable-extensions",
                  "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=15000"]


def _first(api: str, path: str, body: dict) -> dict:
    items = httpx.post(f"{api}{path}", json={"limit": 1, "offset": 0, **body}, timeout=10).json()
    if not items:
        raise SystemExit(f"nothing found at {path}: run the demo with --keep first")
    return items[0]


def shoot(chromium: str, url: str, out: Path, size: str = "1440,900") -> Path:
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--window-size={size}",
                    f"--screenshot={out}", url], check=True, capture_output=True, timeout=120)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefect_orthanc.deployments.lab.screenshots",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ui", help="the Prefect UI URL the demo printed")
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/screenshots"))
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install chromium")
    ui = args.ui.rstrip("/")
    api = ui + "/api"
    args.out.mkdir(parents=True, exist_ok=True)
    collect = _first(api, "/flow_runs/filter", {
        "flows": {"name": {"any_": ["collect-research-cohort"]}},
        "sort": "EXPECTED_START_TIME_ASC"})
    report = _first(api, "/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [collect["id"]]},
                      "key": {"any_": ["collection-report"]}}, "sort": "CREATED_DESC"})
    routed = _first(api, "/flow_runs/filter", {
        "flows": {"name": {"any_": ["route-new-study"]}}, "sort": "EXPECTED_START_TIME_DESC"})
    sharing = _first(api, "/deployments/filter", {
        "deployments": {"name": {"any_": ["ad-hoc"]}}})
    shots = [shoot(chromium, f"{ui}/deployments", args.out / "deployments.png"),
             # the V2 UI: the V1 run page renders its form faded in headless Chromium
             shoot(chromium, f"{ui}/v2/deployments/deployment/{sharing['id']}/run",
                   args.out / "sharing-form.png", size="1440,1500"),
             shoot(chromium, f"{ui}/artifacts/artifact/{report['id']}",
                   args.out / "collection-report.png"),
             shoot(chromium, f"{ui}/runs/flow-run/{routed['id']}", args.out / "new-study-run.png",
                   size="1440,1000")]
    for shot in shots:
        print(f"{shot} ({shot.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
