"""``python -m prefect_orthanc.deployments.lab up [--root DIR] [--stable-age N]``: run the
two-server Orthanc lab in the foreground until Ctrl-C (or SIGTERM), for the demo and for manual
exploration."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType

from prefect_orthanc.deployments.lab.servers import OrthancLab


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _up(args: argparse.Namespace) -> int:
    try:
        lab = OrthancLab.start(args.root, stable_age=args.stable_age,
                               dcmqrscp=args.dcmqrscp)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"lab: {error}", file=sys.stderr)
        return 1
    # SIGINT too: a background job may have inherited it ignored
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stop)
    try:
        info_path = lab.write_info()
        pacs, research = lab.pacs, lab.research
        assert pacs is not None and research is not None
        print(f"Orthanc lab is up; root {lab.root}"
              + ("" if args.root else " (temporary: removed on exit)"))
        print(f"  pacs      AET {pacs.aet:<9} {pacs.url}  DICOM port {pacs.dicom_port}  "
              "no HTTP authentication")
        print(f"  research  AET {research.aet:<9} {research.url}  DICOM port "
              f"{research.dicom_port}  HTTP user '{research.username}'")
        print(f"  research password: {research.password}")
        print("    (a throwaway password for this local lab only: new at every start of a "
              "temporary lab, kept in <root>/research-password with --root)")
        if lab.dcmqr is not None:
            print(f"  dcmqrscp  AET {lab.dcmqr.aet:<9} DICOM port {lab.dcmqr.port}  (research's "
                  f"modality 'dcmqr'; load it with storescu -aec {lab.dcmqr.aet} 127.0.0.1 "
                  f"{lab.dcmqr.port} FILES)")
        print(f"  StableAge {lab.stable_age} s; logs in {lab.root}/<server>/orthanc.log")
        print(f"Connection info: {info_path}")
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            for server in lab.servers:
                if not server.is_running:
                    print(f"lab: server '{server.name}' exited unexpectedly; log tail:\n"
                          + server.log_tail(20), file=sys.stderr)
                    return 1
            time.sleep(1.0)
    except (KeyboardInterrupt, _Stop):
        print("\nStopping the lab...", flush=True)
        return 0
    finally:
        lab.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefect_orthanc.deployments.lab",
                                     description="A local two-server Orthanc lab.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the lab and wait until Ctrl-C")
    up.add_argument("--root", default=None,
                    help="directory for configuration, storage, logs and lab.json (kept); "
                         "default: a temporary directory removed on exit")
    up.add_argument("--stable-age", type=int, default=2,
                    help="Orthanc StableAge in seconds (default 2)")
    up.add_argument("--dcmqrscp", action="store_true",
                    help="also run DCMTK's dcmqrscp as a second, non-Orthanc PACS (modality "
                         "'dcmqr' in research)")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _up(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
