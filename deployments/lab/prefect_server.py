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

from .processes import stop_group
from .servers import free_ports

__all__ = ["LocalPrefectServer"]

STARTUP_TIMEOUT = 120.0


@dataclass
class LocalPrefectServer:
    """One ``prefect server start`` process on 127.0.0.1."""

    home: Path
    port: int
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
              timeout: float = STARTUP_TIMEOUT) -> LocalPrefectServer:
        home = Path(home).resolve()
        home.mkdir(parents=True, exist_ok=True)
        server = cls(home=home, port=port or free_ports(1)[0])
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
        env = {**os.environ, "PREFECT_HOME": str(home),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_UI_API_URL": server.api_url,
               "PREFECT_UI_ENABLED": "true" if ui else "false"}
        env.pop("PREFECT_API_URL", None)
        with server.log_path.open("wb") as log:
            server._process = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(server.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server._process.poll() is not None:
                tail = server.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prefect server exited at start:\n{tail}")
            try:
                if httpx.get(server.api_url + "/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        server.stop()
        raise RuntimeError(f"prefect server did not answer within {timeout:.0f} s "
                           f"(log: {server.log_path})")

    def stop(self, timeout: float = 20) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_group(process, timeout)

    def __enter__(self) -> LocalPrefectServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
