"""What a user reads on the Prefect server when a run fails: a ``SafeMessageError`` keeps its
message wherever it is raised (a task, a flow, a subflow, a mapped task, a pydantic validator
inside a task); anything else is withheld, its type only, and the causes chained to a safe
error never reach the run's logs.

The unsafe messages are real ones: a tag value read from a DICOM file of pydicom's test
corpus, an httpx error whose URL carries a patient ID in its query string (from the real
research Orthanc).
"""

from __future__ import annotations

import asyncio

import httpx
import pydicom
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from pydicom.data import get_testdata_file

from prefect_orthanc.flows.deid import DeidError, DeidProfile
from prefect_orthanc.flows.planning import CohortTooBroad
from prefect_orthanc.tasks import orthanc_task
from prefect_orthanc.tasks.policy import orthanc_flow

pytestmark = pytest.mark.usefixtures("prefect_server")

REAL_FILE = "rtplan.dcm"  # PatientID 'id00001', PatientName 'Last^First^mid^pre'
SAFE = "the source study has neither PatientID nor StudyInstanceUID"
BROAD = "the PACS returned its cap of 2 answers for a single day: narrow the criteria"
WITHHELD = "details withheld (may hold PHI)"


def _patient_id() -> str:
    return str(pydicom.dcmread(str(get_testdata_file(REAL_FILE))).PatientID)


def _seen(flow_fn) -> tuple[str, list[str], str]:
    """Run ``flow_fn``; return what the server shows: the flow run's state message, its task
    runs' state messages (subflows included), and all of its logs as one text."""
    state = flow_fn(return_state=True)
    assert state.is_failed()
    flow_run_id = state.state_details.flow_run_id
    APILogHandler().flush()  # logs are shipped in batches: send what is queued, and wait

    async def read() -> tuple[str, list[str], str]:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return (run.state.message or "" if run.state else "",
                [t.state.message if t.state and t.state.message else "" for t in tasks],
                "\n".join(log.message for log in logs))

    return asyncio.run(read())


# ------------------------------------------------------------------ safe: the message shows


@orthanc_task(name="raises_deid", retries=0)
def raises_deid(index: int = 0) -> None:
    raise DeidError(SAFE)


@orthanc_task(name="raises_broad", retries=0)
def raises_broad(index: int = 0) -> None:
    raise CohortTooBroad(BROAD)


def test_safe_error_in_a_task():
    @orthanc_flow(name="safe-in-task")
    def run() -> None:
        raises_deid()

    flow_message, task_messages, _ = _seen(run)
    assert flow_message.endswith(f"DeidError: {SAFE}")
    assert task_messages == [f"Task run encountered an exception DeidError: {SAFE}"]


def test_safe_error_in_a_flow():
    @orthanc_flow(name="safe-in-flow")
    def run() -> None:
        raise CohortTooBroad(BROAD)

    flow_message, _, _ = _seen(run)
    assert flow_message == f"Flow run encountered an exception: CohortTooBroad: {BROAD}"


def test_safe_error_in_a_subflow():
    @orthanc_flow(name="safe-child")
    def child() -> None:
        raise DeidError(SAFE)

    @orthanc_flow(name="safe-parent")
    def parent() -> None:
        child()

    flow_message, task_messages, _ = _seen(parent)
    assert flow_message == f"Flow run encountered an exception: DeidError: {SAFE}"
    assert task_messages == [f"Flow run encountered an exception: DeidError: {SAFE}"]


def test_safe_error_in_a_mapped_task():
    @orthanc_flow(name="safe-mapped")
    def run() -> None:
        raises_broad.map([1, 2]).result()

    flow_message, task_messages, _ = _seen(run)
    assert flow_message.endswith(f"CohortTooBroad: {BROAD}")
    assert task_messages == [f"Task run encountered an exception CohortTooBroad: {BROAD}"] * 2


@orthanc_task(name="checks_profile", retries=0)
def checks_profile(prefix: str) -> None:
    DeidProfile(pseudonym_prefix=prefix)  # pydantic wraps the validator's DeidError


def test_safe_error_from_a_validator_inside_a_task():
    @orthanc_flow(name="safe-validator")
    def run() -> None:
        checks_profile("lower-case")

    flow_message, task_messages, _ = _seen(run)
    expected = "DeidError: pseudonym_prefix: 0-8 uppercase letters or digits"
    assert flow_message.endswith(expected) and task_messages[0].endswith(expected)
    assert "lower-case" not in flow_message + task_messages[0]  # the input is not shown


