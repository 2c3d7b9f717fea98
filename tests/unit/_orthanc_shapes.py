"""Recorded answers of real Orthanc servers, for respx tests of label and metadata handling.

Sources (shapes only; nothing here is copied code):

- ``SYSTEM_1_12_11``: the example answer of ``GET /system`` in Orthanc's OpenAPI reference,
  version 1.12.11 (``OpenAPI/orthanc-openapi.json`` of the Orthanc Book,
  github.com/orthanc-mirrors/orthanc-book, commit 8a39616). ``HasLabels`` is new in 1.12.0
  and false when the database back-end has no labels.
- Labels on 1.12 (same OpenAPI file, and ``test_labels`` / ``test_find_labels`` in
  github.com/orthanc-mirrors/orthanc-tests ``Tests/Tests.py``): ``PUT`` and ``DELETE``
  ``/{level}/{id}/labels/{label}`` answer 200 with an empty body (adding twice is no error);
  ``GET /{level}/{id}/labels`` answers a JSON array of names; ``POST /tools/find`` takes
  ``Labels`` (list) and ``LabelsConstraint`` (``All`` by default, ``Any``, ``None``) and
  answers a JSON array of Orthanc IDs; a label outside ``[A-Za-z0-9_-]`` is refused (400).
- Orthanc 1.10.1 (Debian's package, measured on this machine 2026-11-29): ``GET
  .../metadata/{name}`` sends ``ETag: "<revision>-<md5 of the value>"`` (the revision stays 0
  with the built-in SQLite index, the MD5 changes with the value); an unset name is a bare
  404; a ``PUT`` whose ``If-Match`` is stale answers ``CONFLICT_1_10_1`` (409), whatever
  ``CheckRevisions`` says; with ``CheckRevisions: true`` a ``PUT`` to an existing value without
  ``If-Match`` answers the same 409. ``POST /tools/bulk-content`` with ``"Metadata": true``
  answers one study summary per ID with a ``Metadata`` object (``BULK_STUDY_1_10_1``).
"""

from __future__ import annotations

SYSTEM_1_12_11 = {
    "ApiVersion": 30,
    "Capabilities": {"HasExtendedChanges": True, "HasExtendedFind": True,
                     "HasKeyValueStores": True, "HasQueues": True,
                     "HasReserveQueueValue": True},
    "CheckRevisions": False, "DatabaseBackendPlugin": None,
    "DatabaseServerIdentifier": "be2ba798-1cb577e0-483accf5-d286e8f5-de2599df",
    "DatabaseVersion": 6, "DicomAet": "ORTHANC", "DicomDefaultRetrieveMethod": "C-MOVE",
    "DicomPort": 4242, "HasLabels": True, "HttpPort": 8042, "IngestTranscoding": "",
    "IsHttpServerSecure": True,
    "MainDicomTags": {"Instance": "0008,0012;0008,0013;0008,0018;0020,0012;0020,0013",
                      "Patient": "0010,0010;0010,0020;0010,0030;0010,0040;0010,1000",
                      "Series": "0008,0021;0008,0031;0008,0060;0020,000e;0020,0011",
                      "Study": "0008,0020;0008,0030;0008,0050;0008,1030;0020,000d"},
    "MaximumPatientCount": 0, "MaximumStorageMode": "Recycle", "MaximumStorageSize": 0,
    "Name": "Orthanc Demo", "OverwriteInstances": False, "PatientLevelEnabled": True,
    "PluginsEnabled": True, "ReadOnly": False, "StorageAreaPlugin": None,
    "StorageCompression": False, "UserMetadata": {}, "Version": "1.12.11",
}

#: a 1.12 server whose database back-end has no labels (e.g. an old index plugin)
SYSTEM_1_12_NO_LABELS = {**SYSTEM_1_12_11, "HasLabels": False}

SYSTEM_1_10_1 = {"ApiVersion": 16, "CheckRevisions": False, "DatabaseBackendPlugin": None,
                 "DatabaseVersion": 6, "DicomAet": "RESEARCH", "DicomPort": 4243,
                 "HttpPort": 8043, "IsHttpServerSecure": True, "Name": "research",
                 "PluginsEnabled": True, "StorageAreaPlugin": None, "Version": "1.10.1"}

CONFLICT_1_10_1 = {
    "HttpError": "Conflict", "HttpStatus": 409,
    "Message": "A bad revision number was provided, which might indicate conflict between "
               "multiple writers",
    "Method": "PUT",
    "OrthancError": "A bad revision number was provided, which might indicate conflict "
                    "between multiple writers",
    "OrthancStatus": 43,
    "Uri": "/studies/8a8cf898-ca27c490-d0c7058c-929d0581-2bbf104d/metadata/PrefectOrthancLabels",
}


def bulk_study_1_10_1(study_id: str, metadata: dict[str, str]) -> dict[str, object]:
    """One item of ``/tools/bulk-content`` (Level Study, Metadata true) as 1.10.1 sends it
    (tag values replaced by placeholders)."""
    return {"ID": study_id, "IsStable": True, "LastUpdate": "20261129T152630",
            "MainDicomTags": {"StudyInstanceUID": "1.2.3", "StudyDate": "20040119"},
            "Metadata": {"LastUpdate": "20261129T152630", **metadata},
            "ParentPatient": "fa558bce-587a86d3-ad0da9b3-9d043d9d-4f5c5718",
            "PatientMainDicomTags": {"PatientID": "placeholder"},
            "Series": ["93034833-163e42c3-bc9a428b-194620cf-2c5799e5"], "Type": "Study"}
