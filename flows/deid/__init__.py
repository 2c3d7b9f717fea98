"""De-identification core for the sharing flow: what to ask Orthanc, and proof of the result.

``profile`` turns a ``DeidProfile`` and a project secret into the body of Orthanc's
``POST /studies/{id}/anonymize`` (keyed deterministic pseudonyms, a per-patient date shift) and a
``LinkageEntry`` the user keeps apart. ``scan`` checks every string of the anonymized ZIP against
the source study's identifiers before anything leaves. Pure logic: no Prefect, no HTTP.
"""

from .profile import (
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
    pseudo_uid,
    pseudonym,
    shift_date,
)
from .scan import Finding, Identifiers, ScanReport, identifiers_from, scan_dataset, scan_zip

__all__ = [
    "DEFAULT_EXCLUDED_MODALITIES",
    "DEFAULT_EXCLUDED_SOP_CLASSES",
    "DeidError",
    "DeidProfile",
    "Finding",
    "Identifiers",
    "LinkageEntry",
    "MethodCode",
    "ScanReport",
    "build_request",
    "client_kwargs",
    "date_shift_days",
    "identifiers_from",
    "is_excluded",
    "pseudo_uid",
    "pseudonym",
    "scan_dataset",
    "scan_zip",
    "shift_date",
]
