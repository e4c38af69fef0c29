"""The Dataverse Web API request loop: every call of dataverse/client.py goes through `Transport.request`.

One pooled HTTP session (a `requests.Session`, or anything with its `request` method: tests pass a fake),
(connect, read) timeouts on every request, and these rules:

- a 401 forces one token refresh and one retry, then raises AuthExpired;
- a 429 whose Retry-After is at most `max_inline_wait` seconds is waited out inline (a few times; not when
  the caller waits itself: `Budget.caller_waits`), a longer one raises Throttled(retry_after) so the caller
  can reschedule its queue message instead of holding a function instance. Until a 429's Retry-After has
  passed, nothing is sent to the user (a request during the penalty would only extend it: service
  protection counts per user,
  https://learn.microsoft.com/power-apps/developer/data-platform/api-limits): each caller waits the rest
  inline under the same rule or raises Throttled without sending. The penalty lives in the user's
  `Budget` (dataverse/budget.py), which every instance of the app shares;
- every request holds one of this instance's slots of the user's concurrency (`Budget.slot`): when none
  frees within `max_inline_wait`, Busy (a Throttled) is raised without sending;
- 5xx, dropped connections and timeouts are retried `transient_retries` times, then raise Transient. Every
  write of the client is idempotent (upserts by a deterministic id), which is what makes this safe;
- `x-ms-dop-hint`, the degree of parallelism Dataverse recommends
  (https://learn.microsoft.com/power-apps/developer/data-platform/send-parallel-requests), is kept in
  `dop_hint` and handed to the budget, which caps the user's requests in flight by it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypedDict
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from core.retry_after import retry_after_seconds
from dataverse.budget import Budget, NoSlot
from dataverse.errors import (
    EXECUTION_TIME_LIMIT,
    Busy,
    DataverseError,
    Throttled,
    Transient,
    error_for,
    parse_error_body,
)
from dataverse.odata import encode_query

log = logging.getLogger("dataverse")
API_PATH = "/api/data/v9.2/"
TRANSIENT_PAUSE_SECONDS = 0.2  # times the retry's number: a dropped connection is retried almost at once
# A JSON body as the client builds it (json.dumps of dicts, lists and scalars).
JsonBody = Mapping[str, object]


class TokenProvider(Protocol):
    def __call__(self, force_refresh: bool = False) -> str: ...


class HttpSession(Protocol):
    """What the transport uses of `requests.Session`."""

    def request(self, method: str, url: str, *, data: bytes | None, headers: Mapping[str, str],
                timeout: tuple[float, float], verify: str | bool, allow_redirects: bool) -> requests.Response: ...

    def close(self) -> None: ...


class TransportOptions(TypedDict, total=False):
    """Transport's keyword arguments, which DataverseClient passes on."""

    session: HttpSession | None
    verify: str | bool
    timeout: tuple[float, float]
    max_inline_wait: float
    max_throttle_retries: int
    transient_retries: int
    pool_size: int
    sleep: Callable[[float], None]
    clock: Callable[[], float]
    user_agent: str
    budget: Budget | None


def pooled_session(pool_size: int, user_agent: str) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update({"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0",
                            "User-Agent": user_agent})
    return session


