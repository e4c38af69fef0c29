"""Where the admin's browser goes after sign-in: only under one of WAVE_RETURN_URL_PREFIXES.

Compared as parsed URLs (scheme, host and port exactly, then the path prefix), never as strings, so
`https://app.wave.test.evil.com/` or `https://app.wave.test@evil.com/` never pass for
`https://app.wave.test/`, and `..` segments cannot climb out of the allowed path.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from core.errors import FieldError

_DEFAULT_PORTS = {"https": 443, "http": 80}


class InvalidReturnUrl(FieldError):
    code = "invalid_return_url"
    field = "return_url"


def _origin_and_path(url: str) -> tuple[str, str, int, str] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None or "@" in parts.netloc:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], parts.path or "/"


def validate_return_url(raw: object, prefixes: tuple[str, ...]) -> str | None:
    """The return URL unchanged if it is allowed; None when absent; InvalidReturnUrl otherwise."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str) or len(raw) > 2000:
        raise InvalidReturnUrl("return_url must be a URL string of at most 2000 characters")
    if not raw.isascii() or any(ord(c) < 0x21 or c == "\x7f" for c in raw) or "\\" in raw:
        raise InvalidReturnUrl("return_url must be a plain ASCII URL without spaces, control characters or "
                               "backslashes")
    given = _origin_and_path(raw)
    if given is None:
        raise InvalidReturnUrl("return_url must be an absolute http(s) URL without credentials")
    segments = unquote(given[3]).split("/")
    if any(s in (".", "..") for s in segments):
        raise InvalidReturnUrl("return_url must not contain '.' or '..' path segments")
    for prefix in prefixes:
        allowed = _origin_and_path(prefix)
        if allowed is None or allowed[:3] != given[:3]:
            continue
        base = allowed[3]
        if given[3] == base or given[3].startswith(base if base.endswith("/") else base + "/"):
            return raw
    raise InvalidReturnUrl("return_url is not under an allowed Wave address")


def with_result(url: str, **params: str) -> str:
    """`url` with `params` added to its query (existing parameters kept, ours replacing same-named ones)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += list(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
