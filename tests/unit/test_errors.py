"""Translation of Orthanc's answers into typed errors, redaction, and pickling."""

from __future__ import annotations

import base64
import pickle

import httpx
import pytest

from prefect_orthanc.orthanc_client import (
    OrthancArchiveError,
    OrthancBadRequest,
    OrthancDimseError,
    OrthancError,
    OrthancHTTPError,
    OrthancJobFailed,
    OrthancJobLost,
    OrthancJobTimeout,
    OrthancNotFound,
    OrthancUnauthorized,
    OrthancUnavailable,
    OrthancUnsupported,
    OrthancUsageError,
)
from prefect_orthanc.orthanc_client.errors import (
    AssociationRejected,
    MoveDestinationUnknown,
    MoveRefused,
    PacsUnreachable,
    QueryRefused,
    dimse_status,
    pacs_error,
    redact,
)
from tests.unit._mocks import BASE, orthanc_error

STUDY = "6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715"


# ------------------------------------------------------------------ status -> error type


@pytest.mark.parametrize("status,cls", [(400, OrthancBadRequest), (415, OrthancBadRequest),
                                        (401, OrthancUnauthorized), (403, OrthancUnauthorized),
                                        (404, OrthancNotFound)])
def test_http_status_maps_to_error_type(router, orthanc, status, cls):
    route = router.get(f"/studies/{STUDY}").mock(
        return_value=orthanc_error(status, 8 if status == 400 else None, "Bad request"))
    with pytest.raises(cls) as info:
        orthanc.resource("Study", STUDY)
    error = info.value
    assert error.status_code == status
    assert error.method == "GET"
    assert error.route == "/studies/{id}"
    assert not error.transient
    assert route.call_count == 1  # 4xx is never retried
    if cls is OrthancUnauthorized:
        assert "ORTHANC_USERNAME" in str(error)


def test_not_found_with_orthanc_body(router, orthanc):
    router.get(f"/studies/{STUDY}").mock(
        return_value=orthanc_error(404, 17, "Unknown resource"))
    with pytest.raises(OrthancNotFound) as info:
        orthanc.resource("Study", STUDY)
    error = info.value
    assert error.orthanc_status == 17
    assert error.orthanc_error == "Unknown resource"
    assert "HTTP 404" in str(error) and "Unknown resource" in str(error)


def test_not_found_with_empty_body_as_orthanc_1_10_sends(router, orthanc):
    router.get(f"/series/{STUDY}").mock(return_value=httpx.Response(404, content=b""))
    with pytest.raises(OrthancNotFound) as info:
        orthanc.resource("Series", STUDY)
    error = info.value
    assert error.orthanc_status is None and error.orthanc_error is None
    assert error.details is None
    assert error.route == "/series/{id}"
    assert str(error) == "GET /series/{id} failed: HTTP 404 (Not Found)"


def test_non_json_error_body(router, orthanc):
    router.get("/statistics").mock(return_value=httpx.Response(400, text="<html>nope</html>"))
    with pytest.raises(OrthancBadRequest) as info:
        orthanc.statistics()
    assert info.value.orthanc_status is None and info.value.details is None


def test_server_error_keeps_orthanc_fields(router, orthanc):
    router.get("/statistics").mock(return_value=orthanc_error(
        500, 1, "Internal error", "SQLite: database is locked"))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.statistics()
    error = info.value
    assert type(error) is OrthancHTTPError
    assert (error.status_code, error.orthanc_status, error.orthanc_error) == (
        500, 1, "Internal error")
    assert error.details == "SQLite: database is locked"
    assert error.route == "/statistics"
    assert not error.transient


def test_success_with_non_json_body_is_an_error(router, orthanc):
    router.get("/statistics").mock(return_value=httpx.Response(200, text="not json"))
    with pytest.raises(OrthancHTTPError, match="not JSON"):
        orthanc.statistics()


def test_unknown_modality_says_so(router, orthanc):
    router.post("/modalities/nowhere/echo").mock(return_value=orthanc_error(404, 17))
    with pytest.raises(OrthancNotFound, match="no modality of that name"):
        orthanc.echo("nowhere")


# ------------------------------------------------------------------ DICOM routes


