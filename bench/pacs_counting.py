"""Benchmark: what counting and settling cost per study, on each PACS kind of the lab.

For each study, alternating in one run: the *raw* path (study C-FIND, one C-MOVE job, wait for
it: what a collection that trusts C-MOVE does) against ``Orthanc.collect`` (the same plus
counting from study/series/IMAGE-level C-FINDs, the local count, and settling). Also times
``expected_instances`` alone (the counting part, also paid once more at planning).

    .venv/bin/python bench/pacs_counting.py --studies 8 --instances 20

Settling costs nothing when the study is complete at the end of the C-MOVE job; a study still
short waits ``Settle.quiet`` seconds of no growth (3 s by default) before being re-fetched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _raw_move(orthanc, modality: str, uid: str) -> None:
    found = orthanc.query(modality, "Study", {"StudyInstanceUID": uid})
    job = orthanc.retrieve(found.query_id, orthanc.system().dicom_aet, answer=0)
    orthanc.wait_for_job(job)
    orthanc.delete_query(found.query_id)


def _forget(orthanc, uid: str) -> None:
    orthanc.delete_many(orthanc.find("Study", {"StudyInstanceUID": uid}))


def _asynchronous(lab, research, cohort) -> dict:
    """An SCP that acknowledges the C-MOVE at once and sends the C-STOREs afterwards (the
    suite's pynetdicom helper; needs the test extra). ``collect_s`` includes the rest of the
    transfer after the C-MOVE job ended, waited for instead of re-fetched (``refetched`` 0,
    ``moves`` 1)."""
    try:
        from tests.integration.quirky_scp import QuirkySCP
    except ImportError:
        return {"skipped": "pynetdicom not installed (pip install -e .[test])"}
    from prefect_orthanc.orthanc_client import Settle

    study = cohort.studies[0]
    with QuirkySCP(study.files, {"RESEARCH": lab.research.dicom_port}, async_store=True,
                   store_interval=0.02) as scp:
        research.request("PUT", "/modalities/async", json={
            "AET": scp.aet, "Host": "127.0.0.1", "Port": scp.port}, expect="none")
        _forget(research, study.study_uid)
        start = time.perf_counter()
        result = research.retrieve_study("async", study.study_uid, settle=Settle())
        total = time.perf_counter() - start
        scp.wait_for_stores()
        _forget(research, study.study_uid)
    return {"outcome": result.outcome.value, "refetched": result.refetched_instances,
            "moves": scp.moves, "collect_s": round(total, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--instances", type=int, default=20, help="per study (2 series)")
    args = parser.parse_args()

    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.deployments.lab.synthetic import load_into, make_cohort
    from prefect_orthanc.orthanc_client import Orthanc

    results = {}
    with tempfile.TemporaryDirectory() as tmp, OrthancLab.start(dcmqrscp=True) as lab:
        cohort = make_cohort(Path(tmp) / "c", patients=args.studies, studies_per_patient=1,
                             series_per_study=2, instances_per_series=args.instances // 2,
                             seed=8)
        load_into(lab.pacs.url, cohort.files)
        lab.dcmqr.load(cohort.files)
        with Orthanc(url=lab.research.url, username=lab.research.username,
                     password=lab.research.password) as research:
            for kind, modality in (("orthanc", "pacs"), ("dcmqrscp", "dcmqr")):
                raw, full, counting, again = [], [], [], []
                _raw_move(research, modality, cohort.studies[0].study_uid)  # warm up
                _forget(research, cohort.studies[0].study_uid)
                for study in cohort.studies:
                    uid = study.study_uid
                    start = time.perf_counter()
                    _raw_move(research, modality, uid)
                    raw.append(time.perf_counter() - start)
                    _forget(research, uid)
                    start = time.perf_counter()
                    result = research.retrieve_study(modality, uid)
                    full.append(time.perf_counter() - start)
                    assert result.outcome.value == "complete", result
                    start = time.perf_counter()
                    research.retrieve_study(modality, uid)  # a re-run: counts, moves nothing
                    again.append(time.perf_counter() - start)
                    answers = research.query(modality, "Study", {
                        "StudyInstanceUID": uid, "NumberOfStudyRelatedInstances": ""}).answers
                    start = time.perf_counter()
                    count = research.expected_instances(modality, uid, [a.tags for a in answers])
                    counting.append(time.perf_counter() - start)
                    _forget(research, uid)
                results[kind] = {
                    "count_source": count.source.value if count else None,
                    "raw_move_s": round(statistics.median(raw), 3),
                    "collect_s": round(statistics.median(full), 3),
                    "extra_per_study_s": round(statistics.median(full) - statistics.median(raw),
                                               3),
                    "counting_alone_s": round(statistics.median(counting), 3),
                    "rerun_complete_study_s": round(statistics.median(again), 3),
                }
            results["async_scp"] = _asynchronous(lab, research, cohort)
    print(json.dumps({"studies": args.studies, "instances_per_study": args.instances,
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
