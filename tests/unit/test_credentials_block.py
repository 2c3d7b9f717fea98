"""``OrthancCredentials``: Prefect's standard block tests, one owner of the connection
fields (``OrthancConnection``), the block's values and never the worker's environment, and a
password that never shows. Loading a document saved with the older field set (on a real
Prefect server): tests/integration/test_credentials_documents.py."""

from __future__ import annotations

import logging
import pickle

import httpx
import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites.blocks import BlockStandardTestSuite
from pydantic import SecretStr, ValidationError

from prefect_orthanc.orthanc_client import OrthancConnection, OrthancSettings
from prefect_orthanc.tasks import OrthancCredentials
from tests.unit._mocks import BASE

PASSWORD = "s3cr3t-pw-0042"


class TestOrthancCredentialsBlock(BlockStandardTestSuite):
    """Prefect's own suite (description, documentation URL, every field described, code
    example with import and ``.load("BLOCK_NAME")``). Its logo test downloads the image,
    which the suite cannot (loopback only): replaced by a check of the URL's form."""

    @pytest.fixture
    def block(self) -> type[Block]:
        return OrthancCredentials

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        logo = str(block._logo_url)
        assert logo.startswith("https://") and logo.lower().endswith((".png", ".svg"))


def test_the_fields_have_one_owner():
    """The block's fields are OrthancConnection's, as the settings' are: same names, defaults,
    limits and descriptions (connect_timeout and backoff were missing from the block)."""
    shared = OrthancConnection.model_fields
    for model in (OrthancCredentials, OrthancSettings):
        fields = model.model_fields
        assert set(shared) <= set(fields)
        for name, field in shared.items():
            assert (fields[name].default, fields[name].description, fields[name].metadata) == (
                field.default, field.description, field.metadata), (model.__name__, name)
    assert {"connect_timeout", "backoff"} <= set(OrthancCredentials.model_fields)
    with pytest.raises(ValidationError):
        OrthancCredentials(retries=11)  # the same limits
    with pytest.raises(ValidationError):
        OrthancCredentials(url="ftp://orthanc")  # the same URL check


@pytest.fixture
def worker_env(monkeypatch):
    """A worker whose ORTHANC_* variables differ from the block in every field."""
    for name, value in {"URL": "http://elsewhere.test:9999", "USERNAME": "env-user",
                        "PASSWORD": "env-password", "CONNECT_TIMEOUT": "77",
                        "READ_TIMEOUT": "88", "LONG_TIMEOUT": "999", "VERIFY_TLS": "false",
                        "RETRIES": "9", "BACKOFF": "7.5"}.items():
        monkeypatch.setenv(f"ORTHANC_{name}", value)


def test_the_client_uses_the_blocks_values_not_the_workers_environment(worker_env):
    block = OrthancCredentials(url=BASE, username="svc", password=PASSWORD,
                               connect_timeout=2.5, read_timeout=11, retries=1, backoff=0.25)
    expected = {name: getattr(block, name) for name in OrthancConnection.model_fields}
    with block.get_client() as orthanc:
        used = {name: getattr(orthanc.settings, name) for name in OrthancConnection.model_fields}
        assert used == expected
        assert orthanc._http.timeout == httpx.Timeout(11, connect=2.5)
        assert str(orthanc._http.base_url).rstrip("/") == BASE
    assert block.get_async_client().settings == orthanc.settings


def test_a_default_of_the_block_is_the_fields_default_not_the_environment(worker_env):
    """A block saved without connect_timeout or backoff (an older document) gets the field's
    default, never ORTHANC_CONNECT_TIMEOUT / ORTHANC_BACKOFF of the worker that loads it."""
    block = OrthancCredentials.model_validate({"url": BASE, "retries": 2})
    settings = block.settings()
    assert (settings.connect_timeout, settings.backoff, settings.username) == (5.0, 0.5, None)


def test_from_env_reads_every_field(worker_env):
    block = OrthancCredentials.from_env()
    assert (block.connect_timeout, block.backoff, block.retries) == (77, 7.5, 9)
    assert block.password is not None and block.password.get_secret_value() == "env-password"


def test_the_password_never_shows(caplog):
    block = OrthancCredentials(url=BASE, username="svc", password=PASSWORD)
    assert isinstance(block.password, SecretStr)
    with block.get_client() as orthanc:
        texts = [repr(block), str(block), block.model_dump_json(), repr(block.settings()),
                 str(block.model_dump()), repr(orthanc), repr(orthanc.settings)]
    logging.getLogger("prefect_orthanc.test").warning("block %s, settings %r", block,
                                                       block.settings())
    texts.append(caplog.text)
    with pytest.raises(ValidationError) as caught:  # a rejected value is not echoed
        OrthancCredentials(url=f"http://svc:{PASSWORD}@orthanc.test", password=PASSWORD)
    texts.append(str(caught.value))
    with pytest.raises(ValidationError) as bounds:
        OrthancCredentials(url=BASE, password=PASSWORD, retries=-1)
    texts.append(str(bounds.value))
    assert not [t for t in texts if PASSWORD in t]
    # still usable: it is in the Authorization header, and survives a pickle (task inputs)
    again = pickle.loads(pickle.dumps(block))
    assert again.password.get_secret_value() == PASSWORD
    assert "password" in OrthancCredentials.model_json_schema()["secret_fields"]


@pytest.mark.parametrize("origin", ["block", "environment", "arguments"])
def test_unauthorized_names_where_the_credentials_came_from(router, transport, monkeypatch,
                                                             origin):
    """Found by a tester: a block's wrong password was blamed on ORTHANC_USERNAME/PASSWORD."""
    from prefect_orthanc.orthanc_client import Orthanc, OrthancUnauthorized

    router.get("/system").mock(return_value=httpx.Response(401))
    if origin == "block":
        block = OrthancCredentials(url=BASE, username="svc", password=PASSWORD)
        block._block_document_name = "badpw"  # what Block.load("badpw") sets
        settings: OrthancConnection = block.settings()
        expected = "the OrthancCredentials block 'badpw'"
    elif origin == "environment":
        monkeypatch.setenv("ORTHANC_URL", BASE)
        monkeypatch.setenv("ORTHANC_USERNAME", "svc")
        monkeypatch.setenv("ORTHANC_PASSWORD", PASSWORD)
        settings = OrthancCredentials.from_env().settings()  # load_credentials(None)
        expected = "the ORTHANC_USERNAME / ORTHANC_PASSWORD environment variables"
    else:
        settings = OrthancConnection(url=BASE, username="svc", password=PASSWORD)
        expected = "the username and password given to the client"
    with Orthanc(settings, transport=transport, retries=0) as orthanc, \
            pytest.raises(OrthancUnauthorized) as caught:
        orthanc.system()
    assert str(caught.value).endswith(f"check the username and password of {expected}")
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(pickle.loads(pickle.dumps(caught.value)).__dict__)
