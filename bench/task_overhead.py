"""Benchmark: the task layer's overhead. Retrieve N studies PACS → research through
``retrieve_study`` tasks (in one flow, ThreadPoolTaskRunner, a PACS concurrency limit) versus
the raw REST calls doing the same work with the same concurrency, alternating, in one run.

    .venv/bin/python bench/task_overhead.py --studies 20 --concurrency 4 --rounds 3

Prefect runs on its embedded (ephemeral) server, warmed up before timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import loaded_lab, quiet_prefect

quiet_prefect()

from bench import _raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--instances", type=int, default=20, help="per study (2 series)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner

    from prefect_orthanc.tasks import OrthancCredentials, retrieve_study
    from prefect_orthanc.tasks.limits import ensure_limits

    with loaded_lab(args.studies, args.instances, seed=5) as (lab, cohort, auth, _):
        uids = [s.study_uid for s in cohort.studies]
        creds = OrthancCredentials(url=lab.research.url, username=auth[0], password=auth[1])
        asyncio.run(ensure_limits({"pacs": args.concurrency}))

        # Prefect #16938: mypy sees ThreadPoolTaskRunner as no TaskRunner[PrefectFuture[Any]]
        @flow(task_runner=ThreadPoolTaskRunner(max_workers=args.concurrency))  # type: ignore[arg-type]
        def pull_all() -> int:  # the UIDs come from the closure: never as flow parameters
            futures = [retrieve_study.submit(creds, "pacs", uid) for uid in uids]
            results = [f.result() for f in futures]
            assert all(r.complete for r in results)
            return sum(r.received_instances for r in results)

        @task
        def nothing(i: int) -> int:
            return i

        # Prefect #16938: mypy sees ThreadPoolTaskRunner as no TaskRunner[PrefectFuture[Any]]
        @flow(task_runner=ThreadPoolTaskRunner(max_workers=args.concurrency))  # type: ignore[arg-type]
        def floor() -> int:  # Prefect's own floor: as many plain tasks doing nothing
            return sum(f.result() for f in [nothing.submit(i) for i in range(len(uids))])

        @flow
        def warm_up() -> None:
            return None

        warm_up()  # starts the embedded server: not part of any measurement
        timings: dict[str, list[float]] = {"raw REST": [], "prefect tasks": [],
                                           "no-op @task floor": []}
        for _ in range(args.rounds):
            _raw.clear(lab.research.url, auth)
            timings["raw REST"].append(_raw.retrieve_all(lab.research.url, auth, "pacs",
                                                         "RESEARCH", uids, args.concurrency))
            _raw.clear(lab.research.url, auth)
            started = time.perf_counter()
            assert pull_all() == cohort.instance_count
            timings["prefect tasks"].append(time.perf_counter() - started)
            started = time.perf_counter()
            floor()
            timings["no-op @task floor"].append(time.perf_counter() - started)

    raw = statistics.median(timings["raw REST"])
    print(f"\n{args.studies} studies × {args.instances} instances, concurrency "
          f"{args.concurrency}, {args.rounds} alternating rounds")
    print("| path | median s | per study s | all rounds s |")
    print("|---|---|---|---|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / args.studies:.3f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")
    overhead = statistics.median(timings["prefect tasks"]) / raw - 1
    print(f"task layer overhead: {overhead:+.1%} (target: within 10 %); Prefect's own floor "
          f"(as many no-op tasks): {statistics.median(timings['no-op @task floor']):.2f} s")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "task_overhead.json").write_text(json.dumps({**timings, "overhead": overhead}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
