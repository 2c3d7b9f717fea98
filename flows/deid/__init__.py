"""De-identification core for the sharing flow: what to ask Orthanc, and proof of the result.

``profile`` turns a ``DeidProfile`` and a project secret into Orthanc's Basic Profile request
(``POST /instances/{id}/anonymize``) and a ``LinkageEntry`` the user keeps apart; ``rewrite``
then writes keyed pseudonyms, keyed UIDs and shifted dates at every depth with pydicom
(``dates``, ``dictionary`` say what is a date, an identifier, a well-known UID); ``risk`` holds
back content a header rewrite cannot clean; ``scan`` checks every string of the ZIP about to
leave against the identifiers of the SOURCE files. Pure logic: no Prefect, no HTTP.
"""

import pydicom.config as _pydicom_config

from prefect_orthanc.flows.deid.dates import shift_da, shift_dt, shift_value, typed_forms
from prefect_orthanc.flows.deid.profile import (
    DEFAULT_EXCLUDED_MODALITIES,
    DEFAULT_EXCLUDED_SOP_CLASSES,
    DeidError,
    DeidProfile,
    LinkageEntry,
    MethodCode,
    build_request,
    client_kwargs,
    date_shift_days,
    is_excluded,
    patient_key,
    pseudo_uid,
    pseudonym,
    shift_date,
)
from prefect_orthanc.flows.deid.rewrite import Rewriter
from prefect_orthanc.flows.deid.risk import risk_reason
from prefect_orthanc.flows.deid.scan import (
    Finding,
    Identifiers,
    ScanReport,
    identifiers_from,
    scan_dataset,
    scan_package,
    scan_zip,
)

# pydicom's reading/writing validation logs the offending VALUE ("Invalid value for VR UI:
# '1.2...'"): source values must never reach a log, so values are taken as they are, silently.
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
_pydicom_config.settings.writing_validation_mode = _pydicom_config.IGNORE

__all__ = [
    "DEFAULT_EXCLUDED_MODALITIES",
    "DEFAULT_EXCLUDED_SOP_CLASSES",
    "DeidError",
    "DeidProfile",
    "Finding",
    "Identifiers",
    "LinkageEntry",
    "MethodCode",
    "Rewriter",
    "ScanReport",
    "build_request",
    "client_kwargs",
    "date_shift_days",
    "identifiers_from",
    "is_excluded",
    "patient_key",
    "pseudo_uid",
    "pseudonym",
    "risk_reason",
    "scan_dataset",
    "scan_package",
    "scan_zip",
    "shift_da",
    "shift_date",
    "shift_dt",
    "shift_value",
    "typed_forms",
]
