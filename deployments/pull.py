"""The pull step of prefect.yaml: run from the code the worker's Python imports.

``prefect deploy`` stores pull steps with the deploy host's environment filled in: a
``{{ $PWD }}`` directory becomes the deploy host's checkout path in every deployment, and a
worker on another host (or in another checkout) fails to find the code. This step has no
argument to bake: at run time, on the worker, it changes to the directory this project is
imported from (the checkout of an editable install, a checkout named by ``PYTHONPATH``, or
site-packages), where the entrypoints ``flows/*.py`` are. So a worker host keeps the project
wherever it likes: it only has to be the copy the worker's Python imports (README, "Three
ways to run the flows"); tests/integration/test_scale_out.py runs a worker that way.

    pull:
      - prefect_orthanc.deployments.pull.set_working_directory: {}
"""

from __future__ import annotations

import os

from prefect_orthanc.flows.site import CODE_DIR

__all__ = ["set_working_directory"]


def set_working_directory() -> dict[str, str]:
    """Change to the project's code directory on this host; returns ``{"directory": path}``
    (what Prefect's own ``set_working_directory`` step returns)."""
    if not (CODE_DIR / "flows").is_dir():
        raise RuntimeError(f"the project's flows/ are not in {CODE_DIR}: install prefect-orthanc "
                           f"(pip install -e <checkout>) in the worker's environment, or name "
                           f"the checkout in the worker's PYTHONPATH")
    os.chdir(CODE_DIR)
    return {"directory": str(CODE_DIR)}
