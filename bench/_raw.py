"""The raw REST baseline shared by the benchmarks: the same retrieval work as the client's
``collect`` (C-FIND with the instance count, C-MOVE job, poll, count what arrived), done with
plain httpx calls and a thread pool, no project code."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def retrieve_one(http: httpx.Client, modality: str, target: str, study_uid: str) -> int:
    query = http.post(f"/modalities/{modality}/query", json={
        "Level": "Study", "Query": {"StudyInstanceUID": study_uid,
                                    "NumberOfStudyRelatedInstances": ""}}).json()
    answers = http.get(f"/queries/{query['ID']}/answers", params={"expand": "", "simplify": ""})
    expected = int(answers.json()[0]["NumberOfStudyRelatedInstances"])
    job = http.post(f"/queries/{query['ID']}/retrieve",
                    json={"TargetAet": target, "Synchronous": False}).json()["ID"]
    delay = 0.1
    while (state := http.get(f"/jobs/{job}").json()["State"]) not in ("Success", "Failure"):
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)
    assert state == "Success", state
    found = http.post("/tools/find", json={"Level": "Study",
                                           "Query": {"StudyInstanceUID": study_uid}}).json()
    received = sum(http.get(f"/studies/{i}/statistics").json()["CountInstances"] for i in found)
    assert received == expected, (received, expected)
    return received


def retrieve_all(url: str, auth: tuple[str, str] | None, modality: str, target: str,
                 study_uids: list[str], concurrency: int) -> float:
    """Seconds to retrieve and verify every study, ``concurrency`` at a time."""
    started = time.perf_counter()
    with httpx.Client(base_url=url, auth=auth, timeout=600) as http, \
            ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda uid: retrieve_one(http, modality, target, uid), study_uids))
    return time.perf_counter() - started


def clear(url: str, auth: tuple[str, str] | None) -> None:
    with httpx.Client(base_url=url, auth=auth, timeout=600) as http:
        ids = http.get("/studies").json()
        if ids:
            http.post("/tools/bulk-delete", json={"Resources": ids}).raise_for_status()
