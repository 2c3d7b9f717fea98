"""The de-identified package is what is stored in Orthanc (one ``POST /instances`` of the ZIP,
``flows.sharing.deidentify.store_package``), on the real lab with pydicom's test files: Orthanc
1.10.1 answers only for the members it stored and skips the others without an error, so a
member it did not store must be a finding that keeps the study from being delivered."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from prefect_orthanc.flows.deid import Rewriter
from prefect_orthanc.flows.sharing import Destination, deidentify, share_studies
from prefect_orthanc.flows.sharing.deidentify import store_package
from prefect_orthanc.flows.sharing.files import package_files
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Level, Orthanc
from prefect_orthanc.tasks.origin import study_origin

pytestmark = pytest.mark.usefixtures("prefect_server")


def _copies(name: str, n: int) -> list[bytes]:
    """``n`` instances of one new study made from a pydicom test file (a real header)."""
    study, series = generate_uid(), generate_uid()
    path = get_testdata_file(name)
    assert isinstance(path, str)
    files = []
    for index in range(n):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


@pytest.mark.parametrize("whole", [True, False], ids=["one-request", "member-by-member"])
def test_a_member_orthanc_skips_is_a_finding_and_the_copy_is_marked(
        research: Orthanc, tmp_path: Path, monkeypatch, whole: bool):
    """The package stored whole (Orthanc skips the unreadable member) or, when larger than
    ``STORE_WHOLE_BYTES``, member by member (Orthanc refuses it): the same finding."""
    if not whole:
        monkeypatch.setattr(deidentify, "STORE_WHOLE_BYTES", 0)
    good = _copies("MR_small.dcm", 2)
    members = {}
    for index, data in enumerate([*good, good[0][:600]]):  # the last one cut short
        path = tmp_path / f"{index}.dcm"
        path.write_bytes(data)
        members[f"SERIES001/IM{index + 1:05d}.dcm"] = path
    package = tmp_path / "package.zip"
    package_files(members, package)
    parents, findings = store_package(research, package, len(members))
    try:
        (study,) = parents
        assert findings == ["Orthanc stored 2 of the package's 3 instances"]
        assert len(research.instances(Level.STUDY, study)) == 2
        # marked as this package's copy as soon as it is stored: never a new clinical study
        assert study_origin(research.all_metadata(Level.STUDY, study), None) == "copy"
        again, findings = store_package(research, package, len(members))
        assert again == parents
        assert findings == ["Orthanc stored 2 of the package's 3 instances",
                            "instances of the package not stored as new: 2 AlreadyStored"]
    finally:
        for study in parents:
            research.delete(Level.STUDY, study, missing_ok=True)


def test_a_study_orthanc_stored_in_part_is_quarantined_not_delivered(
        research_env, secret_env, research: Orthanc, tmp_path: Path, monkeypatch):
    """One rewritten instance comes out unreadable (cut short): Orthanc skips it in the
    package, the study is quarantined with that finding, nothing is delivered."""
    stored = {r.parent_study for data in _copies("CT_small.dcm", 3)
              for r in research.upload(data)}
    (source,) = stored
    assert source is not None
    before = set(research.find("Study"))
    to_bytes = Rewriter.to_bytes
    made: list[int] = []

    def one_cut_short(ds: pydicom.Dataset) -> bytes:
        data = to_bytes(ds)
        made.append(1)
        return data[:600] if len(made) == 2 else data

    monkeypatch.setattr(Rewriter, "to_bytes", staticmethod(one_cut_short))
    out = tmp_path / "out"
    try:
        state = share_studies(study_ids=[source],
                              destination=Destination(kind="directory", target=str(out)),
                              linkage_path=str(tmp_path / "private" / "linkage.csv"),
                              staging_dir=str(tmp_path / "staging"),
                              ledger_path=str(tmp_path / "private" / "ledger.jsonl"),
                              return_state=True)
        assert state.is_failed() and "1 quarantined" in str(state.message)
        (outcome,) = report_of(state)
        assert outcome.outcome == "quarantined"
        assert "Orthanc stored 2 of the package's 3 instances" in outcome.findings
        assert not list(out.rglob("*.zip"))
        assert len(list((tmp_path / "staging" / "quarantine").glob("*.zip"))) == 1
        assert not (tmp_path / "private" / "linkage.csv").exists()
        assert set(research.find("Study")) == before  # its copy removed, quarantined or not
    finally:  # the run removed its anonymized copy itself (keep_anonymized is false)
        research.delete(Level.STUDY, source, missing_ok=True)
