"""Real Orthanc processes on loopback, for tests, the demo and benchmarks.

``OrthancServer`` runs one ``/usr/sbin/Orthanc`` process with a JSON configuration written
into its own work directory. ``OrthancLab`` runs two of them, a "pacs" (AET ``PACS``, no HTTP
authentication) and a "research" server (AET ``RESEARCH``, HTTP basic authentication with a
random per-lab password), each declared as a DICOM modality of the other. With
``dcmqrscp=True`` a third, non-Orthanc PACS runs next to them: DCMTK's ``dcmqrscp``
(``lab.dcmqr``, AET ``DCMQR``, research declared in its host table), declared in research as
the modality ``dcmqr`` (see ``deployments/lab/dcmqrscp.py`` and ``docs/pacs-peers.md``)::

    with OrthancLab.start(stable_age=2) as lab:
        httpx.get(lab.pacs.url + "/system")

No Orthanc plugin is loaded. Every process started here is stopped by ``stop()``, by the
context manager, and, as a last resort, by an ``atexit`` guard.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from prefect_orthanc.deployments.lab.processes import ChildProcess

__all__ = [
    "DEFAULT_EXECUTABLE",
    "USER_METADATA",
    "OrthancLab",
    "OrthancServer",
    "base_config",
    "free_ports",
    "orthanc_executable",
]

DEFAULT_EXECUTABLE = "/usr/sbin/Orthanc"

#: Orthanc 1.10.1 only accepts custom metadata names declared in its configuration.
USER_METADATA: dict[str, int] = {"PrefectOrthancCollected": 1024, "PrefectOrthancSource": 1025,
                                 "PrefectOrthancRouted": 1026, "PrefectOrthancLabels": 1027}

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 3


def orthanc_executable(executable: str | os.PathLike[str] | None = None) -> str:
    """The Orthanc binary to run: the given one, else Debian's ``/usr/sbin/Orthanc``, else
    ``Orthanc`` on the PATH. Raises ``FileNotFoundError`` with an install hint otherwise."""
    candidates = [str(executable)] if executable else [DEFAULT_EXECUTABLE]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    if not executable:
        found = shutil.which("Orthanc")
        if found:
            return found
    raise FileNotFoundError(
        f"Orthanc executable not found ({candidates[0]}); install Debian's orthanc package "
        "(apt-get install orthanc) or run scripts/bootstrap"
    )


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def free_ports(count: int, address: str = "127.0.0.1") -> list[int]:
    """``count`` distinct loopback TCP ports the kernel reports free right now.

    All sockets stay bound until every port is picked, so the ports differ from each other;
    another process can still take one before Orthanc binds it (callers retry on failure).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def base_config(*, name: str, aet: str, http_port: int, dicom_port: int, workdir: Path,
                stable_age: int = 2, users: dict[str, str] | None = None,
                modalities: dict[str, list[Any]] | None = None,
                lua_scripts: Iterable[str | os.PathLike[str]] = ()) -> dict[str, Any]:
    """The configuration the lab gives each server (callers may merge overrides into it)."""
    return {
        "Name": name,
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "DicomModalities": dict(modalities or {}),
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "StableAge": stable_age,
        "ConcurrentJobs": 4,
        "JobsHistorySize": 500,
        "SaveJobs": False,
        "HttpTimeout": 60,
        "DicomScuTimeout": 30,
        "Plugins": [],
        "LuaScripts": [str(Path(p).resolve()) for p in lua_scripts],
        "UserMetadata": dict(USER_METADATA),
    }


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (from the first byte on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text + "\n")


# ------------------------------------------------------------------ process guard

_live_servers: set[OrthancServer] = set()
_live_labs: set[OrthancLab] = set()
_guard_lock = threading.Lock()


def _stop_everything() -> None:
    """atexit guard: no Orthanc process and no temporary lab directory outlives Python."""
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.stop()
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_everything)


def _can_bind_death_signal() -> bool:
    # setpriv --pdeathsig makes the kernel send SIGTERM to Orthanc when the thread that
    # started it dies (so a SIGKILLed Python leaves no server behind). The signal follows
    # the *thread*, so it is only used from the main thread, which lives as long as Python.
    return (threading.current_thread() is threading.main_thread()
            and shutil.which("setpriv") is not None)


# ------------------------------------------------------------------ one server


