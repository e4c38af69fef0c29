"""Structured, secret-free logging.

One JSON line per handled request or message (Application Insights collects Python logging in Azure).
A filter on the root logger masks bearer tokens, JWTs, OAuth codes and every registered secret value,
as a last line of defence: code should never pass a secret to a logger in the first place.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

_MASK = "[redacted]"
_PATTERNS = (
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer " + _MASK),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), _MASK),
    (
        re.compile(
            r"(?i)\b(code|access_token|refresh_token|id_token|client_secret|code_verifier|v1)=[^&\s,;\"']+"
        ),
        r"\1=" + _MASK,
    ),
    (
        re.compile(
            r'(?i)(\\?")(access_token|refresh_token|id_token|client_secret|secret|code_verifier|code)\\?"\s*:\s*\\?"[^"\\]*\\?"'
        ),
        r"\1\2\1: \1" + _MASK + r"\1",
    ),
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(*values: str | None) -> None:
    """Values (client secrets, API tokens) that must never appear in a log line."""
    with _secrets_lock:
        _secrets.update(v for v in values if v and len(v) >= 6)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, _MASK)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


_installed = False


def install_redaction() -> None:
    """Redact every record as it is created, whichever logger or handler it goes to."""
    global _installed
    if _installed:
        return
    flt = RedactingFilter()
    old_factory = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def outcome(logger: logging.Logger, kind: str, result: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line: what was handled, for which account, and how it ended."""
    line = {"kind": kind, "outcome": result, **{k: v for k, v in fields.items() if v is not None}}
    logger.log(level, json.dumps(line, default=str, sort_keys=True))


class Timer:
    """Milliseconds since construction, for the duration field of an outcome line."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    @property
    def ms(self) -> int:
        return int((time.perf_counter() - self._start) * 1000)
