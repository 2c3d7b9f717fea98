"""Everything imports as prefect_orthanc.*: importing every module of the package (the lab
included) loads no module under the repository folders' bare names, which would be a second
copy of a module (its classes unequal to the first's) or, installed, a user's own tasks.py."""

from __future__ import annotations

import importlib
import pkgutil
import sys

BARE = ("tasks", "flows", "deployments", "orthanc_client")


def test_every_module_imports_under_the_namespace_only() -> None:
    imported = []
    for folder in BARE:  # prefect_orthanc is a namespace package: walk each of its packages
        package = importlib.import_module(f"prefect_orthanc.{folder}")
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not info.name.endswith("__main__"):  # command lines: importing them runs them
                importlib.import_module(info.name)
                imported.append(info.name)
    assert {"prefect_orthanc.tasks.slots", "prefect_orthanc.flows.sharing.flow",
            "prefect_orthanc.deployments.lab.servers"} <= set(imported)
    bare = sorted(name for name in sys.modules
                  if name.split(".")[0] in BARE)
    assert bare == [], f"modules loaded under a bare name: {bare}"
