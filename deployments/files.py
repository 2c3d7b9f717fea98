"""The files the package ships besides code, read with ``importlib.resources``.

- ``prefect.yaml``: the deployments, as a template for your own Prefect project (in a
  checkout, ``deployments/prefect.yaml`` is a symlink to the repository root's
  ``prefect.yaml``, which ``prefect deploy --all`` reads: one file, two places to find it).
- ``orthanc/study_events.lua``: the Orthanc Lua script that posts ``orthanc.study.stable``
  events to Prefect (docs/events.md); Orthanc's ``LuaScripts`` option takes its path.

``copy_templates`` writes both into a project directory, never over a file that exists:

    python -m prefect_orthanc.deployments init        # ./prefect.yaml, ./orthanc/study_events.lua
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["PREFECT_YAML", "STUDY_EVENTS_LUA", "TemplateExists", "copy_templates"]

#: the shipped prefect.yaml (a ``pathlib.Path`` for any installed or editable package)
PREFECT_YAML: Traversable = files("prefect_orthanc.deployments") / "prefect.yaml"
#: the Orthanc Lua emitter of ``orthanc.study.stable`` events
STUDY_EVENTS_LUA: Traversable = (files("prefect_orthanc.deployments") / "orthanc"
                                  / "study_events.lua")

#: what ``copy_templates`` writes, relative to the project directory
TEMPLATES: dict[str, Traversable] = {"prefect.yaml": PREFECT_YAML,
                                     "orthanc/study_events.lua": STUDY_EVENTS_LUA}


class TemplateExists(SafeMessageError, FileExistsError):
    """A template's destination exists already; nothing was written."""


def copy_templates(directory: str | Path = ".") -> list[Path]:
    """Write ``prefect.yaml`` and ``orthanc/study_events.lua`` into ``directory``; returns the
    paths written. Raises ``TemplateExists`` (writing nothing) if either exists already."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise TemplateExists(f"{directory} is a file, not a directory: give your Prefect "
                             f"project's directory (nothing was written)")
    targets = {directory / name: source for name, source in TEMPLATES.items()}
    existing = [str(path) for path in targets if path.exists()]
    if existing:
        raise TemplateExists(f"{', '.join(existing)} exist(s) already: nothing was written; "
                             f"move it away, or compare it with the shipped template "
                             f"({PREFECT_YAML})")
    for target, source in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    return list(targets)
