"""tasks.origin: which stable studies are new. The in-flight records are Prefect Variables;
here a dict stands in for the Variable store so the age rule is tested without a server (the
real Variables are exercised on the lab: tests/integration/test_membership.py)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

import pytest

import prefect_orthanc.tasks.origin as origin
from prefect_orthanc.tasks.origin import retrieval_variable, study_origin

UID = "1.2.826.0.1.3680043.8.498.1"


class _Variables:
    store: ClassVar[dict[str, object]] = {}

    @classmethod
    def get(cls, name, default=None):
        return cls.store.get(name, default)


@pytest.fixture
def variables(monkeypatch):
    _Variables.store = {}
    monkeypatch.setattr(origin, "Variable", _Variables)
    return _Variables.store


def _since(hours: float) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)).isoformat()


def test_marked_study_is_retrieved(variables):
    assert study_origin({"PrefectOrthancSource": "pacs"}, UID) == "retrieved"


def test_copies_are_known_by_orthancs_own_metadata(variables):
    assert study_origin({"AnonymizedFrom": "8a8cf898-ca27c490"}, UID) == "copy"
    assert study_origin({"ModifiedFrom": "8a8cf898-ca27c490"}, UID) == "copy"


def test_copies_this_package_uploaded_are_copies(variables):
    """The sharing flow rewrites instances outside Orthanc and uploads them: no AnonymizedFrom,
    so it marks the new study itself (tasks.origin.mark_copy)."""
    assert study_origin({"PrefectOrthancSource": "copy:deidentified"}, UID) == "copy"


def test_in_flight_retrieval_counts_until_it_is_stale(variables):
    assert study_origin({"LastUpdate": "20261129T152630"}, UID) == "received"
    variables[retrieval_variable(UID)] = {"modality": "pacs", "since": _since(0.01)}
    assert study_origin({}, UID) == "retrieved"
    variables[retrieval_variable(UID)] = {"modality": "pacs", "since": _since(7)}
    assert study_origin({}, UID) == "received"  # a crashed run's leftover
    variables[retrieval_variable(UID)] = "garbage"
    assert study_origin({}, UID) == "received"
    assert study_origin({}, None) == "received"


def test_variable_name_is_a_hash_not_the_uid():
    name = retrieval_variable(UID)
    assert UID not in name
    assert name == retrieval_variable(UID) and name != retrieval_variable(UID + "1")
