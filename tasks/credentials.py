"""``OrthancCredentials``: the Prefect block that says how to reach one Orthanc server.

Create one in the UI (Blocks → Orthanc Credentials), from the CLI after
``prefect block register -m tasks``, or in Python:

>>> OrthancCredentials(url="https://orthanc.example.org", username="svc",
...                    password="...").save("research")
>>> creds = OrthancCredentials.load("research")

Without a Prefect server, ``OrthancCredentials.from_env()`` reads ``ORTHANC_*`` variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from prefect_orthanc.orthanc_client import AsyncOrthanc, Orthanc, OrthancSettings

__all__ = ["OrthancCredentials", "load_credentials"]


class OrthancCredentials(Block):
    """Connection details of one Orthanc server; hands out configured clients.

    Example:
        ```python
        from prefect_orthanc.tasks import OrthancCredentials

        creds = OrthancCredentials.load("research")
        with creds.get_client() as orthanc:
            print(orthanc.system().version)
        ```
    """

    _block_type_name = "Orthanc Credentials"
    _block_type_slug = "orthanc-credentials"
    _description = "How to reach an Orthanc DICOM server's REST API (URL, basic auth, TLS)."
    _documentation_url = "https://orthanc.uclouvain.be/book/users/rest.html"  # type: ignore[assignment]

    url: str = Field("http://127.0.0.1:8042", description="Base URL of Orthanc's REST API.")
    username: str | None = Field(None, description="HTTP basic-auth user, if required.")
    password: SecretStr | None = Field(None, description="HTTP basic-auth password.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    ca_bundle: Path | None = Field(None, description="CA bundle file used to verify TLS.")
    read_timeout: float = Field(30.0, gt=0, description="Seconds to wait for ordinary answers.")
    long_timeout: float = Field(
        600.0, gt=0, description="Seconds for slow calls: moves, uploads, archives, job waits."
    )
    retries: int = Field(3, ge=0, le=10,
                         description="Retries of safe requests on transient errors.")

    @classmethod
    def from_settings(cls, settings: OrthancSettings) -> OrthancCredentials:
        """Build the block from client settings (e.g. ``OrthancSettings()``, the environment)."""
        return cls(url=settings.url, username=settings.username, password=settings.password,
                   verify_tls=settings.verify_tls, ca_bundle=settings.ca_bundle,
                   read_timeout=settings.read_timeout, long_timeout=settings.long_timeout,
                   retries=settings.retries)

    @classmethod
    def from_env(cls) -> OrthancCredentials:
        """Read ``ORTHANC_*`` environment variables: works without any Prefect server."""
        return cls.from_settings(OrthancSettings())

    def settings(self) -> OrthancSettings:
        return OrthancSettings(url=self.url, username=self.username, password=self.password,
                               verify_tls=self.verify_tls, ca_bundle=self.ca_bundle,
                               read_timeout=self.read_timeout, long_timeout=self.long_timeout,
                               retries=self.retries)

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

    Raises ``ValueError`` when no block of that name is saved.

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
    return cast(OrthancCredentials, OrthancCredentials.load(block, _sync=True))  # type: ignore[call-arg]
