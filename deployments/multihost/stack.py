"""A production-shaped stack on one machine: Prefect server on PostgreSQL, process workers,
the research Orthanc and the PACS, optionally each host in its own network namespace.

    stack = ProductionStack(Path("/var/lib/prefect-orthanc/stack"), workers=2, netns=True)
    stack.up()            # PostgreSQL, Prefect server, Orthancs, setup, deploy, workers
    stack.client_env()    # PREFECT_API_URL, ORTHANC_*, PREFECT_ORTHANC_* for a client here
    stack.down()

What runs where (``docs/production.md`` has the table):

* the **server host** (namespace ``po-<tag>-server`` with ``netns``): PostgreSQL on its own
  127.0.0.1 only, and ``prefect server start`` on the host's address, with
  ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem``
  (concurrency leases are files under its ``PREFECT_HOME``: they survive a restart);
* one **worker host** per worker (``po-<tag>-worker-N``): ``prefect worker start --pool
  orthanc-process --limit N`` with ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30`` (flow runs send
  heartbeats: a run whose host died is detected);
* the **machine** itself (the bridge's first address, or 127.0.0.1): the research Orthanc and
  the PACS (an Orthanc; ``dcmqrscp=True`` adds DCMTK's dcmqrscp as modality ``dcmqr``), each
  listening on that address only (the bind-address shim).

Everything is kept under ``root``: the PostgreSQL cluster, the Prefect server's home, the
Orthancs' storage and indexes, the site data directory (``root/data``: cohorts, reports,
shared packages, linkage) and the secrets made once (``root/secrets``, 0600): a ``down`` then
``up`` keeps every run, block, limit, stored study and credential.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect_orthanc.deployments.lab.prefect_server import LocalPrefectServer
from prefect_orthanc.deployments.lab.processes import ChildProcess, stop_group
from prefect_orthanc.deployments.lab.servers import OrthancLab, free_ports
from prefect_orthanc.deployments.multihost.network import Host, HostNetwork
from prefect_orthanc.deployments.multihost.postgres import PostgresCluster

__all__ = ["LEASE_STORAGE", "REPOSITORY", "ProductionStack", "Worker"]

REPOSITORY = Path(__file__).resolve().parents[2]
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
WORK_POOL = "orthanc-process"
SERVER_PORT = 4200
POSTGRES_PORT = 5432


def _bin(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


@dataclass(eq=False)
class Worker(ChildProcess):
    """One ``prefect worker start`` process on its host; its flow runs are its children."""

    name: str
    host: Host
    home: Path
    limit: int
    env: dict[str, str] = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.home / "worker.log"

    def start(self) -> Worker:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "PREFECT_HOME": str(self.home)}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(self.host.command([
                _bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--name", self.name,
                "--limit", str(self.limit), "--type", "process"]),
                env=env, cwd=REPOSITORY, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def flow_pids(self) -> list[int]:
        """The worker's child processes (its flow runs)."""
        if self.pid is None:
            return []
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return []
        return [int(pid) for pid in children]

    def kill(self, *, flows: bool) -> None:
        """SIGKILL the worker alone (its flow runs go on as orphans), or with ``flows`` the
        worker and every process under it at once, as a host losing power would: all are
        stopped (SIGSTOP) before any is killed, so none can tell the server (a flow process
        that outlives its worker by a moment reports itself Crashed, which a dead host never
        does)."""
        if self._process is None:
            return
        try:
            if flows:
                tree = [self._process.pid, *_descendants(self._process.pid)]
                for sig in (signal.SIGSTOP, signal.SIGKILL):
                    for pid in tree:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, sig)
                os.killpg(self._process.pid, signal.SIGKILL)
            else:
                self._process.kill()
        except ProcessLookupError:
            pass
        self._process.wait(10)

    def stop(self) -> None:
        if self._process is not None:
            stop_group(self._process, timeout=15)


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children first, then theirs), from /proc."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        queue += [int(c) for c in children]
    return found


