"""No patient identifier, accession number or password reaches Prefect: not its database
(runs, task runs, states, logs, events, artifacts), not its result storage, not the console.

Named to run after the other integration tests of the session, so the scan also covers every
flow and task run they made on the same Prefect test server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from tasks import TaskFailure, orthanc_task, query_modality, retrieve_study

pytestmark = pytest.mark.usefixtures("prefect_server")


@orthanc_task(name="leaky_by_accident")
def leaky_by_accident(patient_id: str) -> None:
    """A task whose code raises with a DICOM value in the message, as careless code does."""
    raise KeyError(f"no study for patient {patient_id}")


def _prefect_files() -> list[Path]:
    import prefect.settings as settings

    db_url = settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    db = Path(db_url.split(":///", 1)[1]) if db_url and ":///" in db_url else None
    roots = [Path(settings.PREFECT_HOME.value())]
    if db is not None:
        roots.append(db.parent)
    files = [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]
    assert db is not None and db.exists(), "the test server's database was not found"
    return files


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

    needles = ({v for v in cohort.phi_values() if len(v) >= 4}
               | {secret, patient.study_uid, DEID_SECRET})
    out, err = capfd.readouterr()
    hits = []
    for path in _prefect_files():
        data = path.read_bytes()
        hits += [(str(path), n) for n in needles if n.encode() in data]
    hits += [("console", n) for n in needles if n in out or n in err]
    assert not hits, f"PHI or secret found in {len(hits)} places: {[h[0] for h in hits][:10]}"