@dataclass(eq=False)
class OrthancServer(ChildProcess):
    """One Orthanc process listening on ``address`` only (default 127.0.0.1), with its own
    configuration, storage and log.

    ``config`` is the full configuration written (as JSON) to ``workdir/orthanc.json`` on every
    ``start()``; storage lives in ``workdir/storage`` and survives ``stop()``/``restart()``.
    Orthanc 1.10.1 binds 0.0.0.0 and has no setting against it: the process runs with the
    bind-address shim (``deployments/lab/bind_address.py``), so its HTTP and DICOM ports are
    on ``address`` and nowhere else.
    """

    name: str
    aet: str
    http_port: int
    dicom_port: int
    workdir: Path
    config: dict[str, Any] = field(repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    executable: str = DEFAULT_EXECUTABLE
    startup_timeout: float = STARTUP_TIMEOUT
    address: str = "127.0.0.1"
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)

    # -- connection details

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(username, password)`` for httpx, or None when the server has no HTTP auth."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def connection_info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aet": self.aet,
            "url": self.url,
            "address": self.address,
            "http_port": self.http_port,
            "dicom_port": self.dicom_port,
            "username": self.username,
            "password": self.password,
            "workdir": str(self.workdir),
            "log": str(self.log_path),
        }

    # -- lifecycle

    def start(self) -> OrthancServer:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers.

        Raises ``RuntimeError`` (with the end of the log) when the process exits or does not
        answer within ``startup_timeout`` seconds; the process is stopped in both cases.
        """
        if self.is_running:
            return self
        executable = orthanc_executable(self.executable)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        # private: it holds the lab password
        _write_private(self.config_path, json.dumps(self.config, indent=2, sort_keys=True))
        command = [executable, str(self.config_path)]
        if _can_bind_death_signal():
            command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        from prefect_orthanc.deployments.lab.bind_address import bind_environment

        env = {**os.environ, **bind_environment(self.address, self.workdir.parent)}
        with open(self.log_path, "ab") as log:
            log.write(f"---- prefect-orthanc lab: starting {self.name} "
                      f"(http {self.http_port}, dicom {self.dicom_port})\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.workdir, close_fds=True, env=env,
            )
        with _guard_lock:
            _live_servers.add(self)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.05
        with httpx.Client(auth=self.auth, timeout=2.0) as client:
            while True:
                process = self._process
                assert process is not None
                code = process.poll()
                if code is not None:
                    raise RuntimeError(
                        f"Orthanc '{self.name}' exited with code {code} during startup "
                        f"(http {self.http_port}, dicom {self.dicom_port}); log tail:\n"
                        + self.log_tail(30)
                    )
                try:
                    response = client.get(self.url + "/system")
                    # the answer must come from this process's configuration (another
                    # server may have grabbed the port between free_ports() and startup)
                    if response.status_code == 200 and self._is_own(response.json()):
                        return
                except (httpx.TransportError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc '{self.name}' did not answer GET /system within "
                        f"{self.startup_timeout:.0f} s; log tail:\n" + self.log_tail(30)
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (Orthanc needs ~3 s to shut down; ``stop()`` waits)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    def _is_own(self, system: object) -> bool:
        return (isinstance(system, dict)
                and system.get("HttpPort") == self.config.get("HttpPort", self.http_port)
                and system.get("DicomPort") == self.config.get("DicomPort", self.dicom_port))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Storage is kept."""
        process = self._process
        if process is not None:
            if process.poll() is None:
                try:
                    self.terminate()
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=timeout)
                except ProcessLookupError:
                    pass
            else:
                process.wait()
        with _guard_lock:
            _live_servers.discard(self)

    def restart(self) -> OrthancServer:
        """Stop then start again on the same ports, configuration and storage."""
        self.stop()
        return self.start()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server's log (empty when there is none yet)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - 256 * max(n, 1)))
                data = log.read()
        except FileNotFoundError:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])


# ------------------------------------------------------------------ the two-server lab


