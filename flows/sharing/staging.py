"""One study's files in staging, found by name: its package (``<name>.zip``), the package's
temporary name while it is repacked, the work folder its rewritten instances wait in, and
its waiting linkage row. A crashed run leaves some of them; the next run of the study (under
its lock) removes them by name (``remove_staged``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect_orthanc.flows.sharing.linkage import pending_linkage

__all__ = ["remove_staged", "work_dir"]


def work_dir(staged: Path) -> Path:
    """Where the study's rewritten instances wait to be packaged as ``staged``."""
    return staged.with_name(f".{staged.name}.work")


def remove_staged(staged: Path) -> None:
    """Remove every staging file of the study packaged as ``staged`` (missing ones are fine)."""
    shutil.rmtree(work_dir(staged), ignore_errors=True)
    for path in (staged, staged.with_name(f".{staged.name}.partial"), pending_linkage(staged)):
        path.unlink(missing_ok=True)
