"""Small, frozen models of what callers read back from Orthanc.

Fields that hold DICOM tag values (``main_dicom_tags``, query ``tags``, job ``content``) are
kept out of ``repr()`` so that logging a model never prints patient data.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ArchiveResult",
    "Change",
    "ChangesPage",
    "JobInfo",
    "JobState",
    "Level",
    "ModifyResult",
    "QueryAnswer",
    "QueryResult",
    "Resource",
    "ResourceStatistics",
    "SystemInfo",
    "UploadResult",
    "is_orthanc_id",
]

_ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def is_orthanc_id(value: str) -> bool:
    """Whether ``value`` has the shape of an Orthanc resource ID (a SHA-1 of the resource's
    DICOM identifiers, as five dash-separated groups of 8 lowercase hex digits), e.g.
    ``"0b8c9fd4-8e4a2f1c-5d3b7a90-1c2e4f6a-9b8d7c6e"``."""
    return bool(_ORTHANC_ID.match(value))


class Level(str, enum.Enum):
    """A DICOM level, named as Orthanc names it. ``Level("study")`` works too."""

    PATIENT = "Patient"
    STUDY = "Study"
    SERIES = "Series"
    INSTANCE = "Instance"

    @classmethod
    def _missing_(cls, value: object) -> Level | None:
        if isinstance(value, str):
            folded = value.strip().lower().rstrip("s")
            aliases = {"patient": cls.PATIENT, "study": cls.STUDY, "studie": cls.STUDY,
                       "serie": cls.SERIES, "instance": cls.INSTANCE, "image": cls.INSTANCE}
            return aliases.get(folded)
        return None

    @property
    def collection(self) -> str:
        """The REST collection holding resources of this level (``studies``)."""
        return {"Patient": "patients", "Study": "studies", "Series": "series",
                "Instance": "instances"}[self.value]

    @property
    def child(self) -> Level | None:
        order = list(Level)
        index = order.index(self)
        return order[index + 1] if index + 1 < len(order) else None

    @property
    def parent(self) -> Level | None:
        order = list(Level)
        index = order.index(self)
        return order[index - 1] if index > 0 else None


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")


_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


class SystemInfo(_Model):
    """``GET /system``: the server's identity and version, used for feature detection."""

    name: str = Field(alias="Name")
    version: str = Field(alias="Version")
    api_version: int = Field(alias="ApiVersion")
    dicom_aet: str = Field(alias="DicomAet")
    dicom_port: int = Field(alias="DicomPort")
    http_port: int = Field(alias="HttpPort")
    database_version: int | None = Field(None, alias="DatabaseVersion")
    plugins_enabled: bool | None = Field(None, alias="PluginsEnabled")
    #: the ``CheckRevisions`` option (reported from 1.9.2)
    check_revisions: bool | None = Field(None, alias="CheckRevisions")
    #: whether the database back-end supports labels (reported from 1.12.0)
    has_labels: bool | None = Field(None, alias="HasLabels")

    @property
    def version_tuple(self) -> tuple[int, int, int]:
        """(major, minor, patch); a "mainline" build counts as newer than any release."""
        match = _VERSION.match(self.version)
        if match is None:
            return (999, 0, 0)
        return (int(match[1]), int(match[2]), int(match[3]))

    @property
    def supports_labels(self) -> bool:
        """Orthanc >= 1.12.0 with a database back-end that has labels (``HasLabels``)."""
        return self.at_least("1.12.0") and self.has_labels is not False

    def at_least(self, version: str) -> bool:
        wanted = tuple(int(part) for part in version.split("."))
        return self.version_tuple >= wanted


class Resource(_Model):
    """A patient, study, series or instance as Orthanc summarizes it (``GET /studies/{id}``)."""

    id: str = Field(alias="ID")
    level: Level = Field(alias="Type")
    parent_id: str | None = None
    children_ids: tuple[str, ...] = ()
    is_stable: bool | None = Field(None, alias="IsStable")
    last_update: str | None = Field(None, alias="LastUpdate")
    labels: tuple[str, ...] = Field((), alias="Labels")
    #: only in answers that carry it (``/tools/bulk-content`` with ``Metadata``)
    metadata: dict[str, str] = Field(default_factory=dict, alias="Metadata", repr=False)
    main_dicom_tags: dict[str, str] = Field(default_factory=dict, alias="MainDicomTags", repr=False)
    patient_main_dicom_tags: dict[str, str] = Field(
        default_factory=dict, alias="PatientMainDicomTags", repr=False
    )
    file_size: int | None = Field(None, alias="FileSize")

    @classmethod
    def from_orthanc(cls, payload: dict[str, Any]) -> Resource:
        level = Level(payload["Type"])
        parent_key = {"Study": "ParentPatient", "Series": "ParentStudy",
                      "Instance": "ParentSeries"}.get(level.value)
        child_key = {"Patient": "Studies", "Study": "Series",
                     "Series": "Instances"}.get(level.value)
        return cls.model_validate({
            **payload,
            "parent_id": payload.get(parent_key) if parent_key else None,
            "children_ids": tuple(payload.get(child_key, ())) if child_key else (),
        })


