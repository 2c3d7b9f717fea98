"""``orthanc_task`` keeps Prefect's ``Task[P, R]``: a task's calls and ``.submit`` are typed with
its function's parameters and result, so mypy (scripts/check) checks their call sites.

``_call_sites`` is never run: mypy reads it. Each wrong call carries a ``type: ignore`` for
the error a typed task gives; if the decorator's type degraded to a plain function (no
``.submit``) or to ``Any`` (no error at all), mypy would report the ignore as wrong or unused.
"""

from __future__ import annotations

from typing import assert_type

from prefect import Task

from prefect_orthanc.tasks import wait_for_job
from prefect_orthanc.tasks.policy import orthanc_task


@orthanc_task(name="double", retries=0)
def double(value: int) -> int:
    return 2 * value


def _call_sites() -> None:
    assert_type(double.fn(2), int)
    double("two")  # type: ignore[call-overload]
    double.submit("two")  # type: ignore[call-overload]
    double.submit(2, 3)  # type: ignore[call-overload]
    wait_for_job.submit(credentials=None, job_id=1)  # type: ignore[call-overload]


def test_an_orthanc_task_is_a_prefect_task_of_its_function() -> None:
    assert isinstance(double, Task) and isinstance(wait_for_job, Task)
    assert double.fn(21) == 42
    assert double.name == "double"
