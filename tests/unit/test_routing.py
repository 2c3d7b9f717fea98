"""Routing rules: validated as configuration, matched on study facts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prefect_orthanc.flows.routing import RouteRule, StudyFacts

FACTS = StudyFacts(study_id="s", last_update="20261123T105659", instances=3,
                   modalities=("CT", "SR"), calling_aet="SCANNER1")


@pytest.mark.parametrize("rule,expected", [
    (RouteRule(name="all", action="label", labels=["new"]), True),
    (RouteRule(name="ct", modalities=["ct"], action="label", labels=["ct"]), True),
    (RouteRule(name="mr", modalities=["MR"], action="label", labels=["mr"]), False),
    (RouteRule(name="aet", calling_aets=["SCANNER1"], action="forward", target="pacs"), True),
    (RouteRule(name="aet2", calling_aets=["OTHER"], modalities=["CT"], action="forward",
               target="pacs"), False),
])
def test_rules_match_on_modalities_and_sender(rule, expected):
    assert rule.matches(FACTS) is expected


@pytest.mark.parametrize("fields,message", [
    ({"name": "x", "action": "label"}, "needs labels"),
    ({"name": "x", "action": "forward"}, "needs target"),
    ({"name": "x", "action": "share"}, "needs share"),
    ({"name": "x y", "action": "label", "labels": ["a"]}, "name"),
    ({"name": "x", "action": "label", "labels": ["a,b"]}, "labels are"),
])
def test_incomplete_rules_are_refused(fields, message):
    with pytest.raises(ValidationError) as caught:
        RouteRule(**fields)
    assert message in str(caught.value)


def test_share_rule_reuses_the_sharing_options():
    rule = RouteRule(name="share", action="share",
                     share={"destination": {"kind": "directory", "target": "out"}})
    assert rule.share is not None and rule.share.destination.target == "out"


def test_facts_repr_hides_tag_values():
    assert "SCANNER1" not in repr(FACTS) and "CT" not in repr(FACTS)