class ResourceStatistics(_Model):
    """``GET /{level}/{id}/statistics``: counts and sizes below a resource."""

    count_instances: int = Field(alias="CountInstances")
    count_series: int | None = Field(None, alias="CountSeries")
    count_studies: int | None = Field(None, alias="CountStudies")
    disk_size: int = Field(alias="DiskSize")
    uncompressed_size: int = Field(alias="UncompressedSize")


class JobState(str, enum.Enum):
    """An Orthanc job's ``State`` (``GET /jobs/{id}``); ``finished`` for Success or Failure."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCESS = "Success"
    FAILURE = "Failure"
    PAUSED = "Paused"
    RETRY = "Retry"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILURE)


class JobInfo(_Model):
    """``GET /jobs/{id}``. ``content`` is job-specific (e.g. the new resource of an
    anonymization)."""

    id: str = Field(alias="ID")
    type: str = Field(alias="Type")
    state: JobState = Field(alias="State")
    progress: int = Field(0, alias="Progress")
    priority: int = Field(0, alias="Priority")
    error_code: int | None = Field(None, alias="ErrorCode")
    error_description: str | None = Field(None, alias="ErrorDescription")
    error_details: str | None = Field(None, alias="ErrorDetails", repr=False)
    creation_time: str | None = Field(None, alias="CreationTime")
    completion_time: str | None = Field(None, alias="CompletionTime")
    content: dict[str, Any] = Field(default_factory=dict, alias="Content", repr=False)

    def redacted(self) -> JobInfo:
        """A copy whose ``content`` keeps only counts, sizes and Orthanc IDs.

        Orthanc puts DICOM values in some jobs' content (a C-MOVE job lists every query
        answer's PatientID and AccessionNumber): return this from anything that may be logged
        or stored.
        """
        safe = {k: v for k, v in self.content.items() if k in _SAFE_JOB_CONTENT}
        return self.model_copy(update={"content": safe, "error_details": None})


_SAFE_JOB_CONTENT = frozenset({
    "ID", "Path", "Type", "InstancesCount", "FailedInstancesCount", "ArchiveSize",
    "ArchiveSizeMB", "UncompressedSize", "UncompressedSizeMB", "IsAnonymization",
    "ParentResources", "LocalAet", "RemoteAet", "Peer", "Description",
})


class QueryAnswer(_Model):
    """One C-FIND answer, tags simplified to DICOM keywords (values are PHI: not in repr)."""

    index: int
    tags: dict[str, Any] = Field(repr=False)

    def get(self, keyword: str, default: Any = None) -> Any:
        return self.tags.get(keyword, default)


class QueryResult(_Model):
    """The outcome of a C-FIND: Orthanc's query ID (usable to retrieve) and its answers."""

    query_id: str
    modality: str
    level: Level
    answers: tuple[QueryAnswer, ...]

    def __len__(self) -> int:
        return len(self.answers)


class Change(_Model):
    """One entry of Orthanc's change log: sequence number, change type (e.g. ``StableStudy``),
    resource level and Orthanc ID."""

    seq: int = Field(alias="Seq")
    change_type: str = Field(alias="ChangeType")
    resource_type: str = Field(alias="ResourceType")
    id: str = Field(alias="ID")
    path: str | None = Field(None, alias="Path")
    date: str | None = Field(None, alias="Date")


class ChangesPage(_Model):
    """``GET /changes``: a page of changes, the cursor to continue from, and whether it is the
    end."""

    changes: tuple[Change, ...] = Field(alias="Changes")
    last: int = Field(alias="Last")
    done: bool = Field(alias="Done")


class UploadResult(_Model):
    """One stored instance (``POST /instances``). ``status`` is Success or AlreadyStored."""

    id: str = Field(alias="ID")
    status: str = Field(alias="Status")
    parent_patient: str | None = Field(None, alias="ParentPatient")
    parent_study: str | None = Field(None, alias="ParentStudy")
    parent_series: str | None = Field(None, alias="ParentSeries")


class ModifyResult(_Model):
    """The resource created by an anonymization or modification."""

    id: str = Field(alias="ID")
    level: Level = Field(alias="Type")
    patient_id: str | None = Field(None, alias="PatientID", repr=False)
    job_id: str | None = None


class ArchiveResult(_Model):
    """A ZIP written to disk: where, how many bytes, and its SHA-256."""

    path: Path
    size: int
    sha256: str
