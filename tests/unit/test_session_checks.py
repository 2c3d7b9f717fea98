"""The session check of the server log: a traceback from the server's own services fails the
session, except rare, known records of contention and of Prefect's own proactive-trigger race
(the record below is one, from a suite run of Prefect 3.9.1's server)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.session_checks import server_log_problems

BANNER = "View the API reference documentation at http://127.0.0.1:4200/docs\n"
#: one record of the race, from a suite run's server log (site-packages path shortened)
RACE = (Path(__file__).parent / "data" / "prefect-3.9.1-proactive-trigger-race.log").read_text()


def _log(tmp_path: Path, *records: str) -> Path:
    path = tmp_path / "server.log"
    path.write_text(BANNER + "".join(records) + "Server stopped!\n")
    return path


def test_a_rare_proactive_trigger_race_is_prefects_not_ours(tmp_path):
    assert server_log_problems(_log(tmp_path, RACE)) is None
    assert server_log_problems(_log(tmp_path, RACE, RACE)) is None


def test_the_race_every_loop_is_a_broken_service(tmp_path):
    problem = server_log_problems(_log(tmp_path, RACE, RACE, RACE))
    assert problem and "proactive-trigger race" in problem


def test_another_failure_of_the_same_service_fails_the_session(tmp_path):
    other = RACE.replace("AssertionError: Trigger._automation has been garbage collected",
                         "KeyError: 'automation'")
    problem = server_log_problems(_log(tmp_path, other))
    assert problem and "1 error record(s) with a traceback" in problem
