"""Writes to the Prefect API that two writers can meet on (SQLite's "database is locked").

On the embedded (SQLite) Prefect server two writes that meet can make one of them fail with
a 503 ("database is locked": a deferred transaction that read, then could not upgrade to a
write). Prefect's client retries a 503 after an exponential back-off that starts at 2 s, and
sleeps that back-off even when told to make no retry (``PREFECT_CLIENT_MAX_RETRIES=0``,
Prefect 3.9.1): one collision costs a study 2 s. A collision is momentary, so ``write`` sends
the request once through the same Prefect client (its base URL, headers and CSRF token),
bypassing only its retry loop, and asks again after ``CONFLICT_RETRY_SECONDS`` (uniform
jitter), up to ``CONFLICT_ATTEMPTS`` times, then hands over to the client's own retries.
"""

from __future__ import annotations

import random
import time
from typing import Any

import httpx

__all__ = ["CONFLICT_ATTEMPTS", "CONFLICT_RETRY_SECONDS", "write"]

#: seconds (uniform) before asking again after a 503
CONFLICT_RETRY_SECONDS = (0.05, 0.3)
#: fast attempts before the Prefect client's own (slow) retries take over
CONFLICT_ATTEMPTS = 8


def _send_once(client: Any, method: str, path: str, params: Any = None,
               **kwargs: Any) -> httpx.Response | None:
    """One attempt through Prefect's sync client without its retry loop; None when this
    Prefect's client does not have the pieces used here (then the caller uses
    ``client.request``)."""
    from prefect.client.base import PrefectResponse

    http = getattr(client, "_client", None)
    add_csrf = getattr(http, "_add_csrf_headers", None)
    if not isinstance(http, httpx.Client) or add_csrf is None:
        return None
    request = http.build_request(method, path, params=params, **kwargs)
    add_csrf(request)  # nothing when the server has CSRF protection off
    response = PrefectResponse.from_httpx_response(httpx.Client.send(http, request))
    response.raise_for_status()  # PrefectHTTPStatusError, as client.request raises
    return response


def write(client: Any, method: str, path: str, *, path_params: dict[str, Any] | None = None,
          **kwargs: Any) -> httpx.Response:
    """``client.request(method, path, **kwargs)`` (a ``SyncPrefectClient``) with 503s asked
    again at once (see the module docstring); other errors are raised as the client raises
    them (``httpx.HTTPStatusError``).

    Example:
        ```python
        with get_client(sync_client=True) as client:
            write(client, "DELETE", "/variables/name/{name}", path_params={"name": name})
        ```
    """
    if path_params:
        path = path.format(**path_params)
    for _ in range(CONFLICT_ATTEMPTS):
        try:
            response = _send_once(client, method, path, **kwargs)
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 503:
                raise
        except httpx.TransportError:
            break  # the server is away, not busy: the client's own retries wait for it
        else:
            if response is None:
                break
            return response
        time.sleep(random.uniform(*CONFLICT_RETRY_SECONDS))
    return client.request(method, path, **kwargs)
