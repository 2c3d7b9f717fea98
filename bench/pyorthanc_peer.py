"""The peer: the script a Python user would write instead of this project, with PyOrthanc.

For each accession number of the cohort: a C-FIND at STUDY level through the research
Orthanc (``pyorthanc.Modality.find``, asking for the instance count), a synchronous C-MOVE of
its answers (``Modality.move`` with ``Synchronous: true``: Orthanc answers when the move is
done), then the same count check as the raw script (``/tools/find`` + study statistics):
the same work as ``bench._raw`` and the collection flow, at the same concurrency.

* ``threaded``: the studies on a ``ThreadPoolExecutor`` of ``concurrency`` threads sharing
  one client (PyOrthanc's ``Orthanc`` is an ``httpx.Client``);
* ``sequential``: one study after the other, one synchronous move at a time.

PyOrthanc (PyPI ``pyorthanc``) is a bench-only dependency: ``pip install -e '.[bench]'``.

    seconds = pyorthanc_collect(url, auth, accessions, concurrency=4)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["pyorthanc_collect"]


def pyorthanc_collect(url: str, auth: tuple[str, str] | None, accessions: list[str], *,
                      concurrency: int = 4, target: str = "RESEARCH",
                      modality: str = "pacs") -> float:
    """Seconds to find, move and count every accession's study with PyOrthanc,
    ``concurrency`` studies at a time (1: the sequential script)."""
    import pyorthanc

    username, password = auth or (None, None)
    # httpx's default 5 s timeout would cut a synchronous move short
    client = pyorthanc.Orthanc(url, username=username, password=password, timeout=600)
    pacs = pyorthanc.Modality(client, modality)

    def pull(accession: str) -> int:
        found = pacs.find({"Level": "Study", "Query": {
            "AccessionNumber": accession, "StudyInstanceUID": "",
            "NumberOfStudyRelatedInstances": ""}})
        answers = found["answers"]
        assert answers, f"accession {accession!r} not found"
        pacs.move(found["ID"], {"TargetAet": target, "Synchronous": True})
        received = 0
        for answer in answers:
            uid = answer["StudyInstanceUID"]
            expected = int(answer["NumberOfStudyRelatedInstances"])
            studies = client.post_tools_find({"Level": "Study",
                                              "Query": {"StudyInstanceUID": uid}})
            count = sum(client.get_studies_id_statistics(s)["CountInstances"]
                        for s in studies)
            assert count == expected, (count, expected)
            received += count
        return received

    started = time.perf_counter()
    try:
        if concurrency <= 1:
            for accession in accessions:
                pull(accession)
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(pull, accessions))
    finally:
        client.close()
    return time.perf_counter() - started
