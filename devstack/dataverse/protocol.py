"""Wire-level types shared by the simulator's modules: settings, one request, one response, URL segments."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from devstack.dataverse.errors import SimError
from devstack.dataverse.odata import query_error

API_PREFIX = "/api/data/v9.2/"
JSON = "application/json; odata.metadata=minimal"
BULK_MESSAGES = ("CreateMultiple", "UpdateMultiple", "UpsertMultiple")


@dataclass
class SimConfig:
    dop_hint: int = 8
    base_ms: float = 5.0  # simulated execution time of any request (or of each request inside a $batch)
    per_record_ms: float = 10.0  # plus this per row written
    per_read_row_ms: float = 0.05
    sleep_fraction: float = 0.0  # really sleep this fraction of the simulated execution time
    bulk_messages: set[str] = field(default_factory=lambda: set(BULK_MESSAGES))
    max_batch_requests: int = 1000
    max_url_length: int = 32768
    max_page_size: int = 5000
    odata_lexer: str = "strict"  # how `[...]` in $filter is lexed: odata.LEXERS ("7.6", "7.7", or what both accept)
    check_audience: bool = False
    auto_create_users: bool = True
    authorization_uri: str = "https://login.microsoftonline.com/common/oauth2/authorize"


@dataclass
class Request:
    method: str
    target: str  # path after the API prefix, with its query string
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self.path = unquote(parts.path)
        self.raw_query = parts.query
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise SimError(400, "0x80048d19", "The request body is not valid JSON.") from None

    def prefers(self) -> dict[str, str]:
        prefs = {}
        for item in self.headers.get("prefer", "").split(","):
            name, _, value = item.strip().partition("=")
            if name:
                prefs[name.strip().lower()] = value.strip().strip('"')
        return prefs


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    writes: int = 0
    reads: int = 0
    inner_requests: int = 0
    written: tuple[str, ...] = ()  # a bulk write's contactids, for the request log (tests and benchmarks)
    exec_ms: float = 0.0  # simulated execution time, filled in by the server
    user: str | None = None
    during_penalty: bool = False  # a 429 for a request sent while its user was in penalty (for the request log)

    @classmethod
    def of_json(cls, status: int, data: Any, **kw: Any) -> Response:
        return cls(status, {"Content-Type": JSON, "OData-Version": "4.0"}, json.dumps(data).encode(), **kw)

    @classmethod
    def of_error(cls, err: SimError) -> Response:
        return cls(err.status, {"Content-Type": JSON, "OData-Version": "4.0", **err.headers},
                   json.dumps(err.body()).encode())


def split_segments(path: str) -> list[tuple[str, str | None]]:
    """'contacts(a=\'x/y\')/Microsoft.X' -> [('contacts', "a='x/y'"), ('Microsoft.X', None)], quote-aware."""
    segments, i, n = [], 0, len(path)
    while i < n:
        j = i
        while j < n and path[j] not in "(/":
            j += 1
        name, key = path[i:j], None
        if j < n and path[j] == "(":
            depth, k, quoted = 0, j, False
            while k < n:
                ch = path[k]
                if ch == "'":
                    quoted = not quoted
                elif not quoted and ch == "(":
                    depth += 1
                elif not quoted and ch == ")":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            if k >= n:
                raise query_error(f"Bad Request - Error in query syntax: unbalanced parentheses in '{path}'.")
            key, j = path[j + 1 : k], k + 1
        segments.append((name, key))
        if j < n and path[j] == "/":
            j += 1
        elif j < n:
            raise query_error(f"Bad Request - Error in query syntax in '{path}'.")
        i = j
    return segments


def segment_not_found(name: str) -> SimError:
    return SimError(404, "0x80060888", f"Resource not found for the segment '{name}'.")
