"""De-identified sharing: pseudonymize → verify no PHI → package → deliver, once per study.

For each selected study in the research Orthanc: Orthanc anonymizes it with the profile's
request (keyed pseudonyms, shifted dates), excluded object types are removed from the copy,
the copy is streamed to a ZIP in a staging folder and **every string of every instance, and
every file name, is scanned** for the source's identifiers. Only a clean study is delivered (a
directory, an Orthanc peer or a DICOM modality); a study with any finding is quarantined and
the run ends Failed.

Deliveries cannot lose a study: each source study gets its own package, named by its
pseudonymous patient and study and a version number (``share-<patient>-<study>-v1.zip``), never
overwritten (a name already taken is an error); one study's work (ledger check, de-identify,
deliver, record) holds a per-study lock (``tasks.study_lock``, a Prefect global concurrency
limit) so duplicate events cannot race; the ledger (source study, destination, profile and the
study's *content version*: its instance set) is appended and fsynced right after each
delivery, so a study that grew after being shared is shared again whole as version 2, and the
manifest (one entry per study) says which package supersedes which. Directory deliveries are
atomic (a hidden temporary name in the destination, fsync, then a no-clobber link).

Exactly once, whatever kills a run: packages are byte-deterministic (keyed pseudonyms and
UIDs, ZIPs repacked without clocks), and before delivering, the destination itself is asked
whether a killed run already did it (the final file with the package's checksum; the study
on a modality, by a C-FIND on its keyed StudyInstanceUID); the manifest entry, linkage row and
ledger line are idempotent and fsynced, a line torn mid-write is cut off; what a killed run
left in staging, in the destination (temporary files) or in research (the anonymized copy) is
removed by the study's next run. See docs/deidentification.md, "Delivery".

Each study ends with an ``outcome``: ``delivered``, ``delivered_before``, ``excluded`` (every
instance held back by the profile: a warning, not a failure), ``quarantined`` (findings) or
``failed`` (an error, its message shown when it is PHI-free). A study without PatientID is
delivered under a pseudonym keyed on its StudyInstanceUID (``pseudonym_from`` says so). The
linkage table (source ↔ pseudonym) gets a row only for a delivered study and goes to a file the
user chooses, never to Prefect: the run's artifact and logs name source studies and never
hold a pseudonym. The project secret comes from a Prefect Secret block or
``PREFECT_ORTHANC_DEID_SECRET``.

Example:
    ```python
    from prefect_orthanc.flows.sharing import share_studies, Destination

    share_studies(project="lung-2026",
                  destination=Destination(kind="directory", target="/exports"),
                  linkage_path="/secure/linkage.csv")
    ```
"""

from prefect_orthanc.flows.sharing.deidentify import deidentify_study
from prefect_orthanc.flows.sharing.delivery import deliver_study
from prefect_orthanc.flows.sharing.flow import share_studies, share_study
from prefect_orthanc.flows.sharing.ledger import content_version
from prefect_orthanc.flows.sharing.models import (
                     SHARED_DIRECTORY,
                     DeliveryError,
                     Destination,
                     Outcome,
                     SharedStudy,
                     SharingOptions,
                     SharingRequest,
)
from prefect_orthanc.flows.sharing.secret import MIN_SECRET_LENGTH, SECRET_ENV, project_secret

__all__ = [
                     "MIN_SECRET_LENGTH",
                     "SECRET_ENV",
                     "SHARED_DIRECTORY",
                     "DeliveryError",
                     "Destination",
                     "Outcome",
                     "SharedStudy",
                     "SharingOptions",
                     "SharingRequest",
                     "content_version",
                     "deidentify_study",
                     "deliver_study",
                     "project_secret",
                     "share_studies",
                     "share_study",
]
