"""Side by side: this project's de-identification vs the anchors, on the same real corpus.

Corpus: the pydicom wheel's shipped test files and the ``deid-data`` package (as in
``tests/integration/test_deid_corpus.py``). Tools, each run twice:

* ``project``: ``deidentify_study`` (Orthanc Basic Profile + pydicom rewrite + scan; risky
  content held back, findings quarantined) on a lab Orthanc;
* ``orthanc``: Orthanc 1.10.1's plain ``POST /studies/{id}/anonymize``;
* ``dicognito``: ``dicognito.anonymizer.Anonymizer()`` per file (if installed);
* ``deid``: pydicom/deid's default recipe, ``replace_identifiers(..., DeidRecipe())`` (if
  installed).

Measured with the corpus test's independent checker (``source_secrets``), per tool: instances
out; output instances still holding a source name or ID, and source UIDs; DA/DT values kept
(a source date), shifted (another date), blanked; share of instance UIDs remapped; pseudonym
consistency across the two runs (same PatientID out for the same instance); seconds per study.

    .venv/bin/pip install -e '.[bench]'      # dicognito, deid (bench only)
    .venv/bin/python bench/deid_anchors.py    # prints a Markdown table, writes bench/results/
"""

from __future__ import annotations

import io
import json
import logging
import sys
import tempfile
import time
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import quiet_prefect

quiet_prefect()
warnings.simplefilter("ignore")
logging.disable(logging.WARNING)

SECRET = "bench-secret-0123456789abcdef"


def _strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [s for v in value for s in _strings(v)]
    return [str(value)]


def measure(outputs, sources) -> dict[str, int]:
    """Counts for one study's outputs against its sources."""
    import re

    from pydicom.uid import UID_dictionary

    from tests.integration.test_deid_corpus import source_secrets

    texts, uids, dates = source_secrets(sources)
    counts: defaultdict[str, int] = defaultdict(int)
    for out in outputs:
        counts["instances"] += 1
        leaked_text = leaked_uid = False
        for elem in out.iterall():
            try:
                vr, value = elem.VR, elem.value
            except Exception:
                continue
            if vr == "SQ" or elem.tag in (0x7FE00010, 0x54001010):
                continue
            values = [v.strip(" \x00") for v in _strings(value)]
            if vr in ("DA", "DT"):
                for v in values:
                    kind = "blanked" if not v else "kept" if v[:8] in dates else "shifted"
                    counts[f"dates {kind}"] += 1
                continue
            if vr == "UI":
                for v in values:
                    if v and v not in UID_dictionary:
                        counts["uids"] += 1
                        if v in uids:
                            counts["uids kept"] += 1
                            leaked_uid = True
                continue
            for v in values:
                folded = v.casefold()
                if folded and any(re.search(r"(?<![^\W_])" + re.escape(t) + r"(?![^\W_])",
                                            folded) for t in texts):
                    leaked_text = True
        counts["instances with a source name/ID"] += leaked_text
        counts["instances with a source UID"] += leaked_uid
    return counts


def corpus():
    """{study key: [paths]} of the corpus files pydicom can read (the rest is skipped)."""
    import pydicom

    from tests.integration.test_deid_corpus import corpus_files

    studies = defaultdict(list)
    for path in corpus_files():
        if path.suffix == ".zip":
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "SOPInstanceUID" in ds and "StudyInstanceUID" in ds:
            studies[(str(ds.get("PatientID", "")), str(ds.StudyInstanceUID))].append(path)
    return studies


def run_files(tool: str, studies) -> tuple[dict, dict, float]:
    """A per-file tool: ({study: [outputs]}, {(study, index): PatientID}, seconds)."""
    import pydicom

    outputs, ids = {}, {}
    started = time.perf_counter()
    if tool == "dicognito":
        from dicognito.anonymizer import Anonymizer

        anonymizer = Anonymizer()
    else:
        from deid.config import DeidRecipe
        from deid.dicom import get_identifiers, replace_identifiers

        recipe = DeidRecipe()
    for key, paths in studies.items():
        done = []
        for path in paths:
            try:
                if tool == "dicognito":
                    ds = pydicom.dcmread(path)
                    anonymizer.anonymize(ds)
                else:
                    ds = replace_identifiers(dicom_files=[str(path)], deid=recipe,
                                             ids=get_identifiers([str(path)]), save=False)[0]
            except Exception:
                continue
            done.append(ds)
        outputs[key] = done
        for index, ds in enumerate(done):
            ids[(key, index)] = str(ds.get("PatientID", ""))
    return outputs, ids, time.perf_counter() - started


