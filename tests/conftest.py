"""Fixtures shared by the whole suite: the real Orthanc lab and the synthetic cohort.

The ``integration`` marker (declared in pyproject.toml) is put on every test under
``tests/integration`` here, so ``pytest -m "not integration"`` runs the unit tests alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported inside the fixtures: the unit tests need neither
    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.deployments.lab.synthetic import Cohort

TESTS = Path(__file__).resolve().parent
INTEGRATION = TESTS / "integration"
REPO = TESTS.parent
ORTHANC = "/usr/sbin/Orthanc"
#: loaded on the research server: refuses the first copy of any REJECT-ONCE instance
REJECT_ONCE_LUA = TESTS / "lua" / "reject_once.lua"

# Nothing leaves loopback: no telemetry from the Prefect test server, and a Prefect home of
# the session's own, so the PHI scan reads exactly what this session wrote.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
# The site's data directory (cohorts, reports, linkage, sharing): the session's own, never
# the user's ~/.local/share/prefect-orthanc nor the checkout.
os.environ.setdefault("PREFECT_ORTHANC_DATA_DIR", tempfile.mkdtemp(prefix="prefect-orthanc-data-"))

# The project's packages import from the repository root even under a bare ``pytest``.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def lab() -> Iterator[OrthancLab]:
    """Two Orthanc 1.10.1 servers ("pacs" and "research") and DCMTK's dcmqrscp ("dcmqr") for
    the whole session.

    Fails (never skips) when Debian's Orthanc or dcmtk is not installed.
    """
    if not (os.path.isfile(ORTHANC) and os.access(ORTHANC, os.X_OK)):
        pytest.fail(f"{ORTHANC} not found: the integration tests need Debian's orthanc "
                    "package (apt-get install orthanc, or run scripts/bootstrap)",
                    pytrace=False)
    from prefect_orthanc.deployments.lab.servers import OrthancLab

    lua = [REJECT_ONCE_LUA] if REJECT_ONCE_LUA.exists() else []
    # dcmqrscp (Debian's dcmtk) runs next to them as a non-Orthanc PACS, modality "dcmqr"
    started = OrthancLab.start(stable_age=2, research_lua_scripts=lua, executable=ORTHANC,
                               dcmqrscp=True)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cohort")


@pytest.fixture(scope="session")
def cohort(cohort_dir: Path) -> Cohort:
    """3 patients x 2 studies x 2 series x 3 instances (6 studies, 36 instances), seed 0."""
    from prefect_orthanc.deployments.lab.synthetic import make_cohort

    return make_cohort(cohort_dir)
