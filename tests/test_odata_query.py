"""Pure: the OData query builders of sync/dataverse.py with hostile strings, read back by the simulator's
ODataLib-faithful lexer (devstack/dataverse/odata.py) after a URL round trip. No I/O."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import pytest

from dataverse.odata import encode_query, encoded_length, in_filter, in_filter_chunks, json_string, odata_string
from devstack.dataverse.errors import SimError
from devstack.dataverse.odata import LEXERS, parse_filter, tokenize

HOSTILE = [
    "o'brien@contoso.com", "'", "''", "'''", "a''b", '"', '""', 'say "hi"', "`",
    "\u2018\u2019\u201c\u201d\u201e\u00ab\u00bb",
    "%", "%27", "%%22", "#frag", "a&b=c", "+", "a+b", " ", "a b", "?x=1;y", "$filter", "/", "\\", "x\\", "\\\\",
    '\\"', "\\'", "\\u0027", "a]b", "[", "]", "[[", "]]", "{", "}", "(", ")", ",", "=", "a,b", "null", "true",
    "\t\n\r", "\x00\x01\x1f\x7f", "\u00a0\u2028\u2029", "é", "Zoë", "日本語", "😀", "\U0001f3f3\ufe0f\u200d\U0001f308",
    "\U00020000\U0002a6d6", "\U00030000", "\U000e0041\U000e007f", "\U000f0000\U0010fffd", "\ufeff\ufffd",
    "", "x" * 10_000, "'" * 2_000, "\\" * 2_000 + "'", "😀" * 3_000,
]


def url_round_trip(filter_text: str) -> str:
    """What the server sees: the query as dataverse.client sends it, then decoded as a query string."""
    return dict(parse_qsl(encode_query({"$filter": filter_text}), keep_blank_values=True))["$filter"]


def no_check(name: str) -> None:
    pass


@pytest.mark.parametrize("lexer", LEXERS)
def test_in_filter_reads_back_every_hostile_value_exactly(lexer: str) -> None:
    text = url_round_trip(in_filter("emailaddress1", HOSTILE))
    arrays = [t.value for t in tokenize(text, lexer) if t.kind == "json"]
    assert arrays == [HOSTILE]
    for value in HOSTILE:  # one at a time, so that no neighbour balances out a stray character
        single = [t.value for t in tokenize(url_round_trip(in_filter("x", [value])), lexer) if t.kind == "json"]
        assert single == [[value]], value


@pytest.mark.parametrize("value", HOSTILE)
def test_string_literal_reads_back_exactly(value: str) -> None:
    text = url_round_trip(f"internalemailaddress eq {odata_string(value)} and isdisabled eq false")
    strings = [t.value for t in tokenize(text) if t.kind == "str"]
    assert strings == [value]
    row = {"internalemailaddress": value, "isdisabled": False}
    assert parse_filter(text, no_check)(row)


def test_the_in_array_holds_no_character_odatalib_acts_on() -> None:
    for value in HOSTILE:
        inner = json_string(value)[1:-1]
        assert not set(inner) & set("'\"[]{}"), value
        assert "\\" not in inner.replace("\\u", ""), value  # every backslash starts a \uXXXX escape
        assert json.loads(json_string(value)) == value


@pytest.mark.parametrize("values", [["o'brien@contoso.com"], ["a]b"], ["[x"], ["x\\", "o'b"]])
def test_the_plain_json_form_is_refused_by_the_strict_lexer(values: list[str]) -> None:
    """What the client sent before: json.dumps inside the array. Real ODataLib answers 400 for these."""
    raw = f"Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues={json.dumps(values)})"
    with pytest.raises(SimError) as err:
        parse_filter(raw, no_check)
    assert err.value.status == 400
    assert parse_filter(in_filter("x", values), no_check)({"x": values[-1]})


def test_lexers_differ_where_odatalib_releases_differ() -> None:
    raw = """Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues=["o'brien"])"""
    assert parse_filter(raw, no_check, "7.7")({"x": "O'Brien"})  # 7.7 knows double-quoted strings
    with pytest.raises(SimError):
        parse_filter(raw, no_check, "7.6")
    two = """Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues=["a'b","c'd"])"""
    assert parse_filter(two, no_check, "7.6")({"x": "c'd"})  # the quotes pair up by luck
    with pytest.raises(SimError):
        parse_filter("""Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues=["a]b"])""", no_check, "7.7")


def filter_length(chunk: list[str], make_filter) -> int:
    return len(encode_query({"$filter": make_filter(chunk)}))


@pytest.mark.parametrize("budget", [300, 1_000, 16_000])
def test_chunks_fit_the_budget_counted_escaped_and_encoded(budget: int) -> None:
    def make(chunk: list[str]) -> str:
        return f"isdisabled eq false and {in_filter('internalemailaddress', chunk)}"

    values = [v for v in HOSTILE if encoded_length(json_string(v)) < budget // 2] * 3
    chunks = list(in_filter_chunks(values, make, budget))
    assert [v for c in chunks for v in c] == values  # nothing lost, nothing reordered
    for i, chunk in enumerate(chunks):
        assert filter_length(chunk, make) <= budget
        if i + 1 < len(chunks):  # and no chunk is cut earlier than it must be
            assert filter_length(chunk + chunks[i + 1][:1], make) > budget


def test_chunk_budget_counts_what_is_sent_not_the_raw_value() -> None:
    """400 apostrophes are 400 characters, but 3,200 once escaped (\\u0027) and URL-encoded (%5Cu0027)."""
    def make(chunk: list[str]) -> str:
        return in_filter("x", chunk)

    values = ["'" * 400] * 10
    chunks = list(in_filter_chunks(values, make, 8_000))
    assert len(chunks) == 5
    assert all(filter_length(c, make) <= 8_000 for c in chunks)
    emoji = ["😀" * 100] * 10  # 4 UTF-8 bytes, 12 characters encoded
    assert all(filter_length(c, make) <= 3_000 for c in in_filter_chunks(emoji, make, 3_000))


def test_a_value_longer_than_the_budget_goes_alone() -> None:
    def make(chunk: list[str]) -> str:
        return in_filter("x", chunk)

    long = "x" * 5_000
    assert list(in_filter_chunks(["a", long, "b"], make, 1_000)) == [["a"], [long], ["b"]]
    assert list(in_filter_chunks([], make, 1_000)) == []


@pytest.mark.parametrize("lexer", LEXERS)
def test_single_quoted_array_items_as_in_microsofts_example(lexer: str) -> None:
    """https://learn.microsoft.com/power-apps/developer/data-platform/webapi/reference/in writes
    `['value','value']`: ODataLib's JsonReader takes single-quoted strings, and so does the simulator. An
    apostrophe cannot be in one, though, not even as \\': the lexer skips from quote to quote first."""
    text = "Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues=['value','other'])"
    assert [t.value for t in tokenize(text, lexer) if t.kind == "json"] == [["value", "other"]]
    with pytest.raises(SimError):
        tokenize("Microsoft.Dynamics.CRM.In(PropertyName='x',PropertyValues=['o\\'b'])", lexer)


def test_lone_surrogates_travel_escaped() -> None:
    """A Python string from JSON may hold half a surrogate pair: it has no UTF-8 form, \\uXXXX carries it."""
    values = ["a\ud800b", "\udfff"]
    text = url_round_trip(in_filter("x", values))
    assert [t.value for t in tokenize(text) if t.kind == "json"] == [values]
