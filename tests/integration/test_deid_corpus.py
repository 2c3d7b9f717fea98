"""De-identification on DICOM written by others: the pydicom wheel's test files (test_files and
charset_files, only those shipped in the wheel) and the ``deid-data`` package.

Every study the research Orthanc accepts goes through ``deidentify_study``. Each outcome is
judged by a checker written here, independent of ``flows/deid/scan.py``: a delivered study must
hold none of its source's names, IDs or non-standard UIDs, and every date in it must be a source
date moved by the study's own offset. A study not delivered must say why (a held-back reason or a
finding). Nothing may crash. The figures are printed (``-s``) and checked against the target:
>= 90 % of the studies that are not risky by class are delivered by the default profile.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID_dictionary

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.sharing import Destination, SharingRequest, deidentify_study

from .conftest import DEID_SECRET

#: Reasons that come from what an instance IS (not what it carries).
CLASS_REASONS = ("modality", "SOP class", "video", "photographic", "label or overview")


def corpus_files() -> list[Path]:
    import deid_data

    pydicom_data = Path(pydicom.__file__).parent / "data"
    files = [p for folder in ("test_files", "charset_files")
             for p in sorted((pydicom_data / folder).rglob("*")) if p.is_file()]
    files += sorted(p for p in (Path(deid_data.__file__).parent / "data").rglob("*")
                    if p.is_file() and p.suffix in (".dcm", ".zip"))
    return [p for p in files if p.suffix not in (".py", ".pyc", ".json", ".txt", ".md")]


# ------------------------------------------------------------------ the independent checker


def _walk(ds, path=""):
    """(path, tag, VR, raw value) of every element at every depth, file meta included."""
    yield from ds.iterall()
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from meta


def _strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [s for v in value for s in _strings(v)]
    return [str(value)]


_ID_KEYWORD = re.compile(r"(ID|IDs|Number|Numbers|Identifier)$")


def source_secrets(datasets) -> tuple[set[str], set[str], set[str]]:
    """(texts that must not appear, source UIDs, source dates YYYYMMDD)."""
    texts, uids, dates = set(), set(), set()
    for ds in datasets:
        for elem in _walk(ds):
            try:
                vr, value = elem.VR, elem.value
            except Exception:
                continue
            if vr == "SQ":
                continue
            keyword = elem.keyword or ""
            for text in _strings(value):
                text = text.strip(" \x00")
                if not text:
                    continue
                if vr == "UI" and ((text not in UID_dictionary and elem.tag.group != 2)
                                   or keyword == "MediaStorageSOPInstanceUID"):
                    uids.add(text)
                elif vr == "PN":
                    for group in text.split("="):
                        parts = [p.strip() for p in group.split("^") if p.strip()]
                        if parts:
                            texts.add(" ".join(parts).casefold())
                        texts.update(p.casefold() for p in parts if len(p) >= 4)
                elif vr in ("DA", "DT") and re.fullmatch(r"\d{8}", text[:8]):
                    dates.add(text[:8])
                elif (keyword in ("PatientID", "AccessionNumber", "OtherPatientIDs")
                      or (_ID_KEYWORD.search(keyword) and vr in ("LO", "SH"))) \
                        and len(text) >= 4 and not keyword.startswith(("Context", "Code")):
                    texts.add(text.casefold())
    return texts, uids, dates


def check_delivered(zip_path: Path, sources, *, blank_dates: bool = False) -> list[str]:
    """What is wrong with a delivered ZIP (empty: clean). ``blank_dates``: every date must be
    empty; else every date must be a source date moved by the study's offset."""
    problems = []
    texts, uids, dates = source_secrets(sources)
    src_study_dates = {str(s.get("StudyDate", ""))[:8] for s in sources} - {""}
    with zipfile.ZipFile(zip_path) as archive:
        outputs = [pydicom.dcmread(io.BytesIO(archive.read(n))) for n in archive.namelist()
                   if not n.endswith("/")]
        names = " ".join(archive.namelist()).casefold()
    for text in texts:
        if len(text) >= 4 and text in names:
            problems.append("identifier in a member name")
    offsets = set()
    for out in outputs:
        if out.get("StudyDate") and src_study_dates:
            moved = date(*map(int, (out.StudyDate[:4], out.StudyDate[4:6], out.StudyDate[6:8])))
            for source in src_study_dates:
                offsets.add((moved - date(int(source[:4]), int(source[4:6]),
                                          int(source[6:8]))).days)
    if 0 in offsets and not blank_dates:
        problems.append("StudyDate not moved")
    allowed = {(date(int(d[:4]), int(d[4:6]), int(d[6:8])) + timedelta(days=o)).strftime(
        "%Y%m%d") for d in dates for o in offsets if _valid(d)}
    for out in outputs:
        if out.get("PatientIdentityRemoved") != "YES":
            problems.append("PatientIdentityRemoved is not YES")
        for elem in _walk(out):
            try:
                vr, value = elem.VR, elem.value
            except Exception:
                problems.append("unreadable element")
                continue
            if vr == "SQ" or elem.tag in (0x7FE00010, 0x54001010):
                continue
            for text in _strings(value):
                text = text.strip(" \x00")
                if not text:
                    continue
                if vr == "UI":
                    if text in uids and elem.keyword != "MediaStorageSOPClassUID":
                        problems.append(f"source UID in {elem.keyword or 'private'}")
                    continue
                if vr in ("DA", "DT"):
                    day = text[:8]
                    if blank_dates:
                        problems.append(f"date left in {elem.keyword or 'private'}")
                        continue
                    if day in dates and day not in allowed:
                        problems.append(f"source date in {elem.keyword or 'private'}")
                    elif re.fullmatch(r"\d{8}", day) and allowed and day not in allowed:
                        problems.append(f"date not moved by the study offset in "
                                        f"{elem.keyword or 'private'}")
                    continue
                folded = text.casefold()
                for secret in texts:
                    if re.search(r"(?<![^\W_])" + re.escape(secret) + r"(?![^\W_])", folded):
                        problems.append(f"source identifier in {elem.keyword or 'private'}")
    return sorted(set(problems))


