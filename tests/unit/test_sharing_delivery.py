"""Deliveries that cannot lose a study: package names never overwritten, atomic directory
writes, a ledger keyed by content version and fsynced per delivery, one manifest entry per
study saying which package supersedes which."""

from __future__ import annotations

import json
import os
import threading

import pytest

from prefect_orthanc.flows.deid import DeidProfile
from prefect_orthanc.flows.sharing import DeliveryError, Destination, SharedStudy, content_version
from prefect_orthanc.flows.sharing.delivery import publish
from prefect_orthanc.flows.sharing.ledger import Ledger
from prefect_orthanc.flows.sharing.manifest import update_manifest

IDS = [f"{i:08x}-00000000-00000000-00000000-00000000" for i in range(3)]
SOURCE = "aaaaaaaa-bbbbbbbb-cccccccc-dddddddd-eeeeeeee"


def test_content_version_is_the_instance_set():
    assert content_version(IDS) == content_version(list(reversed(IDS)))
    assert content_version(IDS).startswith("3-")
    assert content_version(IDS[:2]) != content_version(IDS)  # a study that grew
    assert content_version([*IDS[:2], IDS[0][:-1] + "1"]) != content_version(IDS)


def test_publish_never_overwrites_and_leaves_no_partial(tmp_path):
    staged = tmp_path / "staging" / "a.zip"
    staged.parent.mkdir()
    staged.write_bytes(b"first")
    final = publish(staged, tmp_path / "out" / "share-P-S-v1.zip")
    assert final.read_bytes() == b"first"
    staged.write_bytes(b"second")
    with pytest.raises(DeliveryError, match="nothing overwritten"):
        publish(staged, final)
    assert final.read_bytes() == b"first"
    assert sorted(p.name for p in final.parent.iterdir()) == ["share-P-S-v1.zip"]


def test_publish_races_one_winner(tmp_path):
    """Two writers of one name at once: one package, one DeliveryError, no partial file."""
    staged = [tmp_path / f"{i}.zip" for i in range(2)]
    for i, path in enumerate(staged):
        path.write_bytes(bytes([i]) * 1_000_000)
    final = tmp_path / "out" / "share-P-S-v1.zip"
    results: list[object] = []
    barrier = threading.Barrier(2)

    def write(path):
        barrier.wait()
        try:
            results.append(publish(path, final))
        except DeliveryError as error:
            results.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, DeliveryError) for r in results) == 1
    assert final.read_bytes() in (staged[0].read_bytes(), staged[1].read_bytes())
    assert os.listdir(final.parent) == [final.name]


def _shared(version: str, n: int, file: str, supersedes=()) -> SharedStudy:
    return SharedStudy(source_id=SOURCE, outcome="delivered", content_version=version,
                       pseudo_patient="PSEUDOPAT", pseudo_study="PSEUDOSTUDY", version=n,
                       file=file, supersedes=tuple(supersedes), instances_out=n,
                       sha256=f"{n:064x}", delivered="directory:/out",
                       pseudonym_from="PatientID")


