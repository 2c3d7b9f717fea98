"""DCMTK's ``dcmqrscp`` as a second, non-Orthanc PACS for the lab, the tests and the bench.

``Dcmqrscp`` runs one ``/usr/bin/dcmqrscp`` (Debian's ``dcmtk``) on a free loopback port with
its own configuration file and storage area in ``workdir``. The research Orthanc is declared
in its host table, so C-MOVEs to research's AET are allowed; files are loaded with DCMTK's own
``storescu``::

    with Dcmqrscp.start(workdir, move_destinations={"RESEARCH": 4243}) as pacs:
        pacs.load(cohort.files)
        # declare it in the research Orthanc: ["DCMQR", "127.0.0.1", pacs.port]

What it does differently from an Orthanc PACS is written down in ``docs/pacs-peers.md``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prefect_orthanc.deployments.lab.bind_address import bind_environment
from prefect_orthanc.deployments.lab.processes import ChildProcess, stop_group
from prefect_orthanc.deployments.lab.servers import _can_bind_death_signal, free_ports

__all__ = ["DCMQRSCP", "STORESCU", "Dcmqrscp"]

DCMQRSCP = "/usr/bin/dcmqrscp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STARTUP_TIMEOUT = 15.0


def _executable(path: str) -> str:
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    found = shutil.which(os.path.basename(path))
    if found:
        return found
    raise FileNotFoundError(f"{path} not found: install Debian's dcmtk package "
                            "(apt-get install dcmtk)")


@dataclass(eq=False)
class Dcmqrscp(ChildProcess):
    """One ``dcmqrscp`` process listening on ``address`` only (AET ``aet``; dcmqrscp binds
    0.0.0.0, so it runs with the bind-address shim of ``bind_address.py``) storing into
    ``workdir/db``.

    ``move_destinations`` maps each AET allowed as a C-MOVE destination to its loopback DICOM
    port (dcmqrscp's HostTable); an AET not listed is answered 0xA801 (destination unknown).
    ``max_associations`` is dcmqrscp's ``MaxAssociations``.
    """

    workdir: Path
    move_destinations: Mapping[str, int]
    aet: str = "DCMQR"
    port: int = 0
    max_associations: int = 16
    address: str = "127.0.0.1"
    extra_args: tuple[str, ...] | list[str] = ()  # e.g. ("-v",): one log line per C-STORE
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @classmethod
    def start(cls, workdir: str | os.PathLike[str], move_destinations: Mapping[str, int],
              **options: object) -> Dcmqrscp:
        server = cls(Path(workdir), dict(move_destinations), **options)  # type: ignore[arg-type]
        server.boot()
        return server

    @property
    def config_path(self) -> Path:
        return self.workdir / "dcmqrscp.cfg"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dcmqrscp.log"

    def config(self) -> str:
        """dcmqrscp's configuration file (format: ``dcmqrcnf.txt`` in DCMTK's docs)."""
        hosts = "\n".join(f"{aet.lower()} = ({aet}, {self.address}, {port})"
                          for aet, port in self.move_destinations.items())
        return (f"NetworkTCPPort  = {self.port}\n"
                f"MaxPDUSize      = 16384\n"
                f"MaxAssociations = {self.max_associations}\n\n"
                f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
                f"VendorTable BEGIN\nVendorTable END\n\n"
                f"AETable BEGIN\n"
                f"{self.aet} {self.workdir / 'db'} RW (500, 1024mb) ANY\n"
                f"AETable END\n")

    def boot(self, attempts: int = 3) -> Dcmqrscp:
        """Write the configuration and start; retried on fresh ports if the port was taken."""
        executable = _executable(DCMQRSCP)
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        last = ""
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_ports(1, self.address)[0]
            self.config_path.write_text(self.config(), encoding="utf-8")
            command = [executable, *self.extra_args, "-c", str(self.config_path),
                       str(self.port)]
            if _can_bind_death_signal():  # no dcmqrscp outlives a killed Python
                command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
            env = {**os.environ, **bind_environment(self.address, self.workdir.parent)}
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.workdir, start_new_session=True, env=env)
            if self._wait_until_ready():
                return self
            last = self.log_tail()
            self.stop()
        raise RuntimeError(f"dcmqrscp did not start after {attempts} attempts; log tail:\n{last}")

    def _wait_until_ready(self) -> bool:
        echo = _executable(ECHOSCU)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if not self.is_running:
                return False
            done = subprocess.run([echo, "-aec", self.aet, "-to", "2", self.address,
                                   str(self.port)], capture_output=True)
            if done.returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def load(self, files: Iterable[str | os.PathLike[str]], *, batch: int = 200) -> int:
        """C-STORE ``files`` into this PACS with DCMTK's ``storescu``; returns how many."""
        paths = [str(f) for f in files]
        store = _executable(STORESCU)
        for start in range(0, len(paths), batch):
            for attempt in range(10):
                done = subprocess.run(
                    [store, "-aet", "LOADER", "-aec", self.aet, self.address, str(self.port),
                     *paths[start:start + batch]], capture_output=True)
                # with a low MaxAssociations dcmqrscp frees the previous association late and
                # rejects the next one for a moment; nothing was stored then: try again
                if done.returncode == 0 or b"Association Rejected" not in done.stderr:
                    break
                time.sleep(0.2 * (attempt + 1))
            if done.returncode != 0:
                raise RuntimeError(f"storescu into dcmqrscp failed (exit {done.returncode}): "
                                   + done.stderr.decode(errors="replace")[-300:])
        return len(paths)

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process, timeout=5)
            self._process = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Dcmqrscp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
