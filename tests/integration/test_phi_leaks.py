"""No patient identifier, accession number or password reaches Prefect: not its database
(runs, task runs, states, logs, events, artifacts), not its result storage, not the console.

The same scan runs again when the session ends (``session_checks``, wired in conftest.py), over
every flow and task run the session's other tests made on the same Prefect test server.
"""

from __future__ import annotations

import pytest
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from prefect_orthanc.tasks import TaskFailure, orthanc_task, query_modality, retrieve_study

pytestmark = pytest.mark.usefixtures("prefect_server")


@orthanc_task(name="leaky_by_accident")
def leaky_by_accident(patient_id: str) -> None:
    """A task whose code raises with a DICOM value in the message, as careless code does."""
    raise KeyError(f"no study for patient {patient_id}")


def test_no_identifier_or_secret_anywhere(lab, research_creds, loaded_pacs, cohort, capfd):
    patient = cohort.studies[0]
    secret = lab.research.password

    @flow(name="phi-scenario")
    def scenario() -> str:
        logger = get_run_logger()
        result = retrieve_study(research_creds, "pacs", patient.study_uid)
        logger.info("retrieved study key=%s outcome=%s", result.key, result.outcome.value)
        create_table_artifact(key="phi-scenario",
                              table=[{"key": result.key, "outcome": result.outcome.value,
                                      "instances": result.received_instances}])
        query_modality(research_creds, "pacs", "Study",
                       {"PatientID": patient.patient_id, "PatientName": patient.patient_name,
                        "AccessionNumber": patient.accession})
        leaky_by_accident(patient.patient_id)  # fails: the flow run fails with it
        return "unreachable"

    state = scenario(return_state=True)
    assert state.is_failed()
    with pytest.raises(TaskFailure) as caught:
        state.result()
    assert patient.patient_id not in str(caught.value)

    # a failing DICOM call with identifiers in the query: the error is clean too
    @flow(name="phi-scenario-dimse")
    def failing_query():
        return query_modality(research_creds, "no-such-pacs", "Study",
                              {"PatientID": patient.patient_id})

    assert failing_query(return_state=True).is_failed()

    from .conftest import DEID_SECRET
    from .session_checks import phi_hits

    needles = ({v for v in cohort.phi_values() if len(v) >= 4}
               | {secret, patient.study_uid, DEID_SECRET})
    out, err = capfd.readouterr()
    hits = phi_hits(needles, out + err)
    assert not hits, f"PHI or secret found in {len(hits)} places: {[h[0] for h in hits][:10]}"
