"""The pull step of prefect.yaml: run from the code the worker's Python imports.

``prefect deploy`` stores pull steps with the deploy host's environment filled in (a
``{{ $PWD }}`` directory becomes the deploy host's path in every deployment), and a prefect.yaml
without pull steps gets one that changes to the deploy host's working directory. This step has
no argument to bake; at run time, on the worker, it does what the installed copy needs:

- installed from a wheel (``pip install prefect-orthanc``): nothing. The entrypoints are
  module paths (``prefect_orthanc.flows.collection:collect_cohort``) imported from
  site-packages, which need no working directory; the run keeps the one its worker gave it.
- a checkout (``pip install -e <checkout>``, wherever it is on the worker's host): change to
  the checkout's root, where the repository's files are (tests/integration/test_scale_out.py
  runs a worker elsewhere, tests/unit/test_spec.py the checkout).

Your own flows in the same prefect.yaml (file entrypoints such as ``flows/etl.py:etl``) need
your project's directory: give those deployments a pull step of their own, e.g. Prefect's
``prefect.deployments.steps.set_working_directory`` with your project's path on the worker,
or ``git_clone`` (README, "Use it in your Prefect project").

    pull:
      - prefect_orthanc.deployments.pull.set_working_directory: {}
"""

from __future__ import annotations

import os

from prefect_orthanc.flows.site import CODE_DIR, IS_CHECKOUT

__all__ = ["set_working_directory"]


def set_working_directory() -> dict[str, str]:
    """In a checkout, change to its root; installed, stay. Returns ``{"directory": path}``,
    the working directory the run continues in (what Prefect's own
    ``set_working_directory`` step returns)."""
    if IS_CHECKOUT:
        os.chdir(CODE_DIR)
    return {"directory": os.getcwd()}
