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


# ------------------------------------------------------------------ the mechanism, by kind
# Through Prefect's engine and server (task, flow, subflow, mapped task, what the user reads):
# tests/integration/test_error_messages.py.


def _product_modules():
    import importlib
    import pkgutil

    for folder in ("orthanc_client", "tasks", "flows", "deployments"):
        package = importlib.import_module(f"prefect_orthanc.{folder}")
        yield package
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if ".lab" in info.name or ".multihost" in info.name:
                continue  # contributor tooling, not in the wheel
            yield importlib.import_module(info.name)


def test_every_error_class_of_the_product_derives_from_the_one_base():
    """An error the project defines has a message the project writes: PHI-free, and marked
    so by one base class that the task and flow policy passes through."""
    found = {}
    for module in _product_modules():
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Exception)
                    and value.__module__ == module.__name__):
                found[f"{module.__name__}.{value.__name__}"] = value
    assert len(found) > 20  # the walk saw the package (client errors, tasks', flows')
    unmarked = sorted(name for name, cls in found.items() if not issubclass(cls, SafeMessageError))
    assert unmarked == []


def _real_values() -> tuple[str, str]:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(str(get_testdata_file("rtplan.dcm")))
    return str(ds.PatientID), str(ds.PatientName)


def test_a_safe_error_wrapped_by_pydantic_keeps_its_message():
    from pydantic import ValidationError

    from prefect_orthanc.flows.deid import DeidProfile
    from prefect_orthanc.tasks.policy import shown_error

    with pytest.raises(ValidationError) as caught:
        DeidProfile(pseudonym_prefix="lower", name="bad name!")
    shown = shown_error("share", caught.value)
    assert isinstance(shown, SafeMessageError)
    assert str(shown) == ("pseudonym_prefix: 0-8 uppercase letters or digits; "
                          "name: 1-24 letters, digits, '_', '.', '-'")  # the fields' order
    with pytest.raises(ValidationError) as one:
        DeidProfile(pseudonym_prefix="lower")
    assert type(shown_error("share", one.value)) is DeidError  # a single one: itself


def test_a_validation_error_holding_tag_values_is_withheld():
    """pydantic's own text shows the input (and a dict key, which may be an identifier)."""
    from pydantic import ValidationError

    from prefect_orthanc.orthanc_client.models import Resource
    from prefect_orthanc.tasks.policy import shown_error

    patient_id, patient_name = _real_values()
    with pytest.raises(ValidationError) as caught:
        Resource.model_validate({"ID": "a", "Type": "Study",
                                 "MainDicomTags": {patient_id: [patient_name]}})
    assert patient_name in str(caught.value) and patient_id in str(caught.value)
    shown = shown_error("inspect", caught.value)
    assert str(shown) == "inspect failed with ValidationError; details withheld (may hold PHI)"


def test_causes_chained_to_a_safe_error_are_dropped():
    import traceback

    from prefect_orthanc.tasks.policy import shown_error

    patient_id, _ = _real_values()
    try:
        try:
            {}[patient_id]
        except KeyError as missing:
            raise DeidError("the source study has neither PatientID nor StudyInstanceUID") \
                from missing
    except DeidError as error:
        shown = shown_error("deidentify", error)
    text = "".join(traceback.format_exception(shown))
    assert shown.__cause__ is None and shown.__context__ is None
    assert patient_id not in text and "neither PatientID" in text


def test_the_withheld_error_is_itself_safe_for_an_enclosing_run():
    """A flow that calls a task which failed shows the task's TaskFailure as it is."""
    from prefect_orthanc.tasks.policy import shown_error

    inner = shown_error("reads_tag", ValueError("invalid literal for int(): 'id00001'"))
    assert isinstance(inner, TaskFailure) and isinstance(inner, SafeMessageError)
    assert shown_error("the-flow", inner) is inner
    again = pickle.loads(pickle.dumps(inner))
    assert str(again) == str(inner) == ("reads_tag failed with ValueError; details withheld "
                                        "(may hold PHI)")
