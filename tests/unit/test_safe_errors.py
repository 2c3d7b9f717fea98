"""One base class for errors whose messages are PHI-free: the task policy shows their
message; every other exception is reduced to its type."""

from __future__ import annotations

import pickle

import pytest

from prefect_orthanc.flows.cohort_file import CohortError
from prefect_orthanc.flows.deid import DeidError
from prefect_orthanc.flows.planning import CohortTooBroad
from prefect_orthanc.flows.sharing import DeliveryError
from prefect_orthanc.flows.site import SiteError
from prefect_orthanc.orthanc_client import OrthancNotFound, SafeMessageError
from prefect_orthanc.tasks import TaskFailure, orthanc_task
from prefect_orthanc.tasks.limits import ModalityLimitMissing

SAFE = [DeidError("the source study has neither PatientID nor StudyInstanceUID"),
        CohortError("row 3: accession_number is empty"),
        CohortTooBroad("criteria still capped for one day"),
        SiteError("PREFECT_ORTHANC_DATA_DIR is not absolute"),
        DeliveryError("a package of this study is already there"),
        ModalityLimitMissing("orthanc-modality-pacs"),
        OrthancNotFound("GET /studies/{id}: 404 Unknown resource")]


@pytest.mark.parametrize("error", SAFE, ids=lambda e: type(e).__name__)
def test_safe_errors_reach_the_ui_with_their_message(error):
    assert isinstance(error, SafeMessageError)

    @orthanc_task(name="raises", retries=0)
    def raises() -> None:
        raise error

    with pytest.raises(type(error)) as caught:
        raises.fn()
    assert str(caught.value) == str(error) and "withheld" not in str(caught.value)
    again = pickle.loads(pickle.dumps(caught.value))  # Prefect pickles a failed task's error
    assert type(again) is type(error) and str(again) == str(error)


@pytest.mark.parametrize("error", [ValueError("Doe^Jane"), KeyError("PAT-0042"),
                                   RuntimeError("1.2.840.99")], ids=lambda e: type(e).__name__)
def test_other_errors_keep_only_their_type(error):
    @orthanc_task(name="raises", retries=0)
    def raises() -> None:
        raise error

    with pytest.raises(TaskFailure) as caught:
        raises.fn()
    assert str(caught.value) == (f"raises failed with {type(error).__name__}; details "
                                 f"withheld (may hold PHI)")
