"""``python -m prefect_orthanc.deployments``: the deployments' command line.

    python -m prefect_orthanc.deployments init [DIR]     # write the prefect.yaml template there
    python -m prefect_orthanc.deployments check [--file PATH]     # validate prefect.yaml strictly
    python -m prefect_orthanc.deployments setup          # work pool, PACS limits, blocks
    python -m prefect_orthanc.deployments serve [--only NAME] [--replace] [--file PATH]
    python -m prefect_orthanc.deployments stack up|status|down ...  # from a checkout only

check and serve read --file, else ./prefect.yaml when the current directory has one, else the
shipped template; they say which.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prefect_orthanc.orthanc_client import __version__


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input is answered in one line, exit status 1 (``answer``)."""
    from prefect_orthanc.tasks.command_line import answer

    if argv is None:
        argv = sys.argv[1:]
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    return answer(command or "prefect_orthanc.deployments", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefect_orthanc.deployments",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"prefect-orthanc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser("init", help="write the shipped prefect.yaml and Orthanc Lua "
                                            "script into a project directory (never over a "
                                            "file)")
    init.add_argument("directory", nargs="?", default=".",
                      help="your Prefect project's directory (default: the current one)")
    check = commands.add_parser("check", help="validate prefect.yaml (unknown keys, "
                                              "entrypoints, parameters, schedules, triggers)")
    setup_command = commands.add_parser("setup", help="create the work pool, PACS limits and "
                                                      "blocks")
    setup_command.add_argument("--rotate-secret", action="store_true",
                               help="replace a saved de-identification secret with a different "
                                    "one (changes every pseudonym)")
    serve = commands.add_parser("serve", help="serve the deployments from this process")
    serve.add_argument("--only", action="append", metavar="NAME",
                       help="serve only this deployment (repeatable)")
    serve.add_argument("--replace", action="store_true",
                       help="delete same-named deployments made by `prefect deploy` first")
    for command in (check, serve):
        command.add_argument("--file", metavar="PATH", default=None,
                             help="a prefect.yaml of your own (default: ./prefect.yaml if "
                                  "there is one, else the shipped template)")
    commands.add_parser("stack", add_help=False, help="a production-shaped stack on this "
                        "machine: `stack up|status|down --help`")
    if argv[:1] == ["stack"]:
        try:
            from prefect_orthanc.deployments.multihost.cli import main as stack
        except ModuleNotFoundError as missing:
            if missing.name != "prefect_orthanc.deployments.multihost":
                raise
            print("stack: the production-shaped local stack is checkout tooling, not in the "
                  "installed package; run it from a git checkout (scripts/bootstrap)",
                  file=sys.stderr)
            return 2
        return stack(argv[1:])
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    if args.command == "init":
        from prefect_orthanc.deployments.files import copy_templates

        written = copy_templates(args.directory)
        for path in written:
            print(f"wrote {path}")
        print("next: edit prefect.yaml (schedules, parameters; add your own flows), then "
              "`python -m prefect_orthanc.deployments check --file prefect.yaml`")
        return 0
    if args.command == "check":
        from prefect_orthanc.deployments.spec import SpecError, load

        own = _prefect_yaml(args.file)
        try:
            specs = load(own) if own else load()
        except SpecError as error:
            print("prefect.yaml: INVALID\n  " + str(error).replace("; ", "\n  "),
                  file=sys.stderr)
            return 1
        for spec in specs:
            when = ", ".join(s.get("cron") or f"every {s.get('interval')} s"
                             for s in spec.schedules) or "no schedule"
            print(f"{spec.full_name}: {when}; {len(spec.triggers)} trigger(s)")
        return 0
    if args.command == "setup":
        from prefect_orthanc.deployments.setup import setup

        done = setup(rotate_secret=args.rotate_secret)
        for what, outcome in done.items():
            print(f"{what}: {outcome}")
        return 0
    from prefect_orthanc.deployments.serve import serve as serve_all

    own = _prefect_yaml(args.file)
    serve_all(set(args.only) if args.only else None, replace=args.replace, path=own)
    return 0


def _prefect_yaml(given: str | None) -> Path | None:
    """The prefect.yaml to read: ``--file``, else ./prefect.yaml if there is one, else None
    (the shipped template); said on stdout."""
    from prefect_orthanc.deployments.files import PREFECT_YAML

    path = Path(given) if given else Path("prefect.yaml")
    if given or path.is_file():
        print(f"reading {path}", flush=True)
        return path
    print(f"reading the shipped template {PREFECT_YAML} (no ./prefect.yaml here; --file "
          f"names another)", flush=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
