"""What the sharing flow takes and gives: destination, options, request, one study's outcome,
and the delivery error. Pydantic models only: no I/O."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.sharing.secret import SECRET_ENV
from prefect_orthanc.orthanc_client import SafeMessageError
from prefect_orthanc.orthanc_client.models import is_orthanc_id

__all__ = [
    "SHARED_DIRECTORY",
    "DeliveryError",
    "Destination",
    "Outcome",
    "SharedStudy",
    "SharingOptions",
    "SharingRequest",
]


class DeliveryError(SafeMessageError):
    """A delivery refused or impossible as asked (e.g. a package name already taken in the
    destination: nothing is overwritten). Names the setting to check, never a value."""


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Destination(BaseModel):
    """Where verified studies go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["directory", "peer", "modality"] = Field(
        "directory", description="A local directory (ZIP + manifest), an Orthanc peer, or a "
                                 "DICOM modality (C-STORE).")
    target: str = Field(description="Directory path (relative to PREFECT_ORTHANC_DATA_DIR "
                                    "unless absolute), or the peer / modality name configured "
                                    "in the research Orthanc.")

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("target is a directory path or a peer / modality name")
        return value.strip()

    @model_validator(mode="after")
    def _check_name(self) -> Destination:
        if self.kind != "directory" and not _NAME.match(self.target):
            raise ValueError(f"a {self.kind} target is the {self.kind}'s name in the research "
                             f"Orthanc (letters, digits, '-', '_')")
        return self

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}"


#: the default destination: ``shared/`` under the data directory
SHARED_DIRECTORY = Destination(kind="directory", target="shared")


def _resolved(path: str, base: Path) -> Path:
    """``path`` as it will be used: relative ones under ``base`` (the data directory)."""
    return Path(os.path.normpath(base / Path(path).expanduser()))


class SharingOptions(BaseModel):
    """Where it goes and how to de-identify it (the new-study flow's share rules reuse this)."""

    model_config = ConfigDict(extra="forbid")

    destination: Destination = Field(SHARED_DIRECTORY, description="Where verified studies go: "
                                     "a directory (default: 'shared' under "
                                     "PREFECT_ORTHANC_DATA_DIR), an Orthanc peer or a DICOM "
                                     "modality.")
    profile: DeidProfile = Field(default_factory=DeidProfile, description="How studies are "
                                 "de-identified (defaults: keyed pseudonyms, shifted dates, "
                                 "descriptions and private tags dropped, risky objects "
                                 "excluded).")
    secret_block: str | None = Field(None, description=f"Prefect Secret block holding the "
                                     f"project secret (empty: the {SECRET_ENV} variable). The "
                                     f"secret itself is never a parameter.")
    linkage_path: str = Field("linkage/linkage.csv", description="Where the source <-> "
                              "pseudonym table goes (relative to PREFECT_ORTHANC_DATA_DIR "
                              "unless absolute). Keep it apart from the shared data.")
    staging_dir: str = Field("sharing/staging", description="Where ZIPs wait for the scan; "
                             "quarantined ones stay in its 'quarantine' folder.")
    ledger_path: str = Field("sharing/ledger.jsonl", description="Record of deliveries, so a "
                             "re-run delivers nothing twice.")
    package: str = Field("share", pattern=r"^[A-Za-z0-9_-]{1,32}$",
                         description="Prefix of package file names.")
    keep_anonymized: bool = Field(False, description="Keep the anonymized copies in Orthanc.")

    @field_validator("linkage_path", "staging_dir", "ledger_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a path is required")
        return value.strip()

    @model_validator(mode="after")
    def _apart(self) -> SharingOptions:
        self.check_paths(Path("/data-dir"))
        return self

    def check_paths(self, base: Path) -> None:
        """Refuse a linkage table, ledger or staging area inside the shared directory (it
        would be shared with the data), and a staging area that is the destination."""
        if self.destination.kind != "directory":
            return
        shared = _resolved(self.destination.target, base)
        for name in ("linkage_path", "ledger_path", "staging_dir"):
            path = _resolved(getattr(self, name), base)
            if path == shared or shared in path.parents:
                raise ValueError(f"{name} is inside the destination directory: it would be "
                                 f"shared with the data")
        staging = _resolved(self.staging_dir, base)
        if staging in shared.parents:
            raise ValueError("the destination directory is inside staging_dir")


class SharingRequest(SharingOptions):
    """What to share, where it goes and how to de-identify it. The sharing flow takes these
    as flat parameters (what to share first) and builds this model when a run starts."""

    project: str | None = Field(None, description="What to share: the studies the collection "
                                "flow collected for this project. Either this or study_ids.")
    study_ids: list[str] = Field(default_factory=list, description="Or: Orthanc study IDs in "
                                 "the research server.")

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and not _NAME.match(value):
            raise ValueError("project is 1-64 letters, digits, '-' or '_'")
        return value

    @field_validator("study_ids")
    @classmethod
    def _check_ids(cls, value: list[str]) -> list[str]:
        ids = [v.strip() for v in value if v.strip()]
        bad = sum(not is_orthanc_id(v) for v in ids)
        if bad:
            raise ValueError(f"{bad} of the study_ids are not Orthanc study IDs "
                             f"(xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx-xxxxxxxx)")
        return list(dict.fromkeys(ids))

    @model_validator(mode="after")
    def _one_selection(self) -> SharingRequest:
        if bool(self.project) == bool(self.study_ids):
            raise ValueError("give exactly one of project and study_ids (to share study_ids "
                             "from a deployment whose default is a project, also set "
                             "project to null)")
        return self


#: what became of one study: ``verified`` (de-identified and clean, not yet delivered),
#: ``delivered``, ``delivered_before`` (this content version, to this destination, with this
#: profile), ``excluded`` (every instance held back), ``quarantined`` (findings: never
#: delivered), ``failed`` (an error)
Outcome = Literal["verified", "delivered", "delivered_before", "excluded", "quarantined",
                  "failed"]


class SharedStudy(BaseModel):
    """One study's outcome: Orthanc IDs, pseudonyms, counts, checksums. No source values.
    Holds a source Orthanc ID next to pseudonyms: it stays in the process (the flow's
    artifact and logs never show both)."""

    model_config = ConfigDict(frozen=True)

    source_id: str
    outcome: Outcome = "failed"
    content_version: str = Field("", description="The source study's instance set when it "
                                 "was de-identified (count and hash of its instance IDs).")
    pseudo_study: str = Field("", description="The pseudonymous StudyID.")
    pseudonym_from: str = Field("", description="What the patient pseudonym is keyed on: "
                                "PatientID, IssuerOfPatientID+PatientID, or StudyInstanceUID "
                                "for a study without PatientID (not linked to other studies).")
    version: int = Field(0, description="Package version of this study at this destination.")
    supersedes: tuple[str, ...] = Field((), description="Earlier packages of this study.")
    anonymized_id: str | None = None
    pseudo_patient: str = ""
    instances_in: int = 0
    instances_out: int = 0
    excluded: int = 0
    excluded_reasons: dict[str, int] = Field(
        default_factory=dict, description="Instances held back, by reason (e.g. "
                                          "'modality US', 'burned-in annotation').")
    file: str = ""
    size: int = 0
    sha256: str = ""
    verified: bool = False
    findings: tuple[str, ...] = ()
    delivered: str = ""
