"""mkdocs hook: the docs read the package as ``pyproject.toml`` lays it out.

- **Finding ``prefect_orthanc.*`` in a checkout.** The repository's folders (``tasks/``,
  ``flows/``, ...) install as ``prefect_orthanc.tasks``, ``prefect_orthanc.flows``, ...
  through setuptools' ``package-dir`` mapping, and griffe (which reads the sources, it does not
  import them) looks for a ``prefect_orthanc/`` folder that does not exist here. For the length
  of the build a temporary folder holds ``prefect_orthanc/<name>`` symbolic links to the mapped
  folders, first on ``sys.path`` before mkdocstrings reads it. (griffe's warnings name files
  under that folder: ``<tmp>/prefect_orthanc/tasks/jobs.py`` is ``tasks/jobs.py``.)
- **Pages that follow the code.** In a page, ``<!-- modules prefect_orthanc.x -->`` becomes one
  ``::: prefect_orthanc.x.<module>`` per public module file of that package (subpackages and
  ``_``-names left out), so a module split or renamed needs no edit here; and
  ``<!-- help prefect_orthanc.x -->`` becomes the ``--help`` of ``python -m prefect_orthanc.x``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

_NAMESPACE = "prefect_orthanc"
_MARKER = re.compile(r"^<!-- (modules|help) (prefect_orthanc(?:\.\w+)+) -->$", re.M)
_made: list[Path] = []
_folders: dict[str, Path] = {}


@event_priority(100)  # before mkdocstrings makes its handlers
def on_config(config: Any) -> Any:
    root = Path(config.config_file_path).resolve().parent
    package_dir = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))[
        "tool"]["setuptools"]["package-dir"]
    tree = Path(tempfile.mkdtemp(prefix="prefect-orthanc-docs-"))
    _made.append(tree)
    for module, folder in package_dir.items():
        namespace, _, name = module.partition(".")
        if namespace != _NAMESPACE or not name:
            continue
        _folders[module] = root / folder
        if "." in name:
            continue  # a deeper mapping lies inside its parent's folder, reached through it
        link = tree / _NAMESPACE / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(root / folder, target_is_directory=True)
    sys.path.insert(0, str(tree))
    return config


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return _MARKER.sub(lambda match: _expand(match.group(1), match.group(2)), markdown)


def on_shutdown() -> None:
    while _made:
        tree = _made.pop()
        if str(tree) in sys.path:
            sys.path.remove(str(tree))
        shutil.rmtree(tree, ignore_errors=True)


def _folder(package: str) -> Path:
    """The checkout folder of a package, by its nearest mapped ancestor."""
    parts = package.split(".")
    for cut in range(len(parts), 1, -1):
        base = ".".join(parts[:cut])
        if base in _folders:
            return _folders[base].joinpath(*parts[cut:])
    raise ValueError(f"pyproject.toml's package-dir maps no folder for {package}")


def _expand(kind: str, package: str) -> str:
    if kind == "help":
        done = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True,
                              text=True, timeout=120, check=True,
                              env={**os.environ, "COLUMNS": "100"})
        return f"```text\n{done.stdout.rstrip()}\n```"
    modules = sorted(path.stem for path in _folder(package).glob("*.py")
                     if not path.stem.startswith("_"))
    if not modules:
        raise ValueError(f"{package}: no public module to document")
    return "\n\n".join(f"::: {package}.{module}" for module in modules)