@dataclass(eq=False)
class ProductionStack:
    root: Path
    workers: int = 2
    worker_limit: int = 2
    netns: bool = False
    modality_limits: str = "pacs=2"
    orthanc_index: str = "sqlite"          # or "postgresql": Debian's orthanc-postgresql
    dcmqrscp: bool = False
    stable_age: int = 2
    ui: bool = True
    env: dict[str, str] = field(default_factory=dict)  # extra settings for setup and workers

    network: HostNetwork | None = field(default=None, init=False, repr=False)
    postgres: PostgresCluster | None = field(default=None, init=False, repr=False)
    server: LocalPrefectServer | None = field(default=None, init=False, repr=False)
    lab: OrthancLab | None = field(default=None, init=False, repr=False)
    worker_processes: list[Worker] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        if self.dcmqrscp and "dcmqr=" not in self.modality_limits:
            self.modality_limits += ",dcmqr=2"  # research's modality for dcmqrscp needs one
        if self.orthanc_index not in {"sqlite", "postgresql"}:
            raise ValueError("orthanc_index is 'sqlite' or 'postgresql'")

    # -- persistent pieces

    def _secret(self, name: str, make) -> str:
        directory = self.root / "secrets"
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        path = directory / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(make())
        return path.read_text().strip()

    def _port(self, name: str, address: str) -> int:
        ports_file = self.root / "ports.json"
        ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
        if name not in ports:
            ports[name] = free_ports(1, address)[0]
            ports_file.write_text(json.dumps(ports))
        return int(ports[name])

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def deid_secret(self) -> str:
        return self._secret("deid-secret", lambda: secrets.token_hex(32))

    # -- addresses

    @property
    def machine(self) -> Host:
        return self.network.machine if self.network else Host("machine", "127.0.0.1")

    def host(self, name: str) -> Host:
        if self.network is None:
            return Host(name, "127.0.0.1")
        return self.network.hosts.get(name) or self.network.add_host(name)

    @property
    def api_url(self) -> str:
        assert self.server is not None, "stack not up"
        return self.server.api_url

    def client_env(self) -> dict[str, str]:
        """Settings for a Prefect/Orthanc client on the machine (and, with the bridge, on
        any host): API URL, research Orthanc, site data directory, limits, secret."""
        assert self.lab is not None and self.lab.research is not None, "stack not up"
        research = self.lab.research
        return {"PREFECT_API_URL": self.api_url,
                "ORTHANC_URL": research.url, "ORTHANC_USERNAME": research.username or "",
                "ORTHANC_PASSWORD": research.password or "",
                "PREFECT_ORTHANC_DATA_DIR": str(self.data_dir),
                "PREFECT_ORTHANC_MODALITY_LIMITS": self.modality_limits,
                "PREFECT_ORTHANC_DEID_SECRET": self.deid_secret,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **self.env}

    # -- lifecycle

    def up(self, *, deploy: bool = True) -> ProductionStack:
        """Start everything (creating what is missing) and wait until it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # the postgres user reaches its own directory only
        self.data_dir.mkdir(exist_ok=True)
        try:
            if self.netns and self.network is None:
                self.network = HostNetwork.create()
            self.start_database()
            self.start_server()
            self.start_orthancs()
            self.run_setup()
            if deploy:
                self.deploy()
            for index in range(1, self.workers + 1):
                self.start_worker(index)
            self.write_state()
        except BaseException:
            self.down()
            raise
        return self

    def start_database(self) -> None:
        server_host = self.host("server")
        port = POSTGRES_PORT if self.network else self._port("postgres", "127.0.0.1")
        databases = ("prefect", "orthanc") if self.orthanc_index == "postgresql" else ("prefect",)
        self.postgres = PostgresCluster(self.root / "postgres", server_host, port, databases)
        self.postgres.start()

    def start_server(self) -> None:
        assert self.postgres is not None
        server_host = self.host("server")
        port = SERVER_PORT if self.network else self._port("prefect", "127.0.0.1")
        self.server = LocalPrefectServer.start(
            self.root / "prefect-server", port, ui=self.ui, host=server_host.address,
            wrapper=server_host.command([]),
            env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.postgres.url(),
                 "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
                 **{k: v for k, v in self.env.items() if k.startswith("PREFECT_SERVER_")}})

    def restart_server(self) -> float:
        """Stop the Prefect server (as its service manager would) and start it again on the
        same port and database; returns the seconds it was away."""
        assert self.server is not None
        started = time.monotonic()
        self.server.stop()
        self.server.launch()
        return time.monotonic() - started

    def _orthanc_index_overrides(self) -> dict[str, Any]:
        if self.orthanc_index != "postgresql":
            return {}
        assert self.postgres is not None
        plugin = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"
        if not os.path.exists(plugin):
            raise FileNotFoundError(f"{plugin} not found: apt-get install orthanc-postgresql "
                                    "(scripts/bootstrap --postgresql does)")
        if self.network is not None:
            raise ValueError("the PostgreSQL index needs the database on the Orthanc host: "
                             "use it without --netns")
        return {"Plugins": [plugin],
                "PostgreSQL": {"EnableIndex": True, "EnableStorage": False,
                               "Host": "127.0.0.1", "Port": self.postgres.port,
                               "Database": "orthanc", "Username": self.postgres.user,
                               "Password": self.postgres.password, "Lock": False}}

    def start_orthancs(self) -> None:
        self.lab = OrthancLab.start(
            self.root / "orthanc", stable_age=self.stable_age, address=self.machine.address,
            dcmqrscp=self.dcmqrscp, dcmqrscp_options={"extra_args": ["-v"]},
            research_overrides={"JobsHistorySize": 1000, "ConcurrentJobs": 4,
                                **self._orthanc_index_overrides()},
            pacs_overrides={"JobsHistorySize": 1000})

    def _run(self, argv: list[str], what: str, timeout: float = 180) -> str:
        done = subprocess.run(argv, env={**os.environ, **self.client_env()},
                              cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {done.returncode}):\n"
                               + (done.stdout + done.stderr)[-3000:])
        return done.stdout

    def run_setup(self) -> str:
        """``python -m prefect_orthanc.deployments setup`` against the stack (work pool, limits,
        blocks)."""
        return self._run([sys.executable, "-m", "prefect_orthanc.deployments", "setup"],
                         "deployments setup")

    def deploy(self) -> str:
        """``prefect deploy --all`` of the shipped prefect.yaml, to the stack's work pool."""
        return self._run([_bin("prefect"), "--no-prompt", "deploy", "--all"], "prefect deploy")

    def worker_env(self) -> dict[str, str]:
        env = {**self.client_env(), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        for key in ("ORTHANC_URL", "ORTHANC_USERNAME", "ORTHANC_PASSWORD",
                    "PREFECT_ORTHANC_DEID_SECRET"):
            env.pop(key)  # workers read the blocks setup saved, as a worker elsewhere would
        return {**env, **{k: v for k, v in self.env.items() if not k.startswith("PREFECT_SERVER_")}}

    def start_worker(self, index: int) -> Worker:
        name = f"worker-{index}"
        existing = [w for w in self.worker_processes if w.name == name]
        worker = existing[0] if existing else Worker(
            name, self.host(name), self.root / "workers" / name, self.worker_limit,
            self.worker_env())
        if not existing:
            self.worker_processes.append(worker)
        worker.start()
        return worker

    def restart_dead(self) -> list[str]:
        """Start again whatever stopped (what a service manager's ``Restart=always`` does);
        returns the names restarted."""
        restarted = []
        if self.postgres is not None and (self.postgres._process is None
                                          or self.postgres._process.poll() is not None):
            self.postgres.start()
            restarted.append("postgres")
        if self.server is not None and not self.server.is_running:
            self.server.launch()
            restarted.append("prefect server")
        if self.lab is not None:
            for server in self.lab.servers:
                if not server.is_running:
                    server.start()
                    restarted.append(f"orthanc {server.name}")
            if self.lab.dcmqr is not None and not self.lab.dcmqr.is_running:
                self.lab.dcmqr.boot(attempts=1)  # on its port: research's modality names it
                restarted.append("dcmqrscp")
        for worker in self.worker_processes:
            if not worker.is_running:
                worker.start()
                restarted.append(worker.name)
        return restarted

    def down(self) -> None:
        """Stop everything (workers first, the database last) and remove the namespaces.
        Data stays in ``root``."""
        for worker in self.worker_processes:
            worker.stop()
        if self.lab is not None:
            self.lab.stop()
        if self.server is not None:
            self.server.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.network is not None:
            self.network.delete()
            self.network = None
        state = self.root / "stack.json"
        if state.exists():
            state.unlink()

    # -- state for `stack status`

    def write_state(self, supervisor: int | None = None) -> Path:
        assert self.lab is not None and self.server is not None and self.postgres is not None
        state = {
            "root": str(self.root), "supervisor_pid": supervisor or os.getpid(),
            "prefect_api_url": self.api_url,
            "postgres": {"host": self.host("server").name, "address": "127.0.0.1",
                         "port": self.postgres.port, "pid": self.postgres.postmaster_pid},
            "prefect_server": {"host": self.host("server").name,
                               "address": self.server.host, "port": self.server.port,
                               "pid": self.server.pid,
                               "lease_storage": LEASE_STORAGE},
            "orthanc": {name: {"url": server.url, "aet": server.aet,
                               "dicom": f"{server.address}:{server.dicom_port}",
                               "pid": server.pid}
                        for name, server in (("pacs", self.lab.pacs),
                                             ("research", self.lab.research))},
            "dcmqrscp": ({"dicom": f"{self.lab.dcmqr.aet}@{self.lab.dcmqr.address}:"
                                   f"{self.lab.dcmqr.port}", "pid": self.lab.dcmqr.pid}
                         if self.lab.dcmqr is not None else None),
            "workers": {w.name: {"host": w.host.name, "address": w.host.address,
                                 "pid": w.pid, "limit": w.limit}
                        for w in self.worker_processes},
            "network": self.network.to_json() if self.network else None,
            "data_dir": str(self.data_dir),
        }
        path = self.root / "stack.json"
        path.write_text(json.dumps(state, indent=2))
        return path
