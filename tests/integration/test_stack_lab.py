"""The lab's servers listen on loopback only, and a lab restarted in its own directory keeps
the research credentials (and ports) that ``python -m prefect_orthanc.deployments setup`` saved."""

from __future__ import annotations

import re
import subprocess

import httpx

from prefect_orthanc.deployments.lab.servers import OrthancLab


def _listening(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines()
            if (m := re.search(r"pid=(\d+)", line)) and int(m.group(1)) in pids]


def _pids(lab: OrthancLab) -> set[int]:
    return {lab.pacs.pid, lab.research.pid, lab.dcmqr._process.pid}


def test_the_lab_listens_on_loopback_only_and_keeps_its_credentials(tmp_path):
    lab = OrthancLab.start(tmp_path / "lab", dcmqrscp=True)
    try:
        addresses = _listening(_pids(lab))
        # Orthanc 1.10.1 and dcmqrscp bind 0.0.0.0 by themselves: the bind shim moves them
        assert len(addresses) == 5, addresses  # 2 x (HTTP, DICOM) + dcmqrscp
        assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
        saved = (lab.research.url, lab.research.username, lab.research.password)
    finally:
        lab.stop()

    again = OrthancLab.start(tmp_path / "lab", dcmqrscp=True)
    try:
        url, username, password = saved
        assert again.research.url == url, "the restarted lab moved to other ports"
        answer = httpx.get(url + "/system", auth=(username, password), timeout=10)
        assert answer.status_code == 200, "the saved credentials no longer work"
        assert all(a.startswith("127.0.0.1:") for a in _listening(_pids(again)))
    finally:
        again.stop()


def test_a_temporary_lab_gets_a_new_password_each_time():
    with OrthancLab.start() as first:
        password = first.research.password
    with OrthancLab.start() as second:
        assert second.research.password != password
