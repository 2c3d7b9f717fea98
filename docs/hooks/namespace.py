"""mkdocs hook: lets mkdocstrings find ``prefect_orthanc.*`` in a source checkout.

The repository's folders (``tasks/``, ``flows/``, ...) install as ``prefect_orthanc.tasks``,
``prefect_orthanc.flows``, ... through setuptools' ``package-dir`` mapping, and griffe (which
reads the sources, it does not import them) looks for a ``prefect_orthanc/`` folder that does
not exist here. This hook builds one for the length of the build: a temporary folder whose
``prefect_orthanc/<name>`` entries are symbolic links to the folders that ``pyproject.toml``
maps, put first on ``sys.path`` before the handler reads it. ``pyproject.toml`` stays the one
place that says which folder is which module.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

_NAMESPACE = "prefect_orthanc"
_made: list[Path] = []


@event_priority(100)  # before mkdocstrings makes its handlers
def on_config(config: Any) -> Any:
    root = Path(config.config_file_path).resolve().parent
    package_dir = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))[
        "tool"]["setuptools"]["package-dir"]
    tree = Path(tempfile.mkdtemp(prefix="prefect-orthanc-docs-"))
    _made.append(tree)
    for module, folder in package_dir.items():
        namespace, _, name = module.partition(".")
        if namespace != _NAMESPACE or not name or "." in name:
            continue  # a deeper mapping lies inside its parent's folder, reached through it
        link = tree / _NAMESPACE / name
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(root / folder, target_is_directory=True)
    sys.path.insert(0, str(tree))
    return config


def on_shutdown() -> None:
    while _made:
        tree = _made.pop()
        if str(tree) in sys.path:
            sys.path.remove(str(tree))
        shutil.rmtree(tree, ignore_errors=True)
