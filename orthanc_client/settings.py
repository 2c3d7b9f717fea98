"""Connection settings, read from ``ORTHANC_*`` environment variables or given explicitly.

>>> settings = OrthancSettings(url="http://127.0.0.1:8042", username="u", password="p")
>>> settings.safe_url
'http://127.0.0.1:8042'
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["OrthancConnection", "OrthancSettings"]


@functools.lru_cache(maxsize=8)
def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    if ca_bundle is not None:
        return ssl.create_default_context(cafile=ca_bundle)
    import certifi  # what httpx itself trusts by default

    return ssl.create_default_context(cafile=certifi.where())


class OrthancConnection(BaseModel):
    """Where an Orthanc server is and how to talk to it: the one definition of these fields,
    their defaults, limits and descriptions.

    ``OrthancSettings`` reads them from ``ORTHANC_*`` environment variables; the Prefect block
    ``OrthancCredentials`` stores them on the Prefect server. The clients take either, and
    use exactly the values they hold (a block's client reads no environment variable).
    """

    # hide_input_in_errors: a rejected URL may carry a password; never echo it in the error.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: str = Field("http://127.0.0.1:8042", description="Base URL of Orthanc's REST API.")
    username: str | None = Field(None, description="HTTP basic-auth user, if Orthanc needs one.")
    password: SecretStr | None = Field(None, description="HTTP basic-auth password.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to wait for a TCP connection.")
    read_timeout: float = Field(30.0, gt=0, description="Seconds to wait for an ordinary answer.")
    long_timeout: float = Field(
        600.0, gt=0, description="Seconds for slow calls: synchronous moves, uploads, archives."
    )
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    ca_bundle: Path | None = Field(None, description="CA bundle to verify TLS with.")
    retries: int = Field(3, ge=0, le=10, description=(
        "Retries of safe requests after a blip of Orthanc (no answer, HTTP 429/502-504); the "
        "only layer that retries them."))
    backoff: float = Field(
        0.5, ge=0, description="First retry delay in seconds (doubles, jittered).")
    #: where the username and password came from, set by whoever knows better (a block)
    _credentials_source: str = PrivateAttr("")

    @property
    def credentials_source(self) -> str:
        """Where the username and password came from, to name in an unauthorized error
        (never the values): e.g. "the ORTHANC_USERNAME / ORTHANC_PASSWORD environment
        variables" or "the OrthancCredentials block 'research'"."""
        return self._credentials_source or self._default_credentials_source()

    def _default_credentials_source(self) -> str:
        return "the username and password given to the client"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the URL (ORTHANC_URL) must look like http(s)://host[:port][/prefix]")
        if parts.username or parts.password:
            raise ValueError("put credentials in the username and password "
                             "(ORTHANC_USERNAME/ORTHANC_PASSWORD), not the URL")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    def connection(self) -> OrthancConnection:
        """Just the connection fields, as a plain (frozen) ``OrthancConnection``."""
        values = {name: getattr(self, name) for name in OrthancConnection.model_fields}
        frozen = _FrozenConnection.model_validate(values)
        frozen._credentials_source = self.credentials_source
        return frozen

    @property
    def safe_url(self) -> str:
        """The URL, safe to print (credentials are never part of it)."""
        return self.url

    def auth(self) -> httpx.BasicAuth | None:
        if self.username is None:
            return None
        secret = self.password.get_secret_value() if self.password else ""
        return httpx.BasicAuth(self.username, secret)

    def timeout(self, long: bool = False) -> httpx.Timeout:
        read = self.long_timeout if long else self.read_timeout
        return httpx.Timeout(read, connect=self.connect_timeout)

    def verify(self) -> bool | ssl.SSLContext:
        """What httpx's ``verify`` gets: a TLS context built once per CA bundle (httpx would
        build and load one for every client, ~30 ms), or False."""
        if not self.verify_tls:
            return False
        return _tls_context(str(self.ca_bundle) if self.ca_bundle else None)


class _FrozenConnection(OrthancConnection):
    model_config = ConfigDict(frozen=True)


class OrthancSettings(BaseSettings, OrthancConnection):
    """``OrthancConnection`` read from the environment (explicit arguments win).

    Environment variables: ``ORTHANC_URL``, ``ORTHANC_USERNAME``, ``ORTHANC_PASSWORD``,
    ``ORTHANC_CONNECT_TIMEOUT``, ``ORTHANC_READ_TIMEOUT``, ``ORTHANC_LONG_TIMEOUT``,
    ``ORTHANC_VERIFY_TLS``, ``ORTHANC_CA_BUNDLE``, ``ORTHANC_RETRIES``, ``ORTHANC_BACKOFF``.
    """

    model_config = SettingsConfigDict(env_prefix="ORTHANC_", extra="ignore", frozen=True,
                                      hide_input_in_errors=True)

    def _default_credentials_source(self) -> str:
        return "the ORTHANC_USERNAME / ORTHANC_PASSWORD environment variables"
