"""Client for Wave's contacts API (README "Backfill"), read by the backfill one page at a time.

    GET {base}/v1/accounts/{account_id}/contacts?limit=1..500&cursor=<opaque>   Bearer token
    -> 200 {"data": [Contact...], "next_cursor": "..." | null}; 429 with Retry-After; 5xx

Raises WaveThrottled(retry_after) or WaveUnavailable (5xx, network) for the caller to reschedule, and
WaveError for answers that retrying will not fix (a 3xx among them: no redirect is followed and no proxy
from the environment is used). The token never appears in an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from core.errors import AppError
from core.retry_after import retry_after_seconds

MAX_PAGE = 500


class WaveError(AppError):
    """Wave's API answered in a way that retrying will not fix (4xx, unreadable body)."""


class WaveUnavailable(WaveError):
    """5xx, timeout or a dropped connection: retry later."""


class WaveThrottled(WaveUnavailable):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"Wave's contacts API asked to retry after {retry_after:g} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Page:
    contacts: list[Any]  # raw items, validated by the caller one by one (a bad one must not sink the page)
    next_cursor: str | None


class WaveClient:
    def __init__(self, base_url: str, token: str, *, timeout: tuple[float, float] = (5.0, 60.0)) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._session = requests.Session()
        # The bearer token goes to WAVE_API_BASE_URL and nowhere else: not through a proxy named by
        # HTTP(S)_PROXY in the environment, nor (with ~/.netrc or REQUESTS_CA_BUNDLE) changed by it
        # (https://requests.readthedocs.io/en/latest/api/#requests.Session.trust_env).
        self._session.trust_env = False

    def contacts_page(self, account_id: str, cursor: str | None, limit: int = MAX_PAGE) -> Page:
        params: dict[str, Any] = {"limit": max(1, min(MAX_PAGE, limit))}
        if cursor:
            params["cursor"] = cursor
        url = f"{self.base_url}/v1/accounts/{quote(account_id, safe='')}/contacts"
        try:
            # A redirect is not followed: the page must come from the configured API itself (requests
            # would follow one anywhere, and keep the token on a redirect within the same host and port).
            res = self._session.get(url, params=params, headers={"Authorization": f"Bearer {self._token}"},
                                    timeout=self.timeout, allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise WaveUnavailable(f"Wave's contacts API did not answer ({type(exc).__name__})") from None
        if res.status_code == 429:
            raise WaveThrottled(retry_after_seconds(res.headers.get("Retry-After")))
        if res.status_code >= 500:
            raise WaveUnavailable(f"Wave's contacts API answered {res.status_code}")
        if 300 <= res.status_code < 400:
            raise WaveError(f"Wave's contacts API answered {res.status_code}, a redirect{_target(res)}, which is not "
                            f"followed: WAVE_API_BASE_URL must name the API itself")
        if res.status_code != 200:
            raise WaveError(f"Wave's contacts API answered {res.status_code}: {res.text[:200]}")
        try:
            body = res.json()
            data, next_cursor = body["data"], body.get("next_cursor")
        except (ValueError, KeyError, TypeError) as exc:
            raise WaveError("Wave's contacts API sent an unreadable page") from exc
        if not isinstance(data, list) or (next_cursor is not None and not isinstance(next_cursor, str)):
            raise WaveError("Wave's contacts API sent an unreadable page")
        return Page(data, next_cursor or None)


def _target(res: requests.Response) -> str:
    """Where a redirect points, scheme and host only (its userinfo, path or query could carry anything)."""
    location = urlsplit(res.headers.get("Location") or "")
    return f" to {location.scheme}://{location.hostname}" if location.scheme and location.hostname else ""
