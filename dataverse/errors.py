"""Typed Dataverse errors, derived from the real HTTP status and error code
(https://learn.microsoft.com/power-apps/developer/data-platform/reference/web-service-error-codes,
https://learn.microsoft.com/power-apps/developer/data-platform/webapi/compose-http-requests-handle-errors).

    DataverseError            base; .status, .code (hex string or ""), .category, readable str()
    ├── Throttled             429; .retry_after seconds (Retry-After), reschedule the work that long
    │   └── Busy              not sent: this instance's share of the user's concurrent requests is in flight
    ├── AuthExpired           401 even after a forced token refresh; the connection needs attention
    ├── PermissionDenied      403; .privilege (e.g. "prvCreateContact") when Dataverse names it
    ├── ValidationFailed      400-class; .field (column) when Dataverse names it, .code
    ├── NotFound              404; .entity ("contact", "systemuser", ...) when named
    ├── Conflict              412 (etag mismatch, duplicate key) and 500 0x80040333 (duplicate detection)
    └── Transient             5xx, dropped connections, timeouts: safe to retry later

Every `category` is a short stable word for the connection status's failure categories. Messages
carry Dataverse's own text, never a token.
"""

from __future__ import annotations

import json
import re
from typing import Any

from core.errors import AppError
from core.retry_after import retry_after_seconds

_PRIVILEGE_RE = re.compile(r"missing (prv\w+) privilege")
_ATTRIBUTE_RE = re.compile(r"The length of the '([^']+)' attribute")
_PROPERTY_RE = re.compile(r"propert(?:y|ies)(?: named)? '([^']+)'")
_ENTITY_RE = re.compile(r"^(\w+) With Id = ")
DUPLICATE_DETECTED = "0x80040333"
EXECUTION_TIME_LIMIT = "0x80072321"
THROTTLE_CODES = {"0x80072322": "requests", EXECUTION_TIME_LIMIT: "execution time", "0x80072326": "concurrency"}


class DataverseError(AppError):
    category = "dataverse"

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        parts = [str(self.status) if self.status else None, self.code or None, self.message]
        return " ".join(p for p in parts if p)


class Throttled(DataverseError):
    category = "throttled"

    def __init__(self, message: str, *, retry_after: float, status: int | None = 429, code: str = "") -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after

    @property
    def limit(self) -> str | None:
        """Which service-protection limit was hit: requests, execution time or concurrency."""
        return THROTTLE_CODES.get(self.code)


class Busy(Throttled):
    """Not sent, no penalty: the requests this instance may have in flight to the user are all in flight
    (dataverse/budget.py). The work comes back after `retry_after`, like a throttled one."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, status=None)


class AuthExpired(DataverseError):
    category = "auth"


class PermissionDenied(DataverseError):
    category = "permission"

    def __init__(self, message: str, *, privilege: str | None = None, status: int | None = 403,
                 code: str = "") -> None:
        super().__init__(message, status=status, code=code)
        self.privilege = privilege


class ValidationFailed(DataverseError):
    category = "validation"

    def __init__(self, message: str, *, field: str | None = None, status: int | None = 400, code: str = "") -> None:
        super().__init__(message, status=status, code=code)
        self.field = field


class NotFound(DataverseError):
    category = "not_found"

    def __init__(self, message: str, *, entity: str | None = None, status: int | None = 404, code: str = "") -> None:
        super().__init__(message, status=status, code=code)
        self.entity = entity


class Conflict(DataverseError):
    category = "conflict"


class Transient(DataverseError):
    category = "transient"


def parse_error_body(body: bytes | str | None) -> tuple[str, str]:
    """(code, message) from `{"error":{"code","message"}}`; a non-JSON body yields its first 200 chars."""
    if not body:
        return "", ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data: Any = json.loads(text)
        error = data["error"]
        return str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", text.strip()[:200]


def error_for(status: int, body: bytes | str | None, headers: dict[str, str] | None = None) -> DataverseError:
    """The typed error for a failed response (status, body, headers)."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    code, message = parse_error_body(body)
    message = message or f"HTTP {status}"
    if status == 429:
        return Throttled(message, retry_after=retry_after_seconds(headers.get("retry-after")), code=code)
    if status == 401:
        return AuthExpired(message, status=status, code=code)
    if status == 403:
        match = _PRIVILEGE_RE.search(message)
        return PermissionDenied(message, privilege=match.group(1) if match else None, code=code)
    if status == 404:
        match = _ENTITY_RE.match(message)
        return NotFound(message, entity=match.group(1) if match else None, code=code)
    if status == 412 or code == DUPLICATE_DETECTED:
        return Conflict(message, status=status, code=code)
    if status >= 500 or status == 408:
        return Transient(message, status=status, code=code)
    match = _ATTRIBUTE_RE.search(message) or _PROPERTY_RE.search(message)
    field = match.group(1) if match else ("ownerid" if "ownerid" in message or "user(Id" in message else None)
    return ValidationFailed(message, field=field, status=status, code=code)