def _merge(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        merged[key] = copy.deepcopy(value)
    return merged


class OrthancLab:
    """Two Orthanc servers that know each other: ``pacs`` and ``research``.

    Use ``OrthancLab.start(...)`` (also a context manager). ``root`` is where both servers
    keep configuration, storage and logs; when omitted a temporary directory is created and
    removed by ``stop()``, a directory given by the caller is kept.
    """

    PACS_AET = "PACS"
    RESEARCH_AET = "RESEARCH"
    RESEARCH_USER = "research"

    def __init__(self, root: str | os.PathLike[str] | None = None, *, stable_age: int = 2,
                 pacs_overrides: dict[str, Any] | None = None,
                 research_overrides: dict[str, Any] | None = None,
                 pacs_lua_scripts: Iterable[str | os.PathLike[str]] = (),
                 research_lua_scripts: Iterable[str | os.PathLike[str]] = (),
                 executable: str | os.PathLike[str] | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT,
                 attempts: int = START_ATTEMPTS, dcmqrscp: bool = False,
                 dcmqrscp_options: dict[str, Any] | None = None,
                 address: str = "127.0.0.1") -> None:
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(
            tempfile.mkdtemp(prefix="prefect-orthanc-lab-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.stable_age = stable_age
        self.pacs_overrides = dict(pacs_overrides or {})
        self.research_overrides = dict(research_overrides or {})
        self.pacs_lua_scripts = [Path(p) for p in pacs_lua_scripts]
        self.research_lua_scripts = [Path(p) for p in research_lua_scripts]
        self.executable = orthanc_executable(executable)
        self.startup_timeout = startup_timeout
        self.attempts = max(1, attempts)
        self.address = address
        self.research_password = self._password()
        self._pacs: OrthancServer | None = None  # both set by boot()
        self._research: OrthancServer | None = None
        self.with_dcmqrscp = dcmqrscp
        self.dcmqrscp_options = dict(dcmqrscp_options or {})
        self.dcmqr: Any = None  # a started deployments.lab.dcmqrscp.Dcmqrscp when asked for
        self._stopped = False

    # -- construction

    @classmethod
    def start(cls, root: str | os.PathLike[str] | None = None, **options: Any) -> OrthancLab:
        """Create the lab and start both servers (see ``__init__`` for the options)."""
        lab = cls(root, **options)
        try:
            lab.boot()
        except BaseException:
            lab.stop()
            raise
        return lab

    DCMQR_AET = "DCMQR"
    PASSWORD_FILE = "research-password"

    def _password(self) -> str:
        """The research server's password: random for a temporary lab; for a lab in a
        directory of the caller's, made once and kept in ``<root>/research-password`` (0600),
        so credentials saved by ``python -m prefect_orthanc.deployments setup`` keep working after a
        restart."""
        if self._owns_root:
            return secrets.token_urlsafe(16)
        path = self.root / self.PASSWORD_FILE
        try:
            saved = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            saved = ""
        if not saved:
            saved = secrets.token_urlsafe(16)
            _write_private(path, saved + "\n")
        return saved

    def _ports(self) -> list[int]:
        """The lab's five ports: for a lab in a directory of the caller's, the ones of its
        previous start when they are still free (URLs saved in blocks stay right)."""
        path = self.root / "ports.json"
        if not self._owns_root:
            try:
                ports = [int(p) for p in json.loads(path.read_text(encoding="utf-8"))]
                if len(ports) == 5 and all(_port_free(self.address, p) for p in ports):
                    return ports
            except (OSError, ValueError, TypeError):
                pass
        ports = free_ports(5)
        if not self._owns_root:
            _write_private(path, json.dumps(ports))
        return ports

    def _servers_for(self, ports: list[int]) -> tuple[OrthancServer, OrthancServer]:
        pacs_http, pacs_dicom, research_http, research_dicom, dcmqr_port = ports
        pacs_dir, research_dir = self.root / "pacs", self.root / "research"
        pacs_config = _merge(base_config(
            name="pacs", aet=self.PACS_AET, http_port=pacs_http, dicom_port=pacs_dicom,
            workdir=pacs_dir, stable_age=self.stable_age,
            modalities={"research": [self.RESEARCH_AET, self.address, research_dicom]},
            lua_scripts=self.pacs_lua_scripts,
        ), self.pacs_overrides)
        research_config = _merge(base_config(
            name="research", aet=self.RESEARCH_AET, http_port=research_http,
            dicom_port=research_dicom, workdir=research_dir, stable_age=self.stable_age,
            users={self.RESEARCH_USER: self.research_password},
            modalities={"pacs": [self.PACS_AET, self.address, pacs_dicom],
                        **({"dcmqr": [self.DCMQR_AET, self.address, dcmqr_port]}
                           if self.with_dcmqrscp else {})},
            lua_scripts=self.research_lua_scripts,
        ), {"CheckRevisions": True,  # as the README recommends: label sets stay consistent
            **self.research_overrides})
        if self.address != "127.0.0.1":
            # Orthanc calls any client other than 127.0.0.1/::1 remote; listening on another
            # address (another host's view of this one) needs remote access, bounded by the
            # address it listens on (the bind shim) and research's authentication
            for config, overrides in ((pacs_config, self.pacs_overrides),
                                      (research_config, self.research_overrides)):
                config["RemoteAccessAllowed"] = overrides.get("RemoteAccessAllowed", True)
        common: dict[str, Any] = {"executable": self.executable,
                                  "startup_timeout": self.startup_timeout,
                                  "address": self.address}
        pacs = OrthancServer("pacs", self.PACS_AET, pacs_http, pacs_dicom, pacs_dir,
                             pacs_config, **common)
        research = OrthancServer("research", self.RESEARCH_AET, research_http, research_dicom,
                                 research_dir, research_config, username=self.RESEARCH_USER,
                                 password=self.research_password, **common)
        return pacs, research

    def boot(self) -> OrthancLab:
        """Start both servers on fresh free ports, retrying with new ports on failure."""
        with _guard_lock:
            _live_labs.add(self)
        last_error: Exception | None = None
        for _attempt in range(self.attempts):
            ports = self._ports() if _attempt == 0 else free_ports(5)
            self._pacs, self._research = self._servers_for(ports)
            try:
                self.pacs.start()
                self.research.start()
                if self.with_dcmqrscp:
                    from prefect_orthanc.deployments.lab.dcmqrscp import Dcmqrscp

                    self.dcmqr = Dcmqrscp(self.root / "dcmqr",
                                          {self.RESEARCH_AET: self.research.dicom_port},
                                          aet=self.DCMQR_AET, port=ports[4],
                                          address=self.address,
                                          **self.dcmqrscp_options)
                    self.dcmqr.boot(attempts=1)
                return self
            except RuntimeError as error:  # most often a port taken in the meantime
                last_error = error
                if self.dcmqr is not None:
                    self.dcmqr.stop()
                    self.dcmqr = None
                self.research.stop()
                self.pacs.stop()
        raise RuntimeError(f"the Orthanc lab did not start after {self.attempts} attempts: "
                           f"{last_error}") from None

    # -- use

    @property
    def pacs(self) -> OrthancServer:
        """The "pacs" server (``RuntimeError`` before the lab is started)."""
        return self.servers[0]

    @property
    def research(self) -> OrthancServer:
        """The "research" server (``RuntimeError`` before the lab is started)."""
        return self.servers[1]

    @property
    def servers(self) -> tuple[OrthancServer, OrthancServer]:
        if self._pacs is None or self._research is None:
            raise RuntimeError("the Orthanc lab is not started")
        return (self._pacs, self._research)

    def connection_info(self) -> dict[str, Any]:
        """What a client needs to reach both servers (includes the throwaway password)."""
        info: dict[str, Any] = {
            "root": str(self.root),
            "stable_age": self.stable_age,
            "servers": {server.name: server.connection_info() for server in self.servers},
        }
        if self.dcmqr is not None:
            info["dcmqrscp"] = {"aet": self.dcmqr.aet, "dicom_port": self.dcmqr.port,
                                "research_modality": "dcmqr", "config": str(self.dcmqr.config_path),
                                "log": str(self.dcmqr.log_path)}
        return info

    def write_info(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write ``connection_info()`` as JSON (default ``<root>/lab.json``, mode 0600)."""
        target = Path(path) if path is not None else self.root / "lab.json"
        _write_private(target, json.dumps(self.connection_info(), indent=2))
        return target

    def stop(self) -> None:
        """Stop both servers (in parallel); remove the root directory if the lab created it."""
        if self.dcmqr is not None:
            self.dcmqr.stop()
        servers = [server for server in (self._research, self._pacs) if server is not None]
        for server in servers:
            server.terminate()
        for server in servers:
            server.stop()
        if self._owns_root and not self._stopped:
            shutil.rmtree(self.root, ignore_errors=True)
        self._stopped = True
        with _guard_lock:
            _live_labs.discard(self)

    def __enter__(self) -> OrthancLab:
        if self._pacs is None:
            self.boot()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"OrthancLab(root={str(self.root)!r}, pacs={self._pacs!r}, "
                f"research={self._research!r})")
