"""Wave webhook signatures: `Wave-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]` (README "Webhook contract").

`hex = HMAC-SHA256(key=secret, msg=f"{t}." + raw body)`. Several `v1` entries may appear while Wave
rotates its secret, and the app may hold several secrets; any match over the raw bytes is accepted.
Pure functions: the clock is an argument.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from core.errors import AppError

HEADER = "Wave-Signature"
TOLERANCE_SECONDS = 300
# Bounds the work an attacker can cause with one request (entries x secrets HMACs).
MAX_SIGNATURES = 8
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")


class SignatureError(AppError):
    """The request is not signed by Wave (or too old); the message says why, without any secret."""


def sign(body: bytes, secret: str, timestamp: int) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secrets: list[str] | tuple[str, ...], timestamp: int) -> str:
    """The header Wave sends: one `v1` per secret it currently signs with."""
    return ",".join([f"t={timestamp}", *(f"v1={sign(body, s, timestamp)}" for s in secrets)])


def parse_header(header: str | None) -> tuple[int, list[str]]:
    if not header:
        raise SignatureError(f"missing {HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SignatureError(f"malformed {HEADER} header")
        if key == "t":
            if timestamp is not None or not _DIGITS.fullmatch(value):
                raise SignatureError(f"malformed {HEADER} timestamp")
            timestamp = int(value)
        elif key == "v1" and _HEX64.fullmatch(value.lower()):
            candidates.append(value.lower())
        # other schemes (v0, future versions) are ignored, as Wave's docs would have them
    if timestamp is None:
        raise SignatureError(f"{HEADER} header has no timestamp")
    if not candidates:
        raise SignatureError(f"{HEADER} header has no v1 signature")
    if len(candidates) > MAX_SIGNATURES:
        raise SignatureError(f"{HEADER} header has too many signatures")
    return timestamp, candidates


def verify(header: str | None, body: bytes, secrets: tuple[str, ...] | list[str], now: float,
           tolerance: int = TOLERANCE_SECONDS) -> int:
    """Return the signed timestamp, or raise SignatureError."""
    timestamp, candidates = parse_header(header)
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"{HEADER} timestamp is outside the {tolerance} s tolerance")
    matched = False
    for secret in secrets:
        expected = sign(body, secret, timestamp)
        for candidate in candidates:
            # no early exit: the time taken does not depend on which entry matched
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError(f"{HEADER} does not match the body")
    return timestamp
