"""A process that takes one slot with ``tasks.slots.hold`` and reports, for the slot tests.

    python tests/integration/slot_holder.py LIMIT[,LIMIT...] STOP_FILE [WAIT_SECONDS]

Prints ``acquired <unix time>`` once it holds the slot, keeps it until STOP_FILE exists,
then prints ``released <unix time>``; or prints ``exceeded <message>`` when the wait bound
ran out. PREFECT_API_URL and PREFECT_ORTHANC_SLOT_* come from the environment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(limit: str, stop_file: str, wait: str | None = None) -> int:
    from prefect_orthanc.tasks.slots import SlotWaitExceeded, hold

    try:
        with hold(limit.split(","), wait=float(wait) if wait else None):
            print(f"acquired {time.time():.3f}", flush=True)
            while not Path(stop_file).exists():
                time.sleep(0.1)
    except SlotWaitExceeded as error:
        print(f"exceeded {error}", flush=True)
        return 3
    print(f"released {time.time():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
