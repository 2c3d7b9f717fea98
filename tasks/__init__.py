"""Prefect tasks for Orthanc: one task per operation, PACS-safe and PHI-safe by default.

>>> from prefect import flow
>>> from tasks import OrthancCredentials, retrieve_study
>>> @flow
... def pull(study_uid: str):
...     return retrieve_study(OrthancCredentials.load("research"), "pacs", study_uid)
"""

from .anonymize import anonymize_resource, modify_resource
from .archives import download_archive
from .changes import ChangesBatch, advance_changes_cursor, read_changes
from .credentials import OrthancCredentials
from .jobs import wait_for_job
from .limits import (ModalityLimitMissing, SlotWaitExceeded, ensure_limits, limit_name,
                     modality_slot, study_lock)
from .network import (
    UnknownModality,
    echo_modality,
    query_modality,
    retrieve_study,
    store_to_modality,
    require_modality,
    store_to_peer,
)
from .policy import TaskFailure, is_transient, orthanc_task
from .resources import add_labels, delete_resources, find_resources, set_metadata

__all__ = [
    "OrthancCredentials",
    "echo_modality", "query_modality", "retrieve_study", "store_to_modality", "store_to_peer",
    "require_modality", "UnknownModality",
    "find_resources", "delete_resources", "set_metadata", "add_labels",
    "anonymize_resource", "modify_resource", "download_archive", "wait_for_job",
    "read_changes", "advance_changes_cursor", "ChangesBatch",
    "ModalityLimitMissing", "SlotWaitExceeded", "ensure_limits", "limit_name", "modality_slot",
    "study_lock",
    "TaskFailure", "is_transient", "orthanc_task",
]