def _valid(day: str) -> bool:
    try:
        date(int(day[:4]), int(day[4:6]), int(day[6:8]))
    except ValueError:
        return False
    return 1 < int(day[:4]) < 9999


# ------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def corpus_studies(research):
    """The corpus stored in the research Orthanc: {study id: [instance ids]}; files Orthanc
    refuses are counted. Removed afterwards."""
    stored, refused = {}, 0
    before = set(research.find("Study"))
    for path in corpus_files():
        try:
            results = research.upload(path.read_bytes())
        except Exception:
            refused += 1
            continue
        for result in results:
            if result.parent_study and result.parent_study not in before:
                stored.setdefault(result.parent_study, set()).add(result.id)
    yield stored, refused, len(corpus_files())
    for study in set(research.find("Study")) - before:
        research.delete("Study", study, missing_ok=True)


PROFILES = {"default": DeidProfile(), "blank dates": DeidProfile(dates="blank"),
            "descriptions kept if clean": DeidProfile(descriptions="keep_if_clean")}


@pytest.mark.parametrize("profile_name", list(PROFILES))
def test_corpus_delivered_clean_or_held_back_with_a_reason(research, research_creds,
                                                           corpus_studies, tmp_path,
                                                           capsys, caplog, profile_name):
    profile = PROFILES[profile_name]
    stored, refused, files = corpus_studies
    request = SharingRequest(study_ids=list(stored), secret_block=None,
                             destination=Destination(kind="directory",
                                                     target=str(tmp_path / "out")),
                             linkage_path=str(tmp_path / "private" / "linkage.csv"),
                             staging_dir=str(tmp_path / "staging"),
                             ledger_path=str(tmp_path / "ledger.jsonl"),
                             profile=profile)
    secret = DEID_SECRET.encode()
    delivered, excluded, quarantined, class_risky = 0, Counter(), Counter(), 0
    instances = 0
    caplog.set_level("DEBUG")
    leaked: set[str] = set()
    failures = []
    for study_id, instance_ids in stored.items():
        sources = [pydicom.dcmread(io.BytesIO(research.instance_file(i)), force=True)
                   for i in instance_ids]
        instances += len(sources)
        caplog.clear()
        outcome = deidentify_study.fn(research_creds, study_id, request, secret)
        texts, uids, _ = source_secrets(sources)
        logged = " ".join(r.getMessage() for r in caplog.records).casefold()
        logged += " ".join(outcome.findings).casefold() + str(outcome.excluded_reasons)
        leaked.update(v for v in texts | uids if len(v) >= 6 and v.casefold() in logged)
        excluded.update(outcome.excluded_reasons)
        if outcome.excluded_reasons and outcome.excluded == outcome.instances_in and all(
                r.startswith(CLASS_REASONS) for r in outcome.excluded_reasons):
            class_risky += 1
        if outcome.verified:
            delivered += 1
            problems = check_delivered(Path(outcome.file), sources,
                                       blank_dates=profile.dates == "blank")
            if problems:
                failures.append((study_id[:8], problems))
        else:
            assert outcome.findings or outcome.excluded_reasons, "no reason given"
            for finding in outcome.findings:
                quarantined[re.sub(r"^member \d+: |\(\w{4},\w{4}\)|\[\d+\]|instance \d+: ",
                                   "", finding).split(":")[0][:60]] += 1
        if outcome.anonymized_id:
            research.delete("Study", outcome.anonymized_id, missing_ok=True)
    studies = len(stored)
    eligible = studies - class_risky
    with capsys.disabled():
        print(f"\nprofile {profile_name}")
        print(f"corpus: {files} files, {refused} refused by Orthanc, {instances} instances, "
              f"{studies} studies, {class_risky} risky by class, {delivered} delivered "
              f"({delivered}/{eligible} of the others)")
        print(f"held back (instances) by reason: {dict(excluded)}")
        print(f"not delivered, findings by kind: {dict(quarantined)}")
    assert not failures, failures
    assert not leaked, "a source value reached a log, a finding or a reason"
    if profile.descriptions == "drop":  # the target; kept descriptions may hold names
        assert delivered >= 0.9 * eligible, (delivered, eligible, dict(quarantined))


def test_the_checker_sees_an_untouched_study(tmp_path):
    """The checker is only worth its silence if it speaks: the sources themselves fail it."""
    pydicom_data = Path(pydicom.__file__).parent / "data" / "test_files"
    sources = [pydicom.dcmread(pydicom_data / name) for name in ("CT_small.dcm",)]
    path = tmp_path / "untouched.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(pydicom_data / "CT_small.dcm", "a.dcm")
    problems = " ".join(check_delivered(path, sources))
    assert "source UID" in problems and "source identifier" in problems
    assert "PatientIdentityRemoved" in problems and "StudyDate not moved" in problems