@pytest.mark.parametrize("status,orthanc_status,details,expected_dimse", [
    (422, None, None, None),
    (500, 9, "DicomAssociation - C-FIND SCU to AET \"PACS\": Error in the network protocol",
     None),
    (500, 16, None, None),
    (500, 2000, None, None),
    (500, 2004, None, None),
    (500, 1, "C-FIND SCU has failed with DIMSE status 0xa801", "0xA801"),
])
def test_dicom_route_failures_are_dimse_errors(router, orthanc, status, orthanc_status, details,
                                               expected_dimse):
    route = router.post("/modalities/pacs/query").mock(
        return_value=orthanc_error(status, orthanc_status, "Error", details))
    with pytest.raises(OrthancDimseError) as info:
        orthanc.query("pacs", "Study", {"PatientID": "P-0042"})
    error = info.value
    assert error.dimse_status == expected_dimse
    assert error.route == "/modalities/{name}/query"
    assert error.status_code == status
    if expected_dimse:
        assert expected_dimse in str(error)
        assert not error.transient  # the peer's considered answer
        assert route.call_count == 1
    elif status != 422:
        # no DIMSE status: the peer was not reached, which may pass later. One layer retries
        # it: the Prefect task (longer delays), not the request as well (no multiplying)
        assert error.transient and error.retry_later
        assert route.call_count == 1


def test_dimse_status_on_queries_route(router, orthanc):
    router.post("/queries/q1/retrieve").mock(return_value=orthanc_error(
        500, 9, "Error in the network protocol",
        "C-MOVE SCU to AET \"PACS\" has failed with DIMSE status 0xA702"))
    with pytest.raises(OrthancDimseError) as info:
        orthanc.retrieve("q1", "RESEARCH")
    assert info.value.dimse_status == "0xA702"
    assert info.value.route == "/queries/{id}/retrieve"


def test_status_9_outside_dicom_routes_is_plain_http_error(router, orthanc):
    router.get("/statistics").mock(return_value=orthanc_error(500, 9, "Network protocol"))
    with pytest.raises(OrthancHTTPError) as info:
        orthanc.statistics()
    assert type(info.value) is OrthancHTTPError


def test_not_found_on_dicom_route_stays_not_found(router, orthanc):
    router.post("/modalities/pacs/query").mock(return_value=orthanc_error(404, 17))
    with pytest.raises(OrthancNotFound) as info:
        orthanc.query("pacs", "Study", {})
    assert not isinstance(info.value, OrthancDimseError)


# ------------------------------------------------------------------ transport failures


def test_connection_refused_is_unavailable(router, make_client):
    route = router.get("/system").mock(side_effect=httpx.ConnectError("refused"))
    client = make_client(retries=2)
    with pytest.raises(OrthancUnavailable) as info:
        client.system()
    error = info.value
    assert error.transient and not error.outcome_unknown
    assert "refused" in error.reason
    assert BASE in str(error)
    assert route.call_count == 3


def test_read_timeout_on_safe_get_is_retried(router, make_client):
    route = router.get("/statistics").mock(side_effect=httpx.ReadTimeout("slow"))
    client = make_client(retries=2)
    with pytest.raises(OrthancUnavailable) as info:
        client.statistics()
    assert route.call_count == 3
    assert info.value.reason == "timed out"
    assert info.value.outcome_unknown is False


def test_read_timeout_on_safe_get_then_success(router, orthanc):
    route = router.get("/statistics").mock(
        side_effect=[httpx.ReadTimeout("slow"), httpx.Response(200, json={"CountStudies": 3})])
    assert orthanc.statistics() == {"CountStudies": 3}
    assert route.call_count == 2


def _start_work(client, name):
    return {
        "retrieve": lambda: client.retrieve("q1", "RESEARCH"),
        "anonymize": lambda: client.anonymize("Study", STUDY),
        "upload": lambda: client.upload(b"DICM"),
        "move": lambda: client.move("pacs", "Study", [{"StudyInstanceUID": "1.2.3"}], "RES"),
        "store": lambda: client.store("pacs", [STUDY]),
        "resubmit": lambda: client.resubmit_job("j1"),
        "archive_job": lambda: client.archive_job([STUDY]),
    }[name]


