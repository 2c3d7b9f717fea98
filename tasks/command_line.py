"""How this package's command lines answer bad input: one line and exit status 1, no traceback.

``python -m prefect_orthanc.deployments`` and ``prefect-orthanc-limits`` run their commands
through ``answer``, the one place that turns what a user can get wrong into a sentence:

- a ``SafeMessageError`` (this package's own, PHI-free by construction): its message;
- a settings ``ValidationError``: each field as its environment variable and the problem,
  never the value given (a URL may carry a password);
- no Prefect API (connection refused, timeout): the ``PREFECT_API_URL`` it tried;
- a file that is missing, unreadable or not valid YAML: the path and the problem.

Anything else is a bug: it keeps its traceback.

Example:
    ```python
    def main(argv=None) -> int:
        return answer("prefect-orthanc-limits", lambda: _main(argv))
    ```
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from prefect_orthanc.orthanc_client.errors import SafeMessageError

__all__ = ["answer", "one_line"]


def _settings_classes(base: type[BaseSettings] = BaseSettings) -> list[type[BaseSettings]]:
    found: list[type[BaseSettings]] = []
    for sub in base.__subclasses__():
        found += [sub, *_settings_classes(sub)]
    return found


def _env_prefix(title: str) -> str | None:
    """The environment prefix of the settings class named ``title``, if it is one."""
    for cls in _settings_classes():
        if cls.__name__ == title:
            return str(cls.model_config.get("env_prefix", ""))
    return None


def _validation(error: ValidationError) -> str:
    prefix = _env_prefix(error.title)
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        name = (f"{prefix}{field}".upper() if prefix is not None and field else field)
        problem = item["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {problem}" if name else problem)
    return f"invalid {error.title} ({'; '.join(problems)})"


def _prefect_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or ""
    parts = urlsplit(url)
    if parts.password or parts.username:  # never echo credentials
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        url = urlunsplit(parts._replace(netloc=host))
    return url


def one_line(error: BaseException) -> str | None:
    """The one-line answer to ``error`` when it is bad input (see the module), else None."""
    if isinstance(error, SafeMessageError):
        return str(error)
    if isinstance(error, ValidationError):
        return _validation(error)
    if isinstance(error, (httpx.ConnectError, httpx.TimeoutException)):
        url = _prefect_api_url()
        where = (f"PREFECT_API_URL={url}" if url else
                 "no PREFECT_API_URL set (a temporary server)")
        return (f"cannot reach the Prefect API ({type(error).__name__}; {where}): start "
                f"`prefect server start` or set PREFECT_API_URL to a running server's "
                f"http://HOST:4200/api")
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"not valid YAML ({where}): {error.problem or error.context}"
    if isinstance(error, yaml.YAMLError):
        return f"not valid YAML: {str(error).splitlines()[0]}"
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.strerror or type(error).__name__}: {error.filename}"
    return None


def answer(prog: str, command: Callable[[], int]) -> int:
    """Run ``command``; bad input (``one_line``) is printed as ``prog: message`` on stderr and
    gives exit status 1; any other exception propagates with its traceback."""
    try:
        return command()
    except Exception as error:  # sorted below: bad input, or a bug
        message = one_line(error)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return 1
