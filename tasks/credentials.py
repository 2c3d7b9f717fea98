"""``OrthancCredentials``: the Prefect block that says how to reach one Orthanc server.

Create one in the UI (Blocks → Orthanc Credentials), from the CLI after
``prefect block register -m prefect_orthanc.tasks``, or in Python:

>>> OrthancCredentials(url="https://orthanc.example.org", username="svc",
...                    password="...").save("research")
>>> creds = OrthancCredentials.load("research")

Without a Prefect server, ``OrthancCredentials.from_env()`` reads ``ORTHANC_*`` variables.

Its fields are ``OrthancConnection``'s (one definition, shared with ``OrthancSettings``): a
field added there is a field of the block, with the same default, limits and description.
A block document saved before a field existed still loads, with the field's default; its
client uses the block's values only, never the worker's ``ORTHANC_*`` environment.
"""

from __future__ import annotations

from typing import cast

from prefect.blocks.core import Block

from prefect_orthanc.orthanc_client import (
    AsyncOrthanc,
    Orthanc,
    OrthancConnection,
    OrthancSettings,
)
from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["CredentialsBlockMissing", "OrthancCredentials", "load_credentials"]


class CredentialsBlockMissing(SafeMessageError, ValueError):
    """No ``OrthancCredentials`` block is saved under the name given (a block name is not
    PHI: the message names it, and how to create it)."""


class OrthancCredentials(Block, OrthancConnection):
    """Connection details of one Orthanc server; hands out configured clients.

    Fields (``OrthancConnection``'s): ``url``, ``username``, ``password`` (secret),
    ``connect_timeout``, ``read_timeout``, ``long_timeout`` (seconds), ``verify_tls``,
    ``ca_bundle``, ``retries`` (of safe requests, by the client), ``backoff`` (seconds).

    Example:
        ```python
        from prefect_orthanc.tasks import OrthancCredentials

        orthanc_credentials_block = OrthancCredentials.load("BLOCK_NAME")
        with orthanc_credentials_block.get_client() as orthanc:
            print(orthanc.system().version)
        ```
    """

    _block_type_name = "Orthanc Credentials"
    _block_type_slug = "orthanc-credentials"
    _description = "How to reach an Orthanc DICOM server's REST API (URL, basic auth, TLS)."
    # Orthanc's own logo, as the Orthanc project publishes it
    _logo_url = "https://www.orthanc-server.com/img/Carousel/1-Logo.png"  # type: ignore[assignment]
    _documentation_url = "https://orthanc.uclouvain.be/book/users/rest.html"  # type: ignore[assignment]

    @classmethod
    def from_settings(cls, settings: OrthancConnection) -> OrthancCredentials:
        """The block holding ``settings``' values (e.g. ``OrthancSettings()``: the environment)."""
        block = cls.model_validate(settings.connection().model_dump())
        block._credentials_source = settings.credentials_source
        return block

    def _default_credentials_source(self) -> str:
        name = getattr(self, "_block_document_name", None)
        return (f"the OrthancCredentials block {name!r}" if name
                else "an OrthancCredentials block not saved")

    @classmethod
    def from_env(cls) -> OrthancCredentials:
        """Read ``ORTHANC_*`` environment variables: works without any Prefect server."""
        return cls.from_settings(OrthancSettings())

    def settings(self) -> OrthancConnection:
        """This block's values as the clients take them; no environment variable is read."""
        return self.connection()

    def get_client(self) -> Orthanc:
        """A blocking client; use it as a context manager so its connections are closed."""
        return Orthanc(self.settings())

    def get_async_client(self) -> AsyncOrthanc:
        """An async client; use it with ``async with``."""
        return AsyncOrthanc(self.settings())


def load_credentials(block: str | None) -> OrthancCredentials:
    """The ``OrthancCredentials`` block saved as ``block``, or, when ``block`` is empty, one
    read from the ``ORTHANC_*`` environment variables (``OrthancCredentials.from_env``): what
    the ``credentials_block`` parameter of every flow of this package means.

    Raises ``CredentialsBlockMissing`` (a ``ValueError``) when no block of that name is
    saved: its message names the block and how to create one.

    Example:
        ```python
        with load_credentials("research").get_client() as orthanc:
            print(orthanc.system().version)
        ```
    """
    if not block:
        return OrthancCredentials.from_env()
    # _sync: a blocking load even when called from an async flow (Prefect's async_dispatch
    # would hand back a coroutine there)
    try:
        loaded = OrthancCredentials.load(block, _sync=True)  # type: ignore[call-arg]
    except ValueError as error:
        if "Unable to find block document" not in str(error):
            raise
        raise CredentialsBlockMissing(
            f"no OrthancCredentials block named {block!r} on the Prefect server: create it "
            f"with `python -m prefect_orthanc.deployments setup` (ORTHANC_* variables set), "
            f"or `OrthancCredentials(url=..., username=..., password=...).save({block!r})`, "
            f"or in the UI (Blocks); or pass the name of an existing one") from None
    return cast(OrthancCredentials, loaded)
