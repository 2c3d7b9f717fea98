"""OrthancSettings: ORTHANC_* environment, secret handling, URL validation, overrides."""

from __future__ import annotations

import base64
import pickle

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from prefect_orthanc.orthanc_client import AsyncOrthanc, Orthanc, OrthancSettings
from tests.unit._mocks import BASE, SYSTEM_1_10, run


def test_defaults_without_environment():
    settings = OrthancSettings()
    assert settings.url == "http://127.0.0.1:8042"
    assert settings.username is None and settings.password is None
    assert settings.auth() is None
    assert settings.retries == 3


def test_environment_prefix(monkeypatch):
    monkeypatch.setenv("ORTHANC_URL", "https://pacs.example.org:8043/orthanc/")
    monkeypatch.setenv("ORTHANC_USERNAME", "robot")
    monkeypatch.setenv("ORTHANC_PASSWORD", "s3cr3t-pw")
    monkeypatch.setenv("ORTHANC_RETRIES", "5")
    monkeypatch.setenv("ORTHANC_BACKOFF", "0.25")
    monkeypatch.setenv("ORTHANC_READ_TIMEOUT", "12")
    monkeypatch.setenv("ORTHANC_LONG_TIMEOUT", "900")
    monkeypatch.setenv("ORTHANC_VERIFY_TLS", "false")
    settings = OrthancSettings()
    assert settings.url == "https://pacs.example.org:8043/orthanc"
    assert settings.username == "robot"
    assert isinstance(settings.password, SecretStr)
    assert settings.password.get_secret_value() == "s3cr3t-pw"
    assert settings.retries == 5
    assert settings.backoff == 0.25
    assert settings.timeout().read == 12
    assert settings.timeout(long=True).read == 900
    assert settings.verify() is False


def test_password_never_shown(monkeypatch):
    monkeypatch.setenv("ORTHANC_URL", BASE)
    monkeypatch.setenv("ORTHANC_USERNAME", "robot")
    monkeypatch.setenv("ORTHANC_PASSWORD", "s3cr3t-pw")
    settings = OrthancSettings()
    for text in (repr(settings), str(settings), settings.safe_url,
                 settings.model_dump_json()):
        assert "s3cr3t-pw" not in text
    with Orthanc.from_env() as client:
        assert "s3cr3t-pw" not in repr(client) and "s3cr3t-pw" not in str(client)
        assert "s3cr3t-pw" not in repr(client.settings)
        assert repr(client) == f"Orthanc({BASE!r})"
    client = AsyncOrthanc.from_env()
    assert "s3cr3t-pw" not in repr(client)
    run(client.aclose())


def test_auth_header_sent(router, transport):
    seen = []

    def system(request):
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json=SYSTEM_1_10)

    router.get("/system").mock(side_effect=system)
    with Orthanc(url=BASE, username="robot", password="s3cr3t-pw", transport=transport) as c:
        c.system()
    assert seen == ["Basic " + base64.b64encode(b"robot:s3cr3t-pw").decode()]


@pytest.mark.parametrize("url", ["orthanc.test:8042", "127.0.0.1:8042", "ftp://host/x",
                                 "http://", "/orthanc"])
def test_url_needs_scheme_and_host(url):
    with pytest.raises(ValidationError, match="http"):
        OrthancSettings(url=url)


def test_url_with_credentials_refused_without_echoing_them():
    with pytest.raises(ValidationError) as info:
        OrthancSettings(url="http://robot:s3cr3t-pw@orthanc.test:8042")
    assert "ORTHANC_PASSWORD" in str(info.value)
    assert "s3cr3t-pw" not in str(info.value) and "s3cr3t-pw" not in repr(info.value)


def test_url_from_environment_validated(monkeypatch):
    monkeypatch.setenv("ORTHANC_URL", "http://robot:s3cr3t-pw@orthanc.test")
    with pytest.raises(ValidationError) as info:
        OrthancSettings()
    assert "s3cr3t-pw" not in str(info.value)


def test_trailing_slash_query_and_fragment_stripped():
    assert OrthancSettings(url="http://h:8042/").url == "http://h:8042"
    assert OrthancSettings(url=" http://h:8042/orthanc// ").url == "http://h:8042/orthanc"
    assert OrthancSettings(url="http://h:8042/?x=1#y").url == "http://h:8042"


def test_explicit_arguments_override_environment(monkeypatch):
    monkeypatch.setenv("ORTHANC_URL", "http://from-env:8042")
    monkeypatch.setenv("ORTHANC_USERNAME", "env-user")
    monkeypatch.setenv("ORTHANC_RETRIES", "7")
    with Orthanc(url="http://explicit:9000/", username="me", password="pw", retries=1) as c:
        assert c.settings.url == "http://explicit:9000"
        assert c.settings.username == "me"
        assert c.settings.password.get_secret_value() == "pw"
        assert c.settings.retries == 1
    with Orthanc() as c:  # nothing explicit: the environment wins over defaults
        assert c.settings.url == "http://from-env:8042"
        assert c.settings.retries == 7


def test_explicit_arguments_override_given_settings():
    """Overrides on top of a settings object are validated like any settings (regression:
    they were copied unvalidated, so a password stayed a plain str and broke auth)."""
    base = OrthancSettings(url="http://a:8042", username="u", password="old", retries=4)
    with Orthanc(base, url="http://b:8042/", password="n3w-pw") as client:
        settings = client.settings
        assert settings.url == "http://b:8042"
        assert isinstance(settings.password, SecretStr)
        assert settings.password.get_secret_value() == "n3w-pw"
        assert settings.retries == 4 and settings.username == "u"
        assert "n3w-pw" not in repr(settings)
        assert isinstance(settings.auth(), httpx.BasicAuth)
    assert base.url == "http://a:8042"  # the original is untouched (frozen)
    with pytest.raises(ValidationError):
        Orthanc(base, url="no-scheme:8042")


def test_from_env_overrides(monkeypatch):
    monkeypatch.setenv("ORTHANC_URL", "http://from-env:8042")
    monkeypatch.setenv("ORTHANC_PASSWORD", "env-pw")
    with Orthanc.from_env(password="arg-pw", retries=0) as client:
        assert client.settings.url == "http://from-env:8042"
        assert client.settings.password.get_secret_value() == "arg-pw"
        assert client.settings.retries == 0


def test_settings_are_frozen_and_picklable() -> None:
    settings = OrthancSettings(url=BASE, password="pw")
    with pytest.raises(ValidationError):
        settings.url = "http://other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(settings)) == settings


@pytest.mark.parametrize("field,value", [("retries", -1), ("retries", 11), ("backoff", -0.1),
                                         ("read_timeout", 0)])
def test_numeric_bounds(field, value):
    with pytest.raises(ValidationError):
        OrthancSettings(**{field: value})
