"""Listening on one address when the server has no setting for it.

Orthanc 1.10.1 (Debian's; ``HttpBindAddresses`` arrived in 1.12.x, and there is no DICOM
equivalent) and DCMTK's ``dcmqrscp`` bind 0.0.0.0. ``bind_environment(address, state_dir)``
returns the environment that makes such a process listen on ``address`` only: an
``LD_PRELOAD`` shim (``bind_address.c``, compiled once with the machine's ``cc`` into
``state_dir``) that turns a bind to INADDR_ANY into a bind to ``address`` (and ``::`` into
``::1``)::

    env = {**os.environ, **bind_environment("127.0.0.1", lab_root)}
    subprocess.Popen(["/usr/sbin/Orthanc", "orthanc.json"], env=env)

``RuntimeError`` when no C compiler is there (``apt-get install gcc``, done by
``scripts/bootstrap``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import subprocess
import threading
from pathlib import Path

__all__ = ["ADDRESS_ENV", "bind_environment", "shim_path"]

ADDRESS_ENV = "PREFECT_ORTHANC_BIND_ADDRESS"
SOURCE = Path(__file__).with_name("bind_address.c")
_build_lock = threading.Lock()


def shim_path(state_dir: str | os.PathLike[str]) -> Path:
    """The compiled shim in ``state_dir`` (built when missing or when the source changed)."""
    source = SOURCE.read_bytes()
    target = Path(state_dir) / f"bind-address-{hashlib.sha256(source).hexdigest()[:12]}.so"
    with _build_lock:
        if target.is_file():
            return target
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler (cc) to build the bind-address shim that keeps "
                               "Orthanc and dcmqrscp on loopback: apt-get install gcc, or run "
                               "scripts/bootstrap")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(partial),
                               str(SOURCE), "-ldl"], capture_output=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError("building the bind-address shim failed: "
                               + done.stderr.decode(errors="replace")[-500:])
        os.replace(partial, target)
    return target


def bind_environment(address: str, state_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``LD_PRELOAD`` and ``PREFECT_ORTHANC_BIND_ADDRESS`` for a process that must listen on
    ``address`` (an IPv4 address; ``ValueError`` otherwise) instead of every interface."""
    if ipaddress.ip_address(address).version != 4:
        raise ValueError(f"bind address {address!r}: an IPv4 address is expected")
    preload = str(shim_path(state_dir))
    inherited = os.environ.get("LD_PRELOAD")
    return {"LD_PRELOAD": f"{preload} {inherited}" if inherited else preload,
            ADDRESS_ENV: address}
