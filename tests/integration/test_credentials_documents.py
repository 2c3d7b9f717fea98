"""A block document saved by an older ``setup`` (the block's older field set, without
``connect_timeout`` and ``backoff``, under an older block schema) still loads on the real
Prefect server: the missing fields take their defaults, never the loading worker's
``ORTHANC_*`` environment, and the saved values (the secret password included) are used."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentCreate, BlockSchemaCreate
from pydantic import BaseModel, Field, SecretStr

from prefect_orthanc.tasks import OrthancCredentials

pytestmark = pytest.mark.usefixtures("prefect_server")


class _OlderFields(BaseModel):
    """The fields OrthancCredentials had before it reused OrthancConnection."""

    url: str = Field("http://127.0.0.1:8042", description="Base URL of Orthanc's REST API.")
    username: str | None = Field(None, description="HTTP basic-auth user, if required.")
    password: SecretStr | None = Field(None, description="HTTP basic-auth password.")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate.")
    ca_bundle: str | None = Field(None, description="CA bundle file used to verify TLS.")
    read_timeout: float = Field(30.0, gt=0, description="Seconds to wait for ordinary answers.")
    long_timeout: float = Field(600.0, gt=0, description="Seconds for slow calls.")
    retries: int = Field(3, ge=0, le=10, description="Retries of safe requests.")


OLDER_DATA = {"url": "http://research.test:8042", "username": "svc",
              "password": "older-secret-0042", "verify_tls": True, "ca_bundle": None,
              "read_timeout": 12.0, "long_timeout": 300.0, "retries": 1}


async def _save_older_document(name: str) -> None:
    await OrthancCredentials.aregister_type_and_schema()
    async with get_client() as client:
        block_type = await client.read_block_type_by_slug(OrthancCredentials.get_block_type_slug())
        fields = {**_OlderFields.model_json_schema(), "title": "OrthancCredentials",
                  "block_type_slug": block_type.slug, "secret_fields": ["password"],
                  "block_schema_references": {}}
        older = await client.create_block_schema(BlockSchemaCreate(
            fields=fields, block_type_id=block_type.id, capabilities=[], version="3.8.8"))
        assert older.checksum != OrthancCredentials._calculate_schema_checksum()
        await client.create_block_document(BlockDocumentCreate(
            name=name, data=OLDER_DATA, block_schema_id=older.id, block_type_id=block_type.id))


def test_a_document_saved_with_the_older_fields_still_loads(monkeypatch):
    for name, value in {"URL": "http://elsewhere.test:9999", "CONNECT_TIMEOUT": "77",
                        "BACKOFF": "7.5", "RETRIES": "9", "PASSWORD": "env-password"}.items():
        monkeypatch.setenv(f"ORTHANC_{name}", value)  # the worker's, which must not leak in
    name = f"older-setup-{uuid.uuid4().hex[:8]}"
    asyncio.run(_save_older_document(name))

    block = OrthancCredentials.load(name)
    assert {key: getattr(block, key) for key in ("url", "username", "read_timeout",
                                                 "long_timeout", "retries")} == {
        "url": "http://research.test:8042", "username": "svc", "read_timeout": 12.0,
        "long_timeout": 300.0, "retries": 1}
    assert block.password is not None
    assert block.password.get_secret_value() == "older-secret-0042"
    assert (block.connect_timeout, block.backoff) == (5.0, 0.5)  # defaults, not 77 / 7.5
    with block.get_client() as orthanc:
        assert orthanc.settings.connect_timeout == 5.0 and orthanc.settings.backoff == 0.5
        assert orthanc.settings.url == "http://research.test:8042"
