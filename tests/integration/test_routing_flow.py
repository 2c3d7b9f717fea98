"""The new-study flow's actions on the lab: label, forward (C-STORE to the pacs), share
(de-identified, to a directory); idempotent per LastUpdate; a failing rule fails the run
without stopping the others or marking the study routed."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from prefect_orthanc.flows.routing import (
    LABELS_METADATA,
    ROUTED_METADATA,
    RouteRule,
    route_new_study,
)
from prefect_orthanc.flows.sharing import SECRET_ENV, Destination, SharingOptions
from prefect_orthanc.flows.states import report_of
from prefect_orthanc.orthanc_client import Level

from .conftest import DEID_SECRET

pytestmark = pytest.mark.usefixtures("prefect_server")
_seeds = itertools.count(4242)


@pytest.fixture
def new_study(research, tmp_path: Path) -> str:
    """A study that exists only in research (stored over REST), as if a scanner sent it."""
    from prefect_orthanc.deployments.lab.synthetic import make_cohort, zip_bytes

    cohort = make_cohort(tmp_path / "new", patients=1, studies_per_patient=1,
                         series_per_study=2, instances_per_series=2, seed=next(_seeds),
                         modalities=("CT",))
    stored = research.upload(zip_bytes(cohort.files))
    return next(item.parent_study for item in stored if item.parent_study)


def _share(tmp_path: Path) -> SharingOptions:
    return SharingOptions(destination=Destination(kind="directory", target=str(tmp_path / "out")),
                          linkage_path=str(tmp_path / "private" / "linkage.csv"),
                          staging_dir=str(tmp_path / "staging"),
                          ledger_path=str(tmp_path / "ledger.jsonl"))


def test_rules_label_forward_and_share_once(research_env, monkeypatch, research, pacs,
                                            new_study, tmp_path):
    monkeypatch.setenv(SECRET_ENV, DEID_SECRET)
    assert not pacs.exists(Level.STUDY, new_study)
    rules = [RouteRule(name="tag", action="label", labels=["new", "ct"]),
             RouteRule(name="mr-only", modalities=["MR"], action="label", labels=["mr"]),
             RouteRule(name="to-pacs", modalities=["CT"], action="forward", target="pacs"),
             RouteRule(name="share", action="share", share=_share(tmp_path))]
    state = route_new_study(new_study, rules=rules, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report.matched == ("tag", "to-pacs", "share") and report.failed == ()

    assert research.metadata(Level.STUDY, new_study, LABELS_METADATA) == "ct,new"
    assert pacs.exists(Level.STUDY, new_study)  # same DICOM UIDs, same Orthanc ID
    assert pacs.statistics_of(Level.STUDY, new_study).count_instances == 4
    assert len(list((tmp_path / "out").glob("*.zip"))) == 1
    last_update = research.resource(Level.STUDY, new_study).last_update
    assert research.metadata(Level.STUDY, new_study, ROUTED_METADATA) == last_update

    again = route_new_study(new_study, rules=rules, return_state=True)
    assert again.is_completed() and again.result().skipped
    assert "already routed" in again.message
    assert len(list((tmp_path / "out").glob("*.zip"))) == 1


def test_a_failing_rule_fails_the_run_but_not_the_others(research_env, research, new_study):
    rules = [RouteRule(name="nowhere", action="forward", target="no-such-modality"),
             RouteRule(name="tag", action="label", labels=["seen"])]
    state = route_new_study(new_study, rules=rules, return_state=True)
    assert state.is_failed()
    report = report_of(state)
    assert report.failed == ("nowhere",) and report.done == ("tag",)
    assert research.metadata(Level.STUDY, new_study, LABELS_METADATA) == "seen"
    assert research.metadata(Level.STUDY, new_study, ROUTED_METADATA) is None
    assert "no-such-modality" not in (state.message or "")


def test_a_deleted_study_is_nothing_to_do(research_env):
    state = route_new_study("0" * 8 + "-" + "-".join(["1" * 8] * 4), rules=[], return_state=True)
    assert state.is_completed() and "no longer in Orthanc" in state.message


def test_a_forward_to_a_partner_down_is_routed_by_a_later_sweep(research_env, research,
                                                                new_study, tmp_path):
    """The partner is down for a while: the forward's task retries are exhausted and the run
    fails; once the partner is back, the sweep routes the study, once."""
    from prefect_orthanc.deployments.lab.dcmqrscp import Dcmqrscp
    from prefect_orthanc.deployments.lab.servers import free_ports
    from prefect_orthanc.flows.routing import sweep_failed_routes

    port = free_ports(1)[0]
    research.request("PUT", "/modalities/partner-later",
                     json={"AET": "LATER", "Host": "127.0.0.1", "Port": port}, expect="none")
    import asyncio

    from prefect_orthanc.tasks.limits import ensure_limits

    asyncio.run(ensure_limits({"partner-later": 1}))
    rules = [RouteRule(name="to-partner", action="forward", target="partner-later")]
    state = route_new_study(new_study, rules=rules, return_state=True)
    assert state.is_failed()
    assert research.metadata(Level.STUDY, new_study, ROUTED_METADATA) is None

    with Dcmqrscp.start(tmp_path / "partner", {}, aet="LATER", port=port):
        sweep = sweep_failed_routes(lookback_hours=1, return_state=True)
        report = report_of(sweep)
        assert report.routed >= 1
        last_update = research.resource(Level.STUDY, new_study).last_update
        assert research.metadata(Level.STUDY, new_study, ROUTED_METADATA) == last_update
        found = research.query("partner-later", "Study", {"StudyInstanceUID": "",
                                                          "PatientID": ""})
        assert len(found.answers) == 1
        # once each: the study's latest run now succeeded, a second sweep leaves it alone
        again = sweep_failed_routes(lookback_hours=1, return_state=True)
        assert research.metadata(Level.STUDY, new_study, ROUTED_METADATA) == last_update
        assert len(research.query("partner-later", "Study", {"StudyInstanceUID": ""}).answers) == 1
        assert report_of(again).routed <= report.routed - 1

    async def runs_of_study() -> int:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowFilter

        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name={"any_": ["route-new-study"]}), limit=200)
        return sum(run.parameters.get("study_id") == new_study for run in runs)

    assert asyncio.run(runs_of_study()) == 2  # the failed run, and the sweep's: once each
