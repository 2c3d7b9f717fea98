"""A PostgreSQL cluster of its own for the Prefect server (Debian's postgresql 15 binaries).

``PostgresCluster(directory, host).start()`` runs ``initdb`` once into ``directory/data``
(superuser ``prefect``, password made once and kept in ``directory/password``, 0600), then
``postgres`` on the host's own loopback (``listen_addresses=127.0.0.1``: in a network
namespace that is the namespace's loopback, reachable by nothing outside it) with its Unix
socket in ``directory/run`` (0700). Run as root, the server runs as the ``postgres`` user
(PostgreSQL refuses root). The data survives ``stop()`` and a new ``start()``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect_orthanc.deployments.multihost.network import Host

__all__ = ["PostgresCluster", "postgres_bin"]

STARTUP_TIMEOUT = 60.0


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (``initdb``, ``postgres``, ``psql``...): Debian keeps the
    server's in ``/usr/lib/postgresql/<version>/bin``."""
    for candidate in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return candidate
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"PostgreSQL's {name} not found: apt-get install postgresql "
                            "(scripts/bootstrap does)")


@dataclass
class PostgresCluster:
    directory: Path
    host: Host
    port: int = 5432
    databases: tuple[str, ...] = ("prefect",)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    user = "prefect"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def run(self) -> Path:
        return self.directory / "run"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def password(self) -> str:
        path = self.directory / "password"
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(18))
        return path.read_text().strip()

    def url(self, database: str = "prefect", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        return (["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv)

    def _own(self, *paths: Path) -> None:
        if os.geteuid() != 0:
            return
        owner = pwd.getpwnam("postgres")
        for path in paths:
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def initialise(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        for path in (self.directory, self.data, self.run):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o711)
        os.chmod(self.run, 0o700)
        os.chmod(self.data, 0o700)
        self._own(self.data, self.run)
        pwfile = self.run / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chmod(pwfile, 0o600)
        self._own(pwfile)
        try:
            done = subprocess.run(self._as_owner([
                postgres_bin("initdb"), "-D", str(self.data), "-U", self.user,
                f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                "-E", "UTF8", "--locale=C.UTF-8"]), capture_output=True, text=True)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed (is {self.directory} reachable by the postgres "
                               f"user?): {done.stderr.strip()[-500:]}")

    def start(self) -> PostgresCluster:
        self.initialise()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(self.host.command(self._as_owner([
                postgres_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.run}",
                "-c", "max_connections=200", "-c", "fsync=on"])),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            ready = subprocess.run(self._as_owner([
                postgres_bin("pg_isready"), "-h", str(self.run), "-p", str(self.port)]),
                capture_output=True)
            if ready.returncode == 0:
                break
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start: "
                                   + self.log_path.read_text(errors="replace")[-1500:])
            time.sleep(0.2)
        for database in self.databases:
            self._psql(f"SELECT 'CREATE DATABASE {database}' WHERE NOT EXISTS "
                       f"(SELECT FROM pg_database WHERE datname = '{database}')\\gexec")
        return self

    def _psql(self, sql: str) -> None:
        done = subprocess.run(self._as_owner([
            postgres_bin("psql"), "-h", str(self.run), "-p", str(self.port), "-U", self.user,
            "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]), input=sql, capture_output=True,
            text=True)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()[-500:]}")

    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT to the postmaster), SIGKILL after ``timeout`` seconds."""
        pid = self.postmaster_pid
        if pid is not None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.1)
                if not _alive(pid):
                    break
        if self._process is not None:
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
