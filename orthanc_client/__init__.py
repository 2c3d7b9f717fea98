"""A small, typed client for the Orthanc REST API, sync (``Orthanc``) and async
(``AsyncOrthanc``), configured by ``OrthancSettings`` (``ORTHANC_*`` environment variables).

>>> from prefect_orthanc.orthanc_client import Orthanc
>>> with Orthanc.from_env() as orthanc:
...     study_ids = orthanc.find("Study", {"ModalitiesInStudy": "CT"})
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from prefect_orthanc.orthanc_client.client import AsyncOrthanc, Orthanc
from prefect_orthanc.orthanc_client.errors import (
    AssociationRejected,
    MoveDestinationUnknown,
    MoveRefused,
    OrthancArchiveError,
    OrthancBadRequest,
    OrthancConflict,
    OrthancDimseError,
    OrthancError,
    OrthancHTTPError,
    OrthancJobError,
    OrthancJobFailed,
    OrthancJobLost,
    OrthancJobTimeout,
    OrthancNotFound,
    OrthancUnauthorized,
    OrthancUnavailable,
    OrthancUnsupported,
    OrthancUsageError,
    PacsBusy,
    PacsUnreachable,
    QueryRefused,
    SafeMessageError,
)
from prefect_orthanc.orthanc_client.models import (
    ArchiveResult,
    Change,
    ChangesPage,
    JobInfo,
    JobState,
    Level,
    ModifyResult,
    QueryAnswer,
    QueryResult,
    Resource,
    ResourceStatistics,
    SystemInfo,
    UploadResult,
)
from prefect_orthanc.orthanc_client.operations import dicom_gate
from prefect_orthanc.orthanc_client.retrieval import (
    CountSource,
    ExpectedCount,
    RetrieveOutcome,
    RetrieveResult,
    Settle,
)
from prefect_orthanc.orthanc_client.settings import OrthancConnection, OrthancSettings

try:
    __version__: str = _distribution_version("prefect-orthanc")
    """The installed distribution's version (``pyproject.toml``'s ``version``), e.g. ``"0.1.0"``."""
except PackageNotFoundError:  # sources imported without being installed: no metadata to read
    __version__ = "0+unknown"

__all__ = [
    "ArchiveResult",
    "AssociationRejected",
    "AsyncOrthanc",
    "Change",
    "ChangesPage",
    "CountSource",
    "ExpectedCount",
    "JobInfo",
    "JobState",
    "Level",
    "ModifyResult",
    "MoveDestinationUnknown",
    "MoveRefused",
    "Orthanc",
    "OrthancArchiveError",
    "OrthancBadRequest",
    "OrthancConflict",
    "OrthancConnection",
    "OrthancDimseError",
    "OrthancError",
    "OrthancHTTPError",
    "OrthancJobError",
    "OrthancJobFailed",
    "OrthancJobLost",
    "OrthancJobTimeout",
    "OrthancNotFound",
    "OrthancSettings",
    "OrthancUnauthorized",
    "OrthancUnavailable",
    "OrthancUnsupported",
    "OrthancUsageError",
    "PacsBusy",
    "PacsUnreachable",
    "QueryAnswer",
    "QueryRefused",
    "QueryResult",
    "Resource",
    "ResourceStatistics",
    "RetrieveOutcome",
    "RetrieveResult",
    "SafeMessageError",
    "Settle",
    "SystemInfo",
    "UploadResult",
    "dicom_gate",
]
