"""Prefect tasks for Orthanc: one task per operation, PACS-safe and PHI-safe by default.

>>> from prefect import flow
>>> from prefect_orthanc.tasks import OrthancCredentials, retrieve_study
>>> @flow
... def pull(study_uid: str):
...     return retrieve_study(OrthancCredentials.load("research"), "pacs", study_uid)
"""

from prefect_orthanc.orthanc_client import __version__ as __version__  # re-exported
from prefect_orthanc.tasks.anonymize import anonymize_resource, modify_resource
from prefect_orthanc.tasks.archives import download_archive
from prefect_orthanc.tasks.changes import ChangesBatch, advance_changes_cursor, read_changes
from prefect_orthanc.tasks.credentials import OrthancCredentials, load_credentials
from prefect_orthanc.tasks.jobs import wait_for_job
from prefect_orthanc.tasks.limits import (
                     ModalityLimitMissing,
                     SlotWaitExceeded,
                     ensure_limits,
                     limit_name,
                     modality_slot,
                     study_lock,
)
from prefect_orthanc.tasks.network import (
                     UnknownModality,
                     echo_modality,
                     query_modality,
                     require_modality,
                     retrieve_study,
                     store_to_modality,
                     store_to_peer,
)
from prefect_orthanc.tasks.policy import TaskFailure, is_transient, orthanc_flow, orthanc_task
from prefect_orthanc.tasks.resources import (
                     add_labels,
                     delete_resources,
                     find_resource_ids,
                     set_metadata,
)

__all__ = [
                     "ChangesBatch",
                     "ModalityLimitMissing",
                     "OrthancCredentials",
                     "SlotWaitExceeded",
                     "TaskFailure",
                     "UnknownModality",
                     "add_labels",
                     "advance_changes_cursor",
                     "anonymize_resource",
                     "delete_resources",
                     "download_archive",
                     "echo_modality",
                     "ensure_limits",
                     "find_resource_ids",
                     "is_transient",
                     "limit_name",
                     "load_credentials",
                     "modality_slot",
                     "modify_resource",
                     "orthanc_flow",
                     "orthanc_task",
                     "query_modality",
                     "read_changes",
                     "require_modality",
                     "retrieve_study",
                     "set_metadata",
                     "store_to_modality",
                     "store_to_peer",
                     "study_lock",
                     "wait_for_job",
]