@pytest.mark.parametrize("name,method,path", [
    ("retrieve", "POST", "/queries/q1/retrieve"),
    ("anonymize", "POST", f"/studies/{STUDY}/anonymize"),
    ("upload", "POST", "/instances"),
    ("move", "POST", "/modalities/pacs/move"),
    ("store", "POST", "/modalities/pacs/store"),
    ("resubmit", "POST", "/jobs/j1/resubmit"),
    ("archive_job", "POST", "/tools/create-archive"),
])
def test_read_timeout_on_work_starting_post_is_not_retried(router, orthanc, name, method, path):
    route = router.route(method=method, path=path).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(OrthancUnavailable) as info:
        _start_work(orthanc, name)()
    assert route.call_count == 1
    assert len(router.calls) == 1
    assert info.value.outcome_unknown is True
    assert "not retried" in str(info.value)


def test_connect_error_on_post_is_not_outcome_unknown(router, orthanc):
    route = router.post("/modalities/pacs/store").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(OrthancUnavailable) as info:
        orthanc.store("pacs", [STUDY])
    assert info.value.outcome_unknown is False  # nothing was sent
    assert route.call_count == 1


# ------------------------------------------------------------------ redaction


PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-7734521"
PASSWORD = "s3cr3t-pw"


def _leaks(error: BaseException) -> list[str]:
    token = base64.b64encode(f"robot:{PASSWORD}".encode()).decode()
    texts = [str(error), repr(error), error.args[0] if error.args else "",
             pickle.dumps(error).decode("latin-1"), repr(error.__dict__)]
    secrets = [PATIENT_NAME, "DOE", "JANE", PATIENT_ID, "7734521", PASSWORD, token,
               "Authorization", "Basic "]
    return [s for s in secrets if any(s in text for text in texts)]


def test_http_error_redacts_query_string_details_and_credentials(router, make_client):
    router.get("/tools/lookup").mock(return_value=orthanc_error(
        400, 8, "Bad request",
        f"Cannot parse PatientName={PATIENT_NAME} for patient \"{PATIENT_ID}\"",
        uri=f"/tools/lookup?PatientName={PATIENT_NAME}"))
    client = make_client(username="robot", password=PASSWORD)
    with pytest.raises(OrthancBadRequest) as info:
        client.request("GET", f"/tools/lookup?PatientName={PATIENT_NAME}&PatientID={PATIENT_ID}",
                       params={"PatientName": PATIENT_NAME})
    error = info.value
    assert router.calls.last.request.url.params["PatientName"] == PATIENT_NAME  # it was sent
    assert error.route == "/tools/lookup"
    assert _leaks(error) == []
    assert error.details is not None and "Cannot parse" in error.details


def test_templated_route_and_redacted_details(router, make_client):
    router.get(f"/studies/{STUDY}/shared-tags").mock(return_value=orthanc_error(
        500, 1, "Internal error",
        f"Bad value for tag PatientID: {PATIENT_ID}, name '{PATIENT_NAME}'"))
    client = make_client(username="robot", password=PASSWORD, retries=0)
    with pytest.raises(OrthancHTTPError) as info:
        client.tags("Study", STUDY, shared=True)
    error = info.value
    assert error.route == "/studies/{id}/shared-tags"
    assert STUDY not in str(error)
    assert _leaks(error) == []


def test_transport_error_redacts(router, make_client):
    router.get("/tools/lookup").mock(side_effect=httpx.ReadTimeout("timed out reading"))
    client = make_client(username="robot", password=PASSWORD, retries=0)
    with pytest.raises(OrthancUnavailable) as info:
        client.request("GET", "/tools/lookup", params={"PatientName": PATIENT_NAME},
                       safe=True)
    assert info.value.route == "/tools/lookup"
    assert _leaks(info.value) == []
    assert info.value.__cause__ is None  # the httpx error (with its URL) is not chained


def test_redact_helper():
    assert redact(None) is None and redact("") is None
    text = redact(f"Unknown patient \"{PATIENT_ID}\" with 'x' and value: {PATIENT_NAME} "
                  f"and 1234567890")
    assert PATIENT_ID not in text and PATIENT_NAME not in text and "1234567890" not in text
    assert "Unknown patient" in text
    assert len(redact("a" * 1000)) == 200
    assert dimse_status("status 0xa801 from peer") == "0xA801"
    assert dimse_status("no status here") is None


