"""The Prefect server the whole session ran against logged no traceback from its own services.

Named to run last among the integration tests: by then every flow, deployment, schedule,
trigger and worker of the session has gone through this server. A scheduler or trigger service
failing on every loop (as Prefect 3.8.8's scheduler did with SQLAlchemy 2.1) shows up here even
when no test waits for that service.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.MULTILINE)


def test_the_server_log_has_no_traceback(prefect_server):
    text = prefect_server.log_path.read_text(errors="replace")
    assert "View the API reference documentation" in text, "the server log lacks its banner"
    found = [m.start() for m in _TRACEBACK.finditer(text)]
    excerpts = "\n---\n".join(text[max(0, i - 400):i + 1600] for i in found[:3])
    assert not found, f"{len(found)} traceback(s) in {prefect_server.log_path}:\n{excerpts}"
    assert "bulk_dml" not in text
