"""The `Retry-After` header as seconds, for every client here (Dataverse's 429s, Wave's contacts API).

The header holds either a number of seconds or an HTTP date
(https://www.rfc-editor.org/rfc/rfc9110#section-10.2.3); Dataverse sends seconds
(https://learn.microsoft.com/power-apps/developer/data-platform/api-limits#retry-operations).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# What a 429 without a usable Retry-After waits: long enough not to extend a penalty by asking again at once.
DEFAULT_RETRY_AFTER = 5.0


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float:
    """Retry-After as seconds (never negative): a number, or an HTTP date; DEFAULT_RETRY_AFTER otherwise."""
    if not value:
        return DEFAULT_RETRY_AFTER
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - (now or datetime.now(UTC))).total_seconds())
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER
