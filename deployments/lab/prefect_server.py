"""A local Prefect server (``prefect server start``, SQLite) for the demo and benchmarks.

Prefect's in-process ephemeral API has no UI and no address other processes can reach; the
new-study demo needs both (Orthanc's Lua script posts events to it, ``serve`` runs in its own
process, and you can watch it all in the browser). So the demo starts Prefect's own server on a
free loopback port with its home (database, logs) in a directory of the caller's choosing::

    with LocalPrefectServer.start(Path("demo-output/prefect")) as server:
        os.environ["PREFECT_API_URL"] = server.api_url
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from prefect_orthanc.deployments.lab.processes import ChildProcess, stop_group
from prefect_orthanc.deployments.lab.servers import free_ports

__all__ = ["LocalPrefectServer"]

STARTUP_TIMEOUT = 120.0


@dataclass
class LocalPrefectServer(ChildProcess):
    """One ``prefect server start`` process on ``host`` (default 127.0.0.1).

    ``wrapper`` prefixes the command (e.g. ``ip netns exec NS`` to run it on another network
    namespace); ``env`` adds settings (e.g. ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` for
    PostgreSQL instead of the SQLite database in ``home``).
    """

    home: Path
    port: int
    host: str = "127.0.0.1"
    ui: bool = True
    wrapper: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    @property
    def database_url(self) -> str:
        """The server's SQLite database (Prefect's default place under its home)."""
        return f"sqlite+aiosqlite:///{self.home / 'prefect.db'}"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    @classmethod
    def start(cls, home: Path, port: int | None = None, *, ui: bool = True,
              timeout: float = STARTUP_TIMEOUT, host: str = "127.0.0.1",
              wrapper: list[str] | None = None,
              env: dict[str, str] | None = None) -> LocalPrefectServer:
        home = Path(home).resolve()
        home.mkdir(parents=True, exist_ok=True)
        server = cls(home=home, port=port or free_ports(1, host)[0], host=host, ui=ui,
                     wrapper=list(wrapper or []), env=dict(env or {}))
        return server.launch(timeout)

    def launch(self, timeout: float = STARTUP_TIMEOUT) -> LocalPrefectServer:
        """Start the process (again, after ``stop()``: same port, home and database) and wait
        until ``/api/health`` answers."""
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
        env = {**os.environ, "PREFECT_HOME": str(self.home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_UI_API_URL": self.api_url,
               "PREFECT_UI_ENABLED": "true" if self.ui else "false", **self.env}
        env.pop("PREFECT_API_URL", None)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [*self.wrapper, prefect, "server", "start", "--host", self.host,
                 "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prefect server exited at start:\n{tail}")
            try:
                if httpx.get(self.api_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"prefect server did not answer within {timeout:.0f} s "
                           f"(log: {self.log_path})")

    def stop(self, timeout: float = 20) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_group(process, timeout)

    def __enter__(self) -> LocalPrefectServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