@orthanc_task(name="safe_after_phi", retries=0)
def safe_after_phi() -> None:
    by_id: dict[str, int] = {}
    try:
        by_id[_patient_id()] += 1  # KeyError holding a real PatientID
    except KeyError:
        raise DeidError(SAFE)  # noqa: B904 - the point: chained implicitly, as careless code does


def test_causes_chained_to_a_safe_error_stay_out_of_the_logs():
    @orthanc_flow(name="safe-chained")
    def run() -> None:
        safe_after_phi()

    flow_message, _, logs = _seen(run)
    assert flow_message.endswith(f"DeidError: {SAFE}")
    assert "Traceback" in logs and "DeidError" in logs  # the traceback is there...
    assert _patient_id() not in logs  # ...without the KeyError it was raised from
    assert "During handling" not in logs


# ------------------------------------------------------------------ unsafe: withheld


@orthanc_task(name="reads_tag", retries=0)
def reads_tag(index: int = 0) -> int:
    return int(pydicom.dcmread(str(get_testdata_file(REAL_FILE))).PatientID)  # ValueError: '<id>'


def _assert_withheld(flow_message: str, task_messages: list[str], logs: str) -> None:
    shown = "\n".join([flow_message, *task_messages, logs])
    assert _patient_id() not in shown
    assert WITHHELD in flow_message


def test_unsafe_error_in_a_task_is_withheld():
    with pytest.raises(ValueError, match=_patient_id()):
        reads_tag.fn.__wrapped__()  # the real message holds the PatientID (without the policy)

    @orthanc_flow(name="unsafe-in-task")
    def run() -> None:
        reads_tag()

    flow_message, task_messages, logs = _seen(run)
    _assert_withheld(flow_message, task_messages, logs)
    assert task_messages == [f"Task run encountered an exception TaskFailure: reads_tag failed "
                             f"with ValueError; {WITHHELD}"]


def test_unsafe_error_in_a_mapped_task_is_withheld():
    @orthanc_flow(name="unsafe-mapped")
    def run() -> None:
        reads_tag.map([1, 2]).result()

    flow_message, task_messages, logs = _seen(run)
    _assert_withheld(flow_message, task_messages, logs)
    assert len(task_messages) == 2 and all(WITHHELD in m for m in task_messages)


def test_unsafe_error_in_a_flow_and_its_subflow_is_withheld(lab):
    """An httpx error from the real research Orthanc, whose URL holds a patient ID."""
    patient_id = _patient_id()
    with httpx.Client(base_url=lab.research.url, auth=lab.research.auth) as client:
        answer = client.get("/no-such-route", params={"PatientID": patient_id})
    with pytest.raises(httpx.HTTPStatusError, match=patient_id):
        answer.raise_for_status()  # the real message

    @orthanc_flow(name="unsafe-child")
    def child() -> None:
        answer.raise_for_status()

    @orthanc_flow(name="unsafe-parent")
    def parent() -> None:
        child()

    flow_message, task_messages, logs = _seen(parent)
    _assert_withheld(flow_message, task_messages, logs)
    # the child's TaskFailure is itself PHI-free: the parent shows it as it is
    assert flow_message == ("Flow run encountered an exception: TaskFailure: unsafe-child "
                            f"failed with HTTPStatusError; {WITHHELD}")


def test_missing_credentials_block_named_with_how_to_create_it(tmp_path):
    """Found by a tester: a misspelt credentials_block ended "ValueError; details withheld".
    A block name is not PHI: the run's state names it and how to create one."""
    from prefect_orthanc.flows.collection import collect_cohort

    cohort = tmp_path / "c.csv"
    cohort.write_text("accession_number\nA-SECRET-1\n")
    message, _, logs = _seen(lambda **kw: collect_cohort(
        cohort_file=str(cohort), report_dir=str(tmp_path), credentials_block="nosuchblock",
        dry_run=True, **kw))
    assert "no OrthancCredentials block named 'nosuchblock'" in message
    assert "python -m prefect_orthanc.deployments setup" in message
    assert ".save('nosuchblock')" in message
    assert WITHHELD not in message and "A-SECRET-1" not in message + logs
