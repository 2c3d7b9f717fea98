"""``python -m prefect_orthanc.deployments stack up | down | status``: the production-shaped
stack, locally.

    python -m prefect_orthanc.deployments stack up [--root DIR] [--workers 2] [--limit 2] [--netns]
                                   [--orthanc-index sqlite|postgresql] [--dcmqrscp]
    python -m prefect_orthanc.deployments stack status [--root DIR]
    python -m prefect_orthanc.deployments stack down [--root DIR]

``up`` starts a supervisor in the background (it owns every process of the stack, restarts
one that dies, as a service manager would, and stops them all on ``down``), waits until the
stack answers, and prints where everything is and the settings a client needs. Data stays in
``--root`` (default ``/var/lib/prefect-orthanc/stack`` as root, else
``~/.local/state/prefect-orthanc/stack``): a later ``up`` finds its runs, blocks, studies and
credentials again. ``docs/production.md`` describes the layout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

__all__ = ["main"]

def _default_root() -> str:
    """Outside the checkout (the site data directory may not be inside it), where the
    ``postgres`` user can reach it when root starts the stack."""
    if os.geteuid() == 0:
        return "/var/lib/prefect-orthanc/stack"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "prefect-orthanc", "stack")


DEFAULT_ROOT = _default_root()
READY_TIMEOUT = 300.0


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=DEFAULT_ROOT,
                        help=f"the stack's data directory (default {DEFAULT_ROOT}; kept)")


def _state(root: Path) -> dict | None:
    try:
        return json.loads((root / "stack.json").read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _up(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    state = _state(root)
    if state and _alive(state.get("supervisor_pid")):
        print(f"stack: already up (supervisor pid {state['supervisor_pid']}); "
              f"`python -m prefect_orthanc.deployments stack status --root {root}`")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    log = root / "supervisor.log"
    command = [sys.executable, "-m", "prefect_orthanc.deployments.multihost.cli", "supervise",
               "--root", str(root),
               "--workers", str(args.workers), "--limit", str(args.limit),
               "--orthanc-index", args.orthanc_index,
               *(["--netns"] if args.netns else []), *(["--dcmqrscp"] if args.dcmqrscp else [])]
    with log.open("ab") as handle:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        state = _state(root)
        if state and state.get("supervisor_pid") == process.pid:
            _print_state(state, root)
            return 0
        if process.poll() is not None:
            print("stack: the supervisor exited while starting; end of its log "
                  f"({log}):\n" + log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"stack: not up within {READY_TIMEOUT:.0f} s; see {log}", file=sys.stderr)
    return 1


def _print_state(state: dict, root: Path) -> None:
    print(f"stack is up; root {root} (supervisor pid {state['supervisor_pid']})")
    server = state["prefect_server"]
    print(f"  prefect server   host {server['host']:<9} {state['prefect_api_url']}  "
          f"(PostgreSQL 127.0.0.1:{state['postgres']['port']} on the same host; "
          f"lease storage: filesystem)")
    for name, orthanc in state["orthanc"].items():
        print(f"  orthanc {name:<8} host machine   {orthanc['url']}  DICOM {orthanc['aet']}@"
              f"{orthanc['dicom']}")
    if state.get("dcmqrscp"):
        print(f"  dcmqrscp         host machine   DICOM {state['dcmqrscp']['dicom']} "
              f"(research's modality dcmqr)")
    for name, worker in state["workers"].items():
        print(f"  {name:<16} host {worker['host']:<9} {worker['address']}  --limit "
              f"{worker['limit']}  pid {worker['pid']}")
    print("Client settings (the research password is in "
          f"{root}/orthanc/research-password):")
    print(f"  export PREFECT_API_URL={state['prefect_api_url']}")
    print(f"  export PREFECT_ORTHANC_DATA_DIR={state['data_dir']}")


def _status(args: argparse.Namespace) -> int:
    import httpx

    root = Path(args.root).resolve()
    state = _state(root)
    if not state:
        print(f"stack: down (no {root}/stack.json)")
        return 3
    rows = [("supervisor", state["supervisor_pid"], None),
            ("postgres", state["postgres"]["pid"], None),
            ("prefect server", state["prefect_server"]["pid"],
             state["prefect_api_url"] + "/health"),
            *((f"orthanc {n}", o["pid"], None) for n, o in state["orthanc"].items()),
            *([("dcmqrscp", state["dcmqrscp"]["pid"], None)] if state.get("dcmqrscp") else []),
            *((n, w["pid"], None) for n, w in state["workers"].items())]
    healthy = True
    for name, pid, url in rows:
        alive = _alive(pid)
        answer = ""
        if url and alive:
            try:
                answer = f" HTTP {httpx.get(url, timeout=3).status_code}"
            except httpx.HTTPError as error:
                answer = f" ({type(error).__name__})"
        healthy &= alive
        print(f"  {name:<16} pid {pid}: {'running' if alive else 'NOT RUNNING'}{answer}")
    print("stack: " + ("up" if healthy else "degraded"))
    return 0 if healthy else 1


def _down(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    state = _state(root)
    if not state or not _alive(state.get("supervisor_pid")):
        print("stack: not running")
        return 0
    pid = state["supervisor_pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    if _alive(pid):
        print(f"stack: supervisor {pid} still running after 90 s", file=sys.stderr)
        return 1
    print(f"stack: down (data kept in {root})")
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _supervise(args: argparse.Namespace) -> int:
    """Run the stack in this process until SIGTERM/SIGINT; restart what dies."""
    from prefect_orthanc.deployments.multihost.stack import ProductionStack

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    stack = ProductionStack(Path(args.root), workers=args.workers, worker_limit=args.limit,
                            netns=args.netns, orthanc_index=args.orthanc_index,
                            dcmqrscp=args.dcmqrscp)
    try:
        stack.up()
        stack.write_state()
        print("supervisor: stack up", flush=True)
        while True:
            time.sleep(2)
            restarted = stack.restart_dead()
            if restarted:
                print("supervisor: restarted " + ", ".join(restarted), flush=True)
                stack.write_state()
    except _Stop:
        print("supervisor: stopping", flush=True)
        return 0
    finally:
        stack.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefect_orthanc.deployments stack",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the stack in the background")
    supervise = commands.add_parser("supervise", help=argparse.SUPPRESS)
    for command in (up, supervise):
        _options(command)
        command.add_argument("--workers", type=int, default=2, help="process workers (2)")
        command.add_argument("--limit", type=int, default=2,
                             help="flow runs per worker at once (`--limit`, 2)")
        command.add_argument("--netns", action="store_true",
                             help="the server and each worker on its own network namespace "
                                  "(root only)")
        command.add_argument("--orthanc-index", choices=("sqlite", "postgresql"),
                             default="sqlite", help="the research Orthanc's index: its own "
                             "SQLite, or the stack's PostgreSQL (orthanc-postgresql plugin)")
        command.add_argument("--dcmqrscp", action="store_true",
                             help="also DCMTK's dcmqrscp, as research's modality 'dcmqr'")
    for name in ("status", "down"):
        _options(commands.add_parser(name, help=f"{name} of the stack in --root"))
    args = parser.parse_args(argv)
    return {"up": _up, "supervise": _supervise, "status": _status, "down": _down}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
