"""OData query text for the Dataverse Web API: string literals, `Microsoft.Dynamics.CRM.In` arrays, the
query string as sent, and lookups chunked to fit a URL. Pure functions (tests/test_odata_query.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from urllib.parse import quote, urlencode


def odata_string(value: str) -> str:
    """An OData string literal: single quotes, embedded quotes doubled.

    https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query/filter-rows#use-single-quotes-in-filter-values
    """
    return "'" + value.replace("'", "''") + "'"


# Inside a `[...]` array literal ODataLib's lexer (ExpressionLexer.AdvanceThroughBalancedExpression in
# github.com/OData/odata.net) counts every `[` and `]`, also inside JSON strings; skips from one `'` to the
# next (before 7.7 also inside JSON strings); and takes a `"` after a backslash as escaped, so a value ending
# in `\` turns its idea of what is quoted upside down. None of those characters may appear literally, then:
# JSON's \uXXXX escapes say the same to the JSON reader that parses the array afterwards (RFC 8259 §7).
_JSON_ESCAPED = frozenset("\"'\\[]{}")


def json_string(value: str) -> str:
    """A JSON string for an OData array literal, with no character that ODataLib's lexer would act on."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in _JSON_ESCAPED or code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")  # lone surrogates too: they have no UTF-8 form for the URL
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def in_filter(prop: str, values: Sequence[str]) -> str:
    """`Microsoft.Dynamics.CRM.In` over string values.

    https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/in
    """
    items = ",".join(json_string(v) for v in values)
    return f"Microsoft.Dynamics.CRM.In(PropertyName={odata_string(prop)},PropertyValues=[{items}])"


_QUERY_SAFE = "$'(),=/:@*"


def encode_query(params: dict[str, str]) -> str:
    """A query string as the client sends it (percent-encoded UTF-8; `+` as %2B, never a space)."""
    return urlencode(params, quote_via=quote, safe=_QUERY_SAFE)


def encoded_length(text: str) -> int:
    """Length of `text` once percent-encoded in a query string, as encode_query sends it."""
    return len(quote(text, safe=_QUERY_SAFE))


def in_filter_chunks(values: Sequence[str], make_filter: Callable[[list[str]], str],
                     budget: int) -> Iterator[list[str]]:
    """Chunks of `values` whose `$filter=<make_filter(chunk)>`, escaped and URL-encoded, fits `budget`.

    The array's items are added up one by one (percent-encoding works per character, so the lengths add
    up exactly); a value too long on its own goes alone, as a request of its own.
    """
    fixed = len(encode_query({"$filter": make_filter([])}))
    chunk: list[str] = []
    size = fixed
    for value in values:
        item = encoded_length(json_string(value)) + (1 if chunk else 0)  # the comma before it
        if chunk and size + item > budget:
            yield chunk
            chunk, size, item = [], fixed, item - 1
        chunk.append(value)
        size += item
    if chunk:
        yield chunk
