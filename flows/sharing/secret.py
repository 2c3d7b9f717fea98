"""The project secret the pseudonyms are keyed with: never a flow parameter."""

from __future__ import annotations

import os
from typing import cast

__all__ = ["MIN_SECRET_LENGTH", "SECRET_ENV", "project_secret"]

SECRET_ENV = "PREFECT_ORTHANC_DEID_SECRET"


#: the shortest de-identification secret accepted (checked again by ``deployments setup``)
MIN_SECRET_LENGTH = 16


def project_secret(block: str | None) -> bytes:
    """The de-identification secret: a Secret block's value, or the environment's."""
    if block:
        from prefect.blocks.system import Secret

        value = cast("Secret[str]", Secret.load(block)).get()  # synchronous: the block
    else:
        value = os.environ.get(SECRET_ENV, "")
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"the project secret must be at least {MIN_SECRET_LENGTH} characters: set "
                         f"{SECRET_ENV} or a Secret block (never a flow parameter)")
    return value.encode()
