"""Prefect Variables written by concurrent runs (cursors, in-flight retrievals) never fail
because another run created the same variable a moment earlier.

Found by the schedule tests: two watcher deployments of one server started together and one
run failed with ``ObjectAlreadyExists`` creating their shared cursor.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from prefect.variables import Variable

from prefect_orthanc.tasks.variables import put_variable

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_creators_of_one_variable_all_succeed(round_):
    name = f"race_{uuid.uuid4().hex[:12]}"
    start, errors = threading.Barrier(8), []

    def write(value: int) -> None:
        start.wait()
        try:
            put_variable(name, value)
        except Exception as error:
            errors.append(type(error).__name__)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert Variable.get(name) in range(8)
    Variable.unset(name)