def test_ledger_keys_on_content_version(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    key = Ledger.study(SOURCE, Destination(target="/out"), DeidProfile())
    other = Ledger.study(SOURCE, Destination(target="/elsewhere"), DeidProfile())
    assert key != other
    assert not ledger.delivered(key, "2-aaaa") and ledger.history(key) == []
    ledger.record(key, _shared("2-aaaa", 1, "/out/share-v1.zip"))
    assert ledger.delivered(key, "2-aaaa")
    assert not ledger.delivered(key, "3-bbbb")  # the study grew: to be shared again
    assert not ledger.delivered(other, "2-aaaa")
    ledger.record(key, _shared("3-bbbb", 2, "/out/share-v2.zip"))
    assert [e["version"] for e in ledger.history(key)] == [1, 2]
    assert [e["file"] for e in ledger.history(key)] == ["share-v1.zip", "share-v2.zip"]


def test_manifest_one_entry_per_study_newest_supersedes(tmp_path):
    profile = DeidProfile()
    update_manifest(tmp_path, profile, _shared("2-a", 1, "share-P-S-v1.zip"))
    update_manifest(tmp_path, profile, _shared("3-b", 2, "share-P-S-v2.zip",
                                                ["share-P-S-v1.zip"]))
    other = _shared("1-c", 1, "share-P-T-v1.zip").model_copy(update={"pseudo_study": "T"})
    update_manifest(tmp_path, profile, other)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entries = {e["study"]: e for e in manifest["studies"]}
    assert len(manifest["studies"]) == 2
    assert entries["PSEUDOSTUDY"]["file"] == "share-P-S-v2.zip"
    assert entries["PSEUDOSTUDY"]["version"] == 2
    assert entries["PSEUDOSTUDY"]["supersedes"] == ["share-P-S-v1.zip"]
    assert entries["T"]["supersedes"] == []
    assert SOURCE not in json.dumps(manifest)  # no source ID in what is shared
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_linkage_rows_keep_the_table_header(tmp_path):
    from prefect_orthanc.flows.sharing.linkage import append_linkage

    path = tmp_path / "linkage.csv"
    append_linkage(path, {"source_patient_id": "A", "patient_id": "P1", "package": "v1.zip"})
    append_linkage(path, {"source_patient_id": "B", "patient_id": "P2", "package": "v2.zip"})
    assert path.read_text().splitlines() == ["source_patient_id,patient_id,package",
                                             "A,P1,v1.zip", "B,P2,v2.zip"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    older = tmp_path / "older.csv"  # a table written by an earlier release: other columns
    older.write_text("source_patient_id,patient_id,anonymized_at\nA,P1,2026-01-01\n")
    append_linkage(older, {"source_patient_id": "B", "patient_id": "P2", "package": "x"})
    assert older.read_text().splitlines()[-1] == "B,P2,"


def test_study_locks_are_bounded_stripes_without_the_study_id():
    from prefect_orthanc.tasks.limits import STUDY_LOCKS, study_lock_name

    ids = [f"{i:08x}-11111111-22222222-33333333-44444444" for i in range(20000)]
    names = {study_lock_name(i) for i in ids}
    assert len(names) == STUDY_LOCKS  # every stripe used, no more
    assert study_lock_name(ids[0]) == study_lock_name(ids[0])  # stable
    assert all(i[:8] not in study_lock_name(i) for i in ids)


def test_ledger_skips_a_line_torn_by_a_crash_and_the_next_append_cuts_it(tmp_path):
    """A crash mid-append leaves a last line without its newline: never complete, so never
    acted on. Reading skips it; the next append cuts it off instead of running into it."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    key = Ledger.study(SOURCE, Destination(target="/out"), DeidProfile())
    ledger.record(key, _shared("2-aaaa", 1, "/out/share-v1.zip"))
    whole = ledger.path.read_bytes()
    with ledger.path.open("ab") as handle:
        handle.write(b'{"study": "' + key.encode() + b'", "content_vers')
    assert [e["version"] for e in ledger.history(key)] == [1]
    assert not ledger.delivered(key, "3-bbbb")
    ledger.record(key, _shared("3-bbbb", 2, "/out/share-v2.zip"))
    assert ledger.path.read_bytes().startswith(whole)
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["study"] == key for x in lines)
    assert ledger.delivered(key, "3-bbbb")


def test_linkage_row_appended_once_per_package_and_destination(tmp_path):
    from prefect_orthanc.flows.sharing.linkage import append_linkage

    path = tmp_path / "linkage.csv"
    row = {"patient_id": "P", "source_orthanc_id": SOURCE, "package": "share-P-S-v1.zip",
           "delivered_to": "directory:/out", "delivered_at": "t1"}
    assert append_linkage(path, row)
    # the run crashed after this row and before its ledger record: the re-run's row is not
    # appended again (another time, same package and destination)
    assert not append_linkage(path, {**row, "delivered_at": "t2"})
    assert append_linkage(path, {**row, "delivered_to": "modality:partner"})
    with path.open("ab") as handle:  # a row torn by a crash
        handle.write(b"P," + SOURCE.encode() + b",share-P-S-v2.z")
    assert append_linkage(path, {**row, "package": "share-P-S-v2.zip"})
    import csv
    rows = list(csv.DictReader(path.open()))
    assert [(r["package"], r["delivered_to"]) for r in rows] == [
        ("share-P-S-v1.zip", "directory:/out"), ("share-P-S-v1.zip", "modality:partner"),
        ("share-P-S-v2.zip", "directory:/out")]


def test_a_package_depends_only_on_its_files(tmp_path):
    """The same files, written at other times and given in another order, make the same
    package bytes: sorted, dated ZIP_EPOCH, no temporary left."""
    import os
    import zipfile

    from prefect_orthanc.flows.sharing.files import ZIP_EPOCH, package_files, sha256_of

    made = {}
    for run, (stamp, order) in enumerate([(1_700_000_000, (0, 1)), (1_800_000_000, (1, 0))]):
        folder = tmp_path / f"work{run}"
        folder.mkdir()
        files = [("PSEUDO/CT/IM1.dcm", b"a" * 900), ("PSEUDO/CT/IM2.dcm", b"b" * 5000)]
        members = {}
        for index in order:
            name, data = files[index]
            path = folder / f"{index}.dcm"
            path.write_bytes(data)
            os.utime(path, (stamp, stamp))
            members[name] = path
        made[run] = package_files(members, tmp_path / f"{run}.zip")
    assert made[0] == made[1] and made[0][1] == sha256_of(tmp_path / "0.zip")
    with zipfile.ZipFile(tmp_path / "0.zip") as package:
        assert package.namelist() == ["PSEUDO/CT/IM1.dcm", "PSEUDO/CT/IM2.dcm"]
        assert {i.date_time for i in package.infolist()} == {ZIP_EPOCH}
        assert package.read("PSEUDO/CT/IM2.dcm") == b"b" * 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.zip", "1.zip", "work0",
                                                          "work1"]  # no temporary left


def test_package_members_are_deflated_at_package_level(tmp_path):
    """Each member is deflated at ``PACKAGE_LEVEL`` (a hand-made ZipInfo opened with
    ``ZipFile.open`` got zlib's default level 6 instead): its compressed bytes are zlib's
    at that level, on a real file's bytes (pydicom's CT_small.dcm)."""
    import zipfile
    import zlib
    from pathlib import Path

    from pydicom.data import get_testdata_file

    from prefect_orthanc.flows.sharing.files import PACKAGE_LEVEL, package_files

    source = Path(str(get_testdata_file("CT_small.dcm")))
    data = source.read_bytes()
    package_files({"SERIES001/IM00001.dcm": source}, tmp_path / "p.zip")
    levels = {}
    for level in (PACKAGE_LEVEL, 6):
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
        levels[level] = deflate.compress(data) + deflate.flush()
    assert levels[PACKAGE_LEVEL] != levels[6]  # the file tells the levels apart
    with zipfile.ZipFile(tmp_path / "p.zip") as package:
        (info,) = package.infolist()
        assert info.compress_type == zipfile.ZIP_DEFLATED
        with (tmp_path / "p.zip").open("rb") as raw:
            raw.seek(info.header_offset + 26)
            skip = int.from_bytes(raw.read(2), "little") + int.from_bytes(raw.read(2), "little")
            raw.seek(skip, 1)
            assert raw.read(info.compress_size) == levels[PACKAGE_LEVEL]
        assert package.read(info) == data


def test_publish_recognises_its_own_package_and_removes_a_crashed_partial(tmp_path):
    """A run killed after publishing, before recording: the re-run finds the final name
    with the package's checksum and takes it as the delivery (nothing written). A partial
    file a killed writer left is removed; one a live writer holds (flock) is not."""
    import fcntl
    import hashlib

    staged = tmp_path / "a.zip"
    staged.write_bytes(b"package")
    out = tmp_path / "out"
    out.mkdir()
    crashed = out / ".share-P-S-v1.zip.0123.partial"
    crashed.write_bytes(b"pack")
    live = out / ".share-P-S-v1.zip.4567.partial"
    with live.open("wb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        final = publish(staged, out / "share-P-S-v1.zip", hashlib.sha256(b"package").hexdigest())
        assert live.exists() and not crashed.exists()
    live.unlink()
    before = final.stat()
    again = publish(staged, final, hashlib.sha256(b"package").hexdigest())
    assert again == final and final.stat().st_ino == before.st_ino
    with pytest.raises(DeliveryError, match="other content"):
        publish(staged, final, hashlib.sha256(b"other").hexdigest())
    assert os.listdir(out) == [final.name]
