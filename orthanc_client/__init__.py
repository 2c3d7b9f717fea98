"""A small, typed client for the Orthanc REST API, sync (``Orthanc``) and async
(``AsyncOrthanc``), configured by ``OrthancSettings`` (``ORTHANC_*`` environment variables).

>>> from orthanc_client import Orthanc
>>> with Orthanc.from_env() as orthanc:
...     study_ids = orthanc.find("Study", {"ModalitiesInStudy": "CT"})
"""

from .client import AsyncOrthanc, Orthanc
from .errors import (
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
from .models import (
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
from .retrieval import CollectOutcome, CollectResult, CountSource, ExpectedCount, Settle
from .operations import dicom_gate
from .settings import OrthancSettings

__all__ = [
    "Orthanc", "AsyncOrthanc", "OrthancSettings", "dicom_gate",
    "OrthancError", "OrthancHTTPError", "OrthancBadRequest", "OrthancUnauthorized",
    "OrthancNotFound", "OrthancConflict", "OrthancUnavailable", "OrthancDimseError", "OrthancJobError",
    "OrthancJobFailed", "OrthancJobLost", "OrthancJobTimeout", "OrthancUnsupported",
    "OrthancArchiveError", "OrthancUsageError", "PacsUnreachable", "AssociationRejected",
    "MoveDestinationUnknown", "QueryRefused", "MoveRefused", "PacsBusy", "SafeMessageError",
    "Level", "SystemInfo", "Resource", "ResourceStatistics", "JobState", "JobInfo",
    "QueryAnswer", "QueryResult", "Change", "ChangesPage", "UploadResult", "ModifyResult",
    "ArchiveResult", "CollectOutcome", "CollectResult", "CountSource", "ExpectedCount", "Settle",
]
