"""Separate hosts on one machine: Linux network namespaces on a bridge, loopback range only.

``HostNetwork.create()`` makes a bridge in the machine's own namespace with address
``127.77.N.1/24`` (the "orthanc host": the machine itself) and, per ``add_host(name)``, a
network namespace joined to the bridge by a veth pair, with the next address of the subnet.
Each namespace has its own ``lo`` (its own 127.0.0.1, where e.g. PostgreSQL listens) and its
own 0.0.0.0: a server in it is reachable only at its namespace's address.

Why 127.77.N.0/24 and not a private range: addresses in 127.0.0.0/8 never leave the machine
(the kernel refuses to send or accept them on a real interface). Using them on a bridge needs
``route_localnet=1`` on the bridge and veths and a route for the /24 in the ``local`` table
(in front of the kernel's ``local 127.0.0.0/8 dev lo``): both are set only on the devices made
here and disappear with them. Needs root (``ip netns``); ``delete()`` removes everything.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "HostNetwork", "NetworkError"]

SUBNET_PREFIX = "127.77"


class NetworkError(RuntimeError):
    """Making the namespaces failed (not root, no ``ip`` command...): the message says why."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetworkError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done


def _sysctl(key: str, value: str, netns: str | None = None) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    if netns:
        subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                        f"echo {value} > {path}"], check=True, capture_output=True)
    else:
        Path(path).write_text(value)


@dataclass(frozen=True)
class Host:
    """One host of the network: a namespace (None for the machine itself) and its address."""

    name: str
    address: str
    netns: str | None = None

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)


@dataclass
class HostNetwork:
    """A bridge (the machine's address on it is ``machine.address``) and namespaced hosts."""

    tag: str
    subnet: int
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"pob-{self.tag}"

    @property
    def machine(self) -> Host:
        return Host("machine", f"{SUBNET_PREFIX}.{self.subnet}.1")

    @classmethod
    def create(cls) -> HostNetwork:
        if os.geteuid() != 0:
            raise NetworkError("network namespaces need root (ip netns); run the stack "
                               "without --netns, or as root")
        used = _ip("-4", "-o", "addr", "show").stdout
        free = [n for n in range(1, 255) if f" {SUBNET_PREFIX}.{n}." not in used]
        if not free:
            raise NetworkError(f"no free {SUBNET_PREFIX}.N.0/24 subnet")
        network = cls(tag=secrets.token_hex(3), subnet=free[0])
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("addr", "add", f"{network.machine.address}/24", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
            _sysctl(f"net.ipv4.conf.{network.bridge}.route_localnet", "1")
            _ip("route", "add", f"{SUBNET_PREFIX}.{network.subnet}.0/24", "dev", network.bridge,
                "table", "local", "src", network.machine.address)
        except BaseException:
            network.delete()
            raise
        return network

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge, with the next free address."""
        number = len(self.hosts) + 2
        netns = f"po-{self.tag}-{name}"
        host = Host(name, f"{SUBNET_PREFIX}.{self.subnet}.{number}", netns)
        veth = f"pov-{self.tag}-{number}"
        try:
            _ip("netns", "add", netns)
            self.hosts[name] = host
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("link", "set", "lo", "up", netns=host.netns)
            for key in ("all", "eth0"):
                _sysctl(f"net.ipv4.conf.{key}.route_localnet", "1", host.netns)
            _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
            _ip("link", "set", "eth0", "up", netns=host.netns)
            _ip("route", "add", f"{SUBNET_PREFIX}.{self.subnet}.0/24", "dev", "eth0", "table",
                "local", "src", host.address, netns=host.netns)
        except BaseException:
            self.delete()
            raise
        return host

    def delete(self) -> None:
        """Remove the namespaces (their veths go with them) and the bridge (its route too)."""
        for host in self.hosts.values():
            if host.netns:  # every added host has one
                _ip("netns", "delete", host.netns, check=False)
        self.hosts.clear()
        _ip("link", "delete", self.bridge, check=False)

    def to_json(self) -> dict:
        return {"tag": self.tag, "subnet": self.subnet,
                "hosts": {n: [h.address, h.netns] for n, h in self.hosts.items()}}

    @classmethod
    def from_json(cls, data: dict) -> HostNetwork:
        network = cls(tag=data["tag"], subnet=data["subnet"])
        network.hosts = {n: Host(n, a, ns) for n, (a, ns) in data["hosts"].items()}
        return network

    def __str__(self) -> str:
        return json.dumps(self.to_json())