class Transport:
    def __init__(
        self,
        instance_url: str,
        token_provider: TokenProvider | Callable[..., str],
        *,
        session: HttpSession | None = None,
        verify: str | bool = True,
        timeout: tuple[float, float] = (5.0, 60.0),
        max_inline_wait: float = 2.0,
        max_throttle_retries: int = 3,
        transient_retries: int = 1,
        pool_size: int = 16,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        user_agent: str = "wave-dynamics365-sync/1",
        budget: Budget | None = None,
    ) -> None:
        parts = urlsplit(instance_url)
        self.instance_url = f"{parts.scheme}://{parts.netloc}"
        self.api_url = self.instance_url + API_PATH
        self._token_provider = token_provider
        self.verify = verify
        self.timeout = timeout
        self.max_inline_wait = max_inline_wait
        self.max_throttle_retries = max_throttle_retries
        self.transient_retries = transient_retries
        self._sleep = sleep
        # the user's penalties and concurrency: shared with the other instances when the caller hands one in
        self.budget = budget if budget is not None else Budget(clock=clock)
        self.dop_hint: int | None = None
        self._session: HttpSession = session if session is not None else pooled_session(pool_size, user_agent)
        self._local = threading.local()

    def close(self) -> None:
        self._session.close()

    @property
    def requests_made(self) -> int:
        """HTTP requests this thread has sent through this transport (retries included)."""
        count: int = getattr(self._local, "count", 0)
        return count

    def _token(self, force: bool) -> str:
        return self._token_provider(force_refresh=True) if force else self._token_provider()

    def _url(self, path: str, params: Mapping[str, str] | None) -> str:
        if path.startswith(("http://", "https://")):
            # An absolute URL comes from the service (@odata.nextLink): never send the token elsewhere.
            if not path.startswith(self.api_url):
                raise DataverseError(f"refusing to follow a link outside the instance: {urlsplit(path).netloc}")
            url = path
        else:
            url = self.api_url + path
        return url + "?" + encode_query(dict(params)) if params else url

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: JsonBody | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        rows: int = 0,
    ) -> requests.Response:
        """One Web API call with the rules of the module docstring; raises a DataverseError subclass. `rows`:
        the rows a bulk request writes, for the budget's log (dataverse/lease.py paced_until)."""
        url = self._url(path, params)
        where = f"{method} {urlsplit(url).path}"
        send_headers = dict(headers or {})
        if "If-Match" not in send_headers and "If-None-Match" not in send_headers:
            send_headers["If-None-Match"] = "null"
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            send_headers.setdefault("Content-Type", "application/json")
        refreshed = force_refresh = False
        throttled = transient = 0
        waited = False
        while True:
            left = self.budget.remaining(fresh=waited)
            waited = False
            if left > 0:
                inline = 0.0 if self.budget.caller_waiting else self.max_inline_wait
                turn = self.budget.turn(inline) if throttled < self.max_throttle_retries else left
                if turn > inline or throttled >= self.max_throttle_retries:
                    raise Throttled(f"{where}: held back while Dataverse throttles this user", retry_after=turn)
                throttled += 1
                self._sleep(turn)
                waited = True
                continue
            send_headers["Authorization"] = "Bearer " + self._token(force_refresh)
            force_refresh = False
            try:
                with self.budget.slot(self.max_inline_wait), self.budget.in_turn(rows):
                    if self.budget.remaining() > 0:
                        sent = None  # a request sent while this one waited its turn met a penalty
                    else:
                        self._local.count = self.requests_made + 1
                        sent = self._session.request(method, url, data=data, headers=send_headers,
                                                     timeout=self.timeout, verify=self.verify, allow_redirects=False)
                        if sent.status_code == 429:  # noted before the turn passes on (Budget.in_turn)
                            limit, _ = parse_error_body(sent.content)
                            self.budget.note(retry_after_seconds(sent.headers.get("Retry-After")),
                                             execution_time=limit == EXECUTION_TIME_LIMIT)
                        else:
                            self.budget.answered()
            except NoSlot as busy:
                raise Busy(f"{where}: held back: {busy}", retry_after=busy.retry_after) from None
            except requests.exceptions.SSLError:
                # Not transient: the instance's certificate is not trusted (wrong CA bundle or interception).
                raise DataverseError(f"{where}: TLS certificate verification failed") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                if transient < self.transient_retries:
                    transient += 1
                    self._sleep(TRANSIENT_PAUSE_SECONDS * transient)
                    continue
                raise Transient(f"{where}: {type(exc).__name__}") from None
            if sent is None:
                continue  # the top of the loop holds it back
            resp = sent
            hint = resp.headers.get("x-ms-dop-hint")
            if hint and hint.isdigit():
                self.dop_hint = int(hint)
                self.budget.note_dop_hint(self.dop_hint)
            status = resp.status_code
            if status < 400 or status == 304:
                return resp
            if status == 401 and not refreshed:
                refreshed = force_refresh = True
                continue
            if status == 429:
                wait = retry_after_seconds(resp.headers.get("Retry-After"))
                inline = not self.budget.caller_waiting
                if inline and wait <= self.max_inline_wait and throttled < self.max_throttle_retries:
                    log.info("Dataverse throttled %s; waiting %.1f s inline", where, wait)
                    continue  # the top of the loop waits the penalty out
            error = error_for(status, resp.content, dict(resp.headers))
            if isinstance(error, Transient) and transient < self.transient_retries:
                transient += 1
                self._sleep(TRANSIENT_PAUSE_SECONDS * transient)
                continue
            raise error

    def get_all(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """A collection query, following @odata.nextLink."""
        rows: list[dict[str, Any]] = []
        headers = {"Prefer": "odata.maxpagesize=5000"}
        data = self.request("GET", path, params=params, headers=headers).json()
        rows += data.get("value", [])
        while data.get("@odata.nextLink"):
            data = self.request("GET", data["@odata.nextLink"], headers=headers).json()
            rows += data.get("value", [])
        return rows