# ------------------------------------------------------------------ pickling


ALL_ERRORS = [
    OrthancError("plain"),
    OrthancHTTPError("GET /x failed", method="GET", route="/x", status_code=500,
                     orthanc_status=1, orthanc_error="Internal error", details="d"),
    OrthancBadRequest("bad", method="POST", route="/tools/find", status_code=400,
                      orthanc_status=8, orthanc_error="Bad request", details=None),
    OrthancUnauthorized("no", method="GET", route="/system", status_code=401,
                        orthanc_status=None, orthanc_error=None, details=None),
    OrthancNotFound("gone", method="GET", route="/studies/{id}", status_code=404,
                    orthanc_status=17, orthanc_error="Unknown resource", details=None),
    OrthancUnavailable("down", method="GET", route="/system", reason="timed out",
                       outcome_unknown=False),
    OrthancDimseError("dimse", method="POST", route="/modalities/{name}/move", status_code=500,
                      orthanc_status=9, orthanc_error="x", details=None, dimse_status="0xA801"),
    OrthancJobFailed("failed", job_id="j", job_type="Archive", error_code=1,
                     error_description="x", error_details=None),
    OrthancJobLost("lost", job_id="j"),
    OrthancJobTimeout("slow", job_id="j", timeout=1.0, state="Running", progress=50),
    OrthancUnsupported("old", feature="labels", server_version="1.10.1",
                       required_version="1.12.0"),
    OrthancArchiveError("short", size=3, expected=10),
    OrthancUsageError("wrong call"),
]