def run_orthanc(tool: str, research, creds, stored) -> tuple[dict, dict, float]:
    """``project`` or ``orthanc`` on the studies stored in the lab."""
    import pydicom

    from prefect_orthanc.flows.deid import DeidProfile
    from prefect_orthanc.flows.sharing import Destination, SharingRequest, deidentify_study

    outputs, ids = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        request = SharingRequest(study_ids=["x"], destination=Destination(target=tmp),
                                 linkage_path=f"{tmp}/linkage.csv", staging_dir=f"{tmp}/s",
                                 ledger_path=f"{tmp}/l.jsonl", profile=DeidProfile())
        started = time.perf_counter()
        for study in stored:
            if tool == "project":
                outcome = deidentify_study.fn(creds, study, request, SECRET.encode())
                new_id, zip_path = outcome.anonymized_id, outcome.file
                if not outcome.verified:  # held back or quarantined: nothing delivered
                    zip_path = ""
            else:
                new_id = research.anonymize("Study", study, asynchronous=False).id
                zip_path = research.download_resource_archive("Study", new_id,
                                                     Path(tmp) / f"{study}.zip").path
            done = []
            if zip_path:
                with zipfile.ZipFile(zip_path) as archive:
                    done = [pydicom.dcmread(io.BytesIO(archive.read(n)))
                            for n in sorted(archive.namelist()) if not n.endswith("/")]
            if new_id:
                research.delete("Study", new_id, missing_ok=True)
            done.sort(key=lambda ds: int(ds.get("InstanceNumber") or 0))
            outputs[study] = done
            for index, ds in enumerate(done):
                ids[(study, index)] = str(ds.get("PatientID", ""))
        return outputs, ids, time.perf_counter() - started


def main() -> int:
    import pydicom

    from prefect_orthanc.deployments.lab.servers import OrthancLab
    from prefect_orthanc.orthanc_client import Orthanc
    from prefect_orthanc.tasks import OrthancCredentials

    studies = corpus()
    sources = {key: [pydicom.dcmread(p, force=True) for p in paths]
               for key, paths in studies.items()}
    rows = {}
    for tool in ("dicognito", "deid"):
        try:
            runs = [run_files(tool, studies) for _ in range(2)]
        except ImportError:
            print(f"{tool}: not installed (pip install -e '.[bench]')")
            continue
        rows[tool] = (runs, sources)
    with OrthancLab.start() as lab, \
             Orthanc(url=lab.research.url, username=lab.research.username,
                     password=lab.research.password) as research:
        creds = OrthancCredentials(url=lab.research.url, username=lab.research.username,
                                   password=lab.research.password)
        stored = defaultdict(list)
        for paths in studies.values():
            for path in paths:
                try:
                    (result,) = research.upload(path.read_bytes())
                except Exception:
                    continue
                stored[result.parent_study].append(result.id)
        orthanc_sources = {
            study: [pydicom.dcmread(io.BytesIO(research.instance_file(i)), force=True)
                    for i in ids] for study, ids in stored.items()}
        for tool in ("project", "orthanc"):
            runs = [run_orthanc(tool, research, creds, list(stored)) for _ in range(2)]
            rows[tool] = (runs, orthanc_sources)
    table = []
    for tool, (runs, srcs) in rows.items():
        (outputs, ids_a, seconds), (_, ids_b, seconds_b) = runs
        totals: defaultdict[str, int] = defaultdict(int)
        for key, outs in outputs.items():
            for name, value in measure(outs, srcs[key]).items():
                totals[name] += value
        same = sum(ids_a[k] == ids_b.get(k) and ids_a[k] != "" for k in ids_a)
        dates = totals["dates kept"] + totals["dates shifted"] + totals["dates blanked"]
        table.append({
            "tool": tool, "studies": len(outputs),
            "studies delivered": sum(bool(o) for o in outputs.values()),
            "instances out": totals["instances"],
            "instances with a source name/ID": totals["instances with a source name/ID"],
            "instances with a source UID": totals["instances with a source UID"],
            "dates shifted/blanked/kept": f"{totals['dates shifted']}/"
                                          f"{totals['dates blanked']}/{totals['dates kept']}"
                                          + (f" of {dates}" if dates else ""),
            "UIDs remapped": f"{1 - totals['uids kept'] / max(totals['uids'], 1):.1%}",
            "same pseudonym in both runs": f"{same}/{len(ids_a)}",
            "s per study": round(min(seconds, seconds_b) / max(len(outputs), 1), 4)})
    keys = list(table[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in table:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "deid_anchors.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
