"""The Prefect server a benchmark runs against: Prefect's own server on SQLite (what a new
user gets: the embedded server's database and code) or on a PostgreSQL cluster of its own
(Debian's postgresql, started by ``deployments.multihost.postgres.PostgresCluster``).

    with prefect_server("sqlite", Path(tmp)) as api_url:
        os.environ["PREFECT_API_URL"] = api_url

Every process of a benchmark then talks to one long-lived server, so a process's first flow
run measures the client's cold start, not a server's start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

__all__ = ["Database", "prefect_server"]

Database = Literal["sqlite", "postgres"]


@contextlib.contextmanager
def prefect_server(database: Database, home: Path) -> Iterator[str]:
    """A ``prefect server start`` (no UI) with its home under ``home``, on ``database``;
    yields its API URL and stops it (and its PostgreSQL) on exit."""
    from prefect_orthanc.deployments.lab.prefect_server import LocalPrefectServer
    from prefect_orthanc.deployments.lab.servers import free_ports

    env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if database == "postgres":
            from prefect_orthanc.deployments.multihost.network import Host
            from prefect_orthanc.deployments.multihost.postgres import PostgresCluster

            directory = home / "postgres"
            directory.mkdir(parents=True, exist_ok=True)
            for path in (home, *home.parents):  # run as root, postgres must reach its data
                if path == Path("/") or os.stat(path).st_mode & 0o011 == 0o011:
                    break
                os.chmod(path, os.stat(path).st_mode | 0o011)
            cluster = PostgresCluster(directory, Host("machine", "127.0.0.1"),
                                      port=free_ports(1)[0])
            cluster.start()
            stack.callback(cluster.stop)
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = cluster.url()
        server = LocalPrefectServer.start(home / "prefect", ui=False, env=env)
        stack.callback(server.stop)
        yield server.api_url