@pytest.mark.parametrize("error", ALL_ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_to_equal_errors(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert again == error
    assert again.__dict__ == error.__dict__
    assert str(again) == str(error)
    assert again.args == error.args
    assert again.transient == error.transient


def test_translated_errors_pickle_with_their_fields(router, orthanc):
    router.post("/modalities/pacs/move").mock(return_value=orthanc_error(
        500, 9, "Error in the network protocol", "C-MOVE failed: DIMSE status 0xA801"))
    router.get(f"/studies/{STUDY}").mock(return_value=httpx.Response(404))
    router.post("/instances").mock(side_effect=httpx.ReadTimeout("slow"))
    caught = []
    for call in (lambda: orthanc.move("pacs", "Study", [{"StudyInstanceUID": "1"}], "R"),
                 lambda: orthanc.resource("Study", STUDY),
                 lambda: orthanc.upload(b"DICM")):
        with pytest.raises(OrthancError) as info:
            call()
        caught.append(info.value)
    assert [type(e) for e in caught] == [MoveDestinationUnknown, OrthancNotFound,
                                         OrthancUnavailable]
    for error in caught:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and again == error
        assert again.transient == error.transient
    assert caught[0].dimse_status == "0xA801"
    assert caught[2].outcome_unknown is True


def test_equality_is_by_type_and_fields():
    a = OrthancJobLost("lost", job_id="a")
    assert a != OrthancJobLost("lost", job_id="b")
    assert a != OrthancJobTimeout("lost", job_id="a")
    assert isinstance(OrthancUsageError("x"), ValueError)


def test_call_repr_shows_no_values():
    from prefect_orthanc.orthanc_client.core import Call

    call = Call("POST", f"/studies/{STUDY}/anonymize", "/studies/{id}/anonymize",
                params={"PatientName": PATIENT_NAME}, json={"Replace": {"PatientID": PATIENT_ID}})
    assert repr(call) == "Call(POST /studies/{id}/anonymize)"


# ------------------------------------------------------------------ what the PACS said
# Details as Orthanc 1.10.1 wrote them (measured against dcmqrscp 3.6.7 and an Orthanc PACS).
_DOWN = ("DicomAssociation - connecting to AET \"PACS\": TCP Initialization Error: "
         "Connection refused")
_REJECTED = "DicomAssociation - connecting to AET \"NOPE\": DUL Association Rejected"


@pytest.mark.parametrize("details,cls,transient,hint", [
    (_DOWN, PacsUnreachable, True, "did not answer at the host and port"),
    (_REJECTED, AssociationRejected, True, "is the PACS's own AET"),
    ("C-FIND SCU has failed with DIMSE status 0xC000", QueryRefused, False, "0xC000"),
    ("C-FIND SCU has failed with DIMSE status 0xA900", QueryRefused, False, "0xA900"),
])
def test_failed_query_says_what_to_fix(router, orthanc, details, cls, transient, hint):
    route = router.post("/modalities/pacs/query").mock(
        return_value=orthanc_error(500, 9, "Error in the network protocol", details))
    with pytest.raises(cls, match=hint) as info:
        orthanc.query("pacs", "Study", {"PatientID": "P-0042"})
    error = info.value
    assert isinstance(error, OrthancDimseError) and error.transient is transient
    # one layer retries each failure: the request a rejected association (a moment's
    # refusal), the Prefect task an unreachable PACS (it takes longer to come back)
    repeated_here = cls is AssociationRejected
    assert route.call_count == (orthanc.settings.retries + 1 if repeated_here else 1)
    assert not transient or error.retry_later is not repeated_here
    assert "PACS" not in (error.details or "") and "NOPE" not in str(error)  # AETs redacted
    again = pickle.loads(pickle.dumps(error))
    assert again == error and type(again) is cls


def test_rejected_association_is_not_retried_again_by_the_task():
    """A wrong called AET is refused every time: the request retries it briefly, Prefect not."""
    from prefect_orthanc.tasks.policy import is_transient

    class State:
        def __init__(self, data):
            self.data = data

    rejected = pacs_error(_REJECTED, operation="C-FIND")
    down = pacs_error(_DOWN, operation="C-FIND")
    assert not is_transient(None, None, State(rejected))
    assert is_transient(None, None, State(down))


@pytest.mark.parametrize("details,cls,code", [
    ("C-MOVE SCU to AET \"RESEARCH\" has failed with DIMSE status 0xA801",
     MoveDestinationUnknown, "move_destination_unknown"),
    ("C-MOVE SCU to AET \"RESEARCH\" has failed with DIMSE status 0xC000 (unable to process "
     "- resource not found ?)", MoveRefused, "move_refused"),
    (_REJECTED, AssociationRejected, "association_rejected"),
    (_DOWN, PacsUnreachable, "pacs_unreachable"),
])
def test_move_job_failures_are_classified(details, cls, code):
    error = pacs_error(redact(details), operation="C-MOVE", job_id="job-1")
    assert type(error) is cls and error.reason_code == code and error.job_id == "job-1"
    assert "register research's AET" in str(error) or cls in (AssociationRejected,
                                                                PacsUnreachable)


def test_unrecognised_details_stay_generic():
    assert pacs_error("something else entirely", operation="C-FIND") is None
    assert pacs_error(None, operation="C-MOVE") is None
    assert pacs_error("DIMSE status 0xFE00", operation="C-FIND") is None  # cancelled: capped


def test_store_job_network_failure_is_transient():
    """A forward destination down: the C-STORE job fails with Orthanc error 9 and no DIMSE
    status; sending again is harmless, so the task may retry it."""
    from prefect_orthanc.orthanc_client.errors import store_failure

    down = OrthancJobFailed("job j failed", job_id="j", job_type="DicomModalityStore",
                            error_code=9, error_description="Error in the network protocol",
                            error_details=None)
    assert store_failure(down).transient
    refused = OrthancJobFailed("job j failed", job_id="j", job_type="DicomModalityStore",
                               error_code=9, error_description="x",
                               error_details="C-STORE SCU has failed with DIMSE status 0xC000")
    from prefect_orthanc.orthanc_client.errors import StoreRefused

    assert type(store_failure(refused)) is StoreRefused and not store_failure(refused).transient
    other = OrthancJobFailed("job j failed", job_id="j", job_type="x", error_code=1,
                             error_description="x", error_details=None)
    assert not store_failure(other).transient


def test_not_found_on_system_hints_at_the_url(router, orthanc):
    """Found by a tester: ORTHANC_URL pointing at another web server gave a bare 404."""
    router.get("/system").mock(return_value=httpx.Response(404, text="<html>Not Found</html>"))
    with pytest.raises(OrthancNotFound) as caught:
        orthanc.system()
    assert str(caught.value) == ("GET /system failed: HTTP 404 (Not Found): no Orthanc REST API "
                                 "at this URL: check its host, port and path prefix (a reverse "
                                 "proxy's, e.g. https://host/orthanc)")
