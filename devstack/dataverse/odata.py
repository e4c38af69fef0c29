"""The OData subset the simulator understands: $filter expressions, key segments and literals.

$filter: eq ne gt ge lt le, and or not, parentheses, contains/startswith/endswith, the
Microsoft.Dynamics.CRM.In function, string literals with '' escaping, numbers, GUIDs, true/false/null,
and navigation paths such as sdkmessageid/name. String comparisons are case-insensitive, as in Dataverse.

Array literals (`[...]`, the PropertyValues of Microsoft.Dynamics.CRM.In) are found the way ODataLib's
ExpressionLexer finds them (src/Microsoft.OData.Core/UriParser/ExpressionLexer.cs in github.com/OData/odata.net,
AdvanceThroughBalancedExpression) and only then read as JSON, so that a value which would end the
array early, or leave it unbalanced, in Dataverse gets the same 400 here. Which ODataLib release Dataverse
runs is not published: `LEXERS` has the two behaviours, and the default `strict` refuses what either refuses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devstack.dataverse.errors import SimError

GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}
_STRING_FUNCS = {"contains", "startswith", "endswith"}
IN_FUNC = "Microsoft.Dynamics.CRM.In"
# "7.6": ODataLib before 7.7.0 skips from one ' to the next anywhere inside brackets; "7.7": since 7.7.0
# (odata.net commit 90cf738, May 2020) not inside a double-quoted string, where a " after a backslash
# does not end the string. Both count every [ and ], quoted or not.
LEXERS = ("strict", "7.6", "7.7")


def query_error(message: str) -> SimError:
    return SimError(400, "0x80060888", message)


@dataclass(frozen=True)
class Token:
    kind: str  # str, num, guid, word, sym, json
    value: Any
    pos: int


def bracket_end(text: str, start: int, double_quote_aware: bool, quoted: bool = False) -> tuple[int, bool]:
    """(index after the `]` that closes the `[` at `start`, whether a double-quoted string is open then).

    A transcription of ExpressionLexer.AdvanceThroughBalancedExpression('[', ']'): `quoted` is the lexer's
    parsingDoubleQuotedString, which it keeps from one array to the next.
    """
    depth, i, n = 1, start + 1, len(text)
    while depth > 0:
        ch = text[i] if i < n else None
        if ch == '"' and double_quote_aware and text[i - 1] != "\\":
            quoted = not quoted
        if ch == "'" and not quoted:
            i += 1  # AdvanceToNextOccurenceOf('\''): on to the next quote or the end
            while i < n and text[i] != "'":
                i += 1
            ch = text[i] if i < n else None
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch is None:
            raise query_error("Found an unbalanced bracket expression.")
        i += 1
    return i, quoted


_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "/": "/"}
_ATOM = re.compile(r"\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)")


def read_array(text: str) -> list[Any]:
    """An array of primitives as ODataLib's JsonReader reads it (src/Microsoft.OData.Core/Json/JsonReader.cs):
    JSON, but strings may also be single-quoted (Microsoft's own example of the In function has
    `['value','value']`) and `\\'` is an escape. ValueError when it is not one."""
    i, n, values = 0, len(text), []

    def skip(at: int) -> int:
        while at < n and text[at].isspace():
            at += 1
        return at

    def string(at: int) -> tuple[str, int]:
        quote, at, units = text[at], at + 1, []
        while True:
            if at >= n:
                raise ValueError("unterminated string")
            ch = text[at]
            if ch == quote:
                # \uXXXX gives UTF-16 code units: a pair makes one character, a lone one stays as it is.
                return "".join(units).encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass"), at + 1
            if ch == "\\":
                code = text[at + 1 : at + 2]
                if code == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[at + 2 : at + 6]):
                    units.append(chr(int(text[at + 2 : at + 6], 16)))
                    at += 6
                    continue
                if code not in _ESCAPES:
                    raise ValueError(f"unrecognized escape \\{code}")
                units.append(_ESCAPES[code])
                at += 2
                continue
            units.append(ch)
            at += 1

    i = skip(i)
    if i >= n or text[i] != "[":
        raise ValueError("not an array")
    i = skip(i + 1)
    if i < n and text[i] == "]":
        if skip(i + 1) != n:
            raise ValueError("text after the array")
        return []
    while True:
        i = skip(i)
        if i < n and text[i] in "\"'":
            value, i = string(i)
        elif match := _ATOM.match(text, i):
            value = json.loads(match.group(1))
            i = match.end()
        else:
            raise ValueError("not a primitive value")
        values.append(value)
        i = skip(i)
        if i < n and text[i] == ",":
            i += 1
            continue
        if i < n and text[i] == "]" and skip(i + 1) == n:
            return values
        raise ValueError("expected , or ]")


def tokenize(text: str, lexer: str = "strict") -> list[Token]:
    if lexer not in LEXERS:
        raise ValueError(f"unknown lexer {lexer!r}; one of {LEXERS}")
    tokens: list[Token] = []
    quoted = {"7.6": False, "7.7": False}  # the 7.7 lexer's parsingDoubleQuotedString (7.6 has none)
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "'":
            start, i, buf = i, i + 1, []
            while True:
                if i >= n:
                    raise query_error(f"There is an unterminated literal at position {n} in '{text}'.")
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        buf.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(text[i])
                i += 1
            tokens.append(Token("str", "".join(buf), start))
        elif ch == "[":
            ends = set()
            for version in (("7.6", "7.7") if lexer == "strict" else (lexer,)):
                end, quoted[version] = bracket_end(text, i, version == "7.7", quoted[version])
                ends.add(end)
            if len(ends) != 1:  # the two releases would read different arrays: one of them fails
                raise query_error(f"Syntax error: invalid array literal at position {i} in '{text}'.")
            end = ends.pop()
            # Then the bracketed text, and only it, is read as JSON (ODataUriUtils.ConvertFromUriLiteral).
            try:
                value = read_array(text[i:end])
            except ValueError:
                raise query_error(f"Syntax error: invalid array literal at position {i} in '{text}'.") from None
            tokens.append(Token("json", value, i))
            i = end
        elif ch in "(),=":
            tokens.append(Token("sym", ch, i))
            i += 1
        elif match := GUID_RE.match(text, i):
            tokens.append(Token("guid", match.group(0).lower(), i))
            i = match.end()
        elif match := re.compile(r"-?\d+(\.\d+)?").match(text, i):
            literal = match.group(0)
            tokens.append(Token("num", float(literal) if "." in literal else int(literal), i))
            i = match.end()
        elif match := re.compile(r"[A-Za-z_@][A-Za-z0-9_./]*").match(text, i):
            tokens.append(Token("word", match.group(0), i))
            i = match.end()
        else:
            raise query_error(f"Syntax error: character '{ch}' is not valid at position {i} in '{text}'.")
    return tokens


Predicate = Callable[[dict[str, Any]], bool]


def _with_index(predicate: Predicate, index: tuple[str, frozenset] | None) -> Predicate:
    """Attach an index hint: (column, folded values) such that every matching row has one of the values."""
    predicate.index = index  # type: ignore[attr-defined]
    return predicate


def index_hint(predicate: Predicate) -> tuple[str, frozenset] | None:
    """For a filter like `col eq 'x'`, `In(col, [...])`, or an `and`/`or` of them: (col, folded values)."""
    return getattr(predicate, "index", None)


def _fold(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def _compare(op: str, left: Any, right: Any) -> bool:
    left, right = _fold(left), _fold(right)
    if op == "eq":
        return left == right
    if op == "ne":
        return left != right
    if left is None or right is None:
        return False
    try:
        return {"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[op]
    except TypeError:
        return False


class FilterParser:
    """Recursive descent over the token list; `resolve(row, path)` reads a property (validating names)."""

    def __init__(self, text: str, check_property: Callable[[str], None], lexer: str = "strict") -> None:
        self.text = text
        self.tokens = tokenize(text, lexer)
        self.i = 0
        self.check_property = check_property

    def parse(self) -> Predicate:
        if not self.tokens:
            raise query_error("The $filter expression is empty.")
        predicate = self._or()
        if self.i < len(self.tokens):
            tok = self.tokens[self.i]
            raise query_error(f"Syntax error at position {tok.pos} in '{self.text}'.")
        return predicate

    def _peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, kind: str | None = None, value: Any = None) -> Token:
        tok = self._peek()
        if tok is None or (kind and tok.kind != kind) or (value is not None and tok.value != value):
            where = tok.pos if tok else len(self.text)
            raise query_error(f"Syntax error at position {where} in '{self.text}'.")
        self.i += 1
        return tok

    def _is_word(self, *words: str) -> bool:
        tok = self._peek()
        return tok is not None and tok.kind == "word" and tok.value in words

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._is_word("or"):
            self.i += 1
            parts.append(self._and())
        if len(parts) == 1:
            return parts[0]
        hints = [index_hint(p) for p in parts]
        same_column = all(h is not None and h[0] == hints[0][0] for h in hints)  # type: ignore[index]
        union = (hints[0][0], frozenset().union(*(h[1] for h in hints))) if same_column else None  # type: ignore
        return _with_index(lambda row: any(p(row) for p in parts), union)

    def _and(self) -> Predicate:
        parts = [self._unary()]
        while self._is_word("and"):
            self.i += 1
            parts.append(self._unary())
        if len(parts) == 1:
            return parts[0]
        hint = next((index_hint(p) for p in parts if index_hint(p) is not None), None)
        return _with_index(lambda row: all(p(row) for p in parts), hint)

    def _unary(self) -> Predicate:
        if self._is_word("not"):
            self.i += 1
            inner = self._unary()
            return lambda row: not inner(row)
        return self._primary()

    def _literal(self) -> Any:
        tok = self._take()
        if tok.kind in ("str", "num", "guid", "json"):
            return tok.value
        if tok.kind == "word" and tok.value in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[tok.value]
        raise query_error(f"Syntax error at position {tok.pos} in '{self.text}'.")

    def _path(self) -> str:
        tok = self._take("word")
        self.check_property(tok.value)
        return tok.value

    def _primary(self) -> Predicate:
        tok = self._peek()
        if tok is not None and tok.kind == "sym" and tok.value == "(":
            self.i += 1
            inner = self._or()
            self._take("sym", ")")
            return inner
        if tok is not None and tok.kind == "word" and tok.value in _STRING_FUNCS:
            return self._string_function()
        if tok is not None and tok.kind == "word" and tok.value == IN_FUNC:
            return self._in_function()
        path = self._path()
        op = self._take("word")
        if op.value not in _COMPARE:
            raise query_error(f"Syntax error at position {op.pos} in '{self.text}'.")
        value = self._literal()
        hint = (path, frozenset({_fold(value)})) if op.value == "eq" and isinstance(value, str) else None
        return _with_index(lambda row: _compare(op.value, resolve(row, path), value), hint)

    def _string_function(self) -> Predicate:
        name = self._take("word").value
        self._take("sym", "(")
        path = self._path()
        self._take("sym", ",")
        value = self._literal()
        self._take("sym", ")")
        if not isinstance(value, str):
            raise query_error(f"The second argument of '{name}' must be a string.")
        needle = value.casefold()

        def check(row: dict[str, Any]) -> bool:
            have = resolve(row, path)
            if not isinstance(have, str):
                return False
            have = have.casefold()
            return {"contains": needle in have, "startswith": have.startswith(needle),
                    "endswith": have.endswith(needle)}[name]

        return check

    def _in_function(self) -> Predicate:
        self._take("word")
        self._take("sym", "(")
        args: dict[str, Any] = {}
        while True:
            key = self._take("word").value
            self._take("sym", "=")
            args[key] = self._literal()
            if self._is_sym(")"):
                self.i += 1
                break
            self._take("sym", ",")
        prop, values = args.get("PropertyName"), args.get("PropertyValues")
        if not isinstance(prop, str) or not isinstance(values, list):
            raise query_error("Microsoft.Dynamics.CRM.In requires PropertyName and PropertyValues.")
        self.check_property(prop)
        wanted = {_fold(v) for v in values}
        hint = (prop, frozenset(wanted)) if all(isinstance(v, str) for v in wanted) else None
        return _with_index(lambda row: _fold(resolve(row, prop)) in wanted, hint)

    def _is_sym(self, value: str) -> bool:
        tok = self._peek()
        return tok is not None and tok.kind == "sym" and tok.value == value


def resolve(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("/"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def parse_filter(text: str, check_property: Callable[[str], None], lexer: str = "strict") -> Predicate:
    return FilterParser(text, check_property, lexer).parse()


def parse_key(segment: str) -> dict[str, Any]:
    """The inside of `contacts(...)`: a bare GUID, or `name=value` pairs (string values single-quoted)."""
    segment = segment.strip()
    if GUID_RE.fullmatch(segment):
        return {"": segment.lower()}
    tokens = tokenize(segment)
    key: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        if i + 2 >= len(tokens) or tokens[i].kind != "word" or tokens[i + 1].value != "=":
            raise query_error(f"Bad key segment '{segment}'.")
        value_tok = tokens[i + 2]
        if value_tok.kind not in ("str", "num", "guid"):
            raise query_error(f"Bad key segment '{segment}'.")
        key[tokens[i].value] = value_tok.value
        i += 3
        if i < len(tokens):
            if tokens[i].value != ",":
                raise query_error(f"Bad key segment '{segment}'.")
            i += 1
    if not key:
        raise query_error(f"Bad key segment '{segment}'.")
    return key


def format_key(key: dict[str, Any]) -> str:
    """A key back in URL form: contacts(<guid>) or contacts(name='value')."""
    if list(key) == [""]:
        return str(key[""])
    parts = []
    for name, value in key.items():
        literal = "'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(value)
        parts.append(f"{name}={literal}")
    return ",".join(parts)
