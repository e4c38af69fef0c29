"""sync.mapping: the seed's field table, limits, cutting, null handling, ids and the content hash."""

from __future__ import annotations

import uuid

import pytest

from core.errors import FieldError
from sync.mapping import (
    COLUMNS,
    contact_id,
    cut,
    external_id,
    map_contact,
    owner_email,
    utf16_len,
)

OWNER = "7d8f0f6a-1b2c-4d3e-9f00-0123456789ab"
FULL = {
    "id": "c_123",
    "version": 7,
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "phone": "+44 20 7946 0000",
    "company": "Analytical Engines Ltd",
    "job_title": "Mathematician",
    "website": "https://example.com",
    "note": "Met at the expo",
    "assigned_team_member": {"id": "tm_1", "email": "owner@contoso.com"},
}


def test_full_contact_maps_exactly_the_seed_table() -> None:
    mapped = map_contact(FULL, OWNER)
    assert mapped.payload == {
        "firstname": "Ada",
        "lastname": "Lovelace",
        "emailaddress1": "ada@example.com",
        "mobilephone": "+44 20 7946 0000",
        "company": "Analytical Engines Ltd",
        "jobtitle": "Mathematician",
        "websiteurl": "https://example.com",
        "description": "Met at the expo",
        "externaluseridentifier": "wavecnct_c_123",
        "ownerid@odata.bind": f"/systemusers({OWNER})",
    }
    assert mapped.warnings == []


def test_no_owner_means_no_owner_binding() -> None:
    assert "ownerid@odata.bind" not in map_contact(FULL, None).payload


def test_owner_id_must_be_a_guid() -> None:
    with pytest.raises(FieldError) as err:
        map_contact(FULL, "owner@contoso.com")
    assert err.value.field == "owner_id"


@pytest.mark.parametrize("missing", ["absent", None, "", "   "])
def test_absent_null_or_blank_fields_clear_every_column(missing) -> None:
    contact = {"id": "c_1"}
    if missing != "absent":
        contact.update({col.wave_field: missing for col in COLUMNS})
    payload = map_contact(contact, None).payload
    assert payload == {col.column: None for col in COLUMNS} | {"externaluseridentifier": "wavecnct_c_1"}


LIMITS = [
    ("first_name", "firstname", 50),
    ("last_name", "lastname", 50),
    ("email", "emailaddress1", 100),
    ("phone", "mobilephone", 50),
    ("company", "company", 49),
    ("job_title", "jobtitle", 100),
    ("website", "websiteurl", 200),
    ("note", "description", 2000),
]


@pytest.mark.parametrize(("field", "column", "limit"), LIMITS)
def test_every_column_is_cut_to_its_limit_with_a_warning(field, column, limit) -> None:
    at_limit = map_contact({"id": "c_1", field: "x" * limit}, None)
    assert at_limit.payload[column] == "x" * limit
    assert at_limit.warnings == []

    over = map_contact({"id": "c_1", field: "y" * (limit + 25)}, None)
    assert over.payload[column] == "y" * limit
    assert len(over.warnings) == 1
    assert field in over.warnings[0] and column in over.warnings[0] and str(limit) in over.warnings[0]


def test_company_cap_is_49_though_the_column_holds_50() -> None:
    assert map_contact({"id": "c_1", "company": "C" * 50}, None).payload["company"] == "C" * 49


def test_numbers_are_stringified_and_other_types_rejected() -> None:
    assert map_contact({"id": "c_1", "phone": 4420794600}, None).payload["mobilephone"] == "4420794600"
    with pytest.raises(FieldError) as err:
        map_contact({"id": "c_1", "note": {"text": "x"}}, None)
    assert err.value.field == "note"


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("abc", 5, "abc"),
        ("abcdef", 3, "abc"),
        # An astral character is two UTF-16 units: never split its surrogate pair.
        ("ab\U0001f600", 3, "ab"),
        ("ab\U0001f600", 4, "ab\U0001f600"),
        # e + combining acute: keep both or neither.
        ("abe\u0301", 3, "ab"),
        ("abe\u0301x", 4, "abe\u0301"),
        # Thumbs up + skin tone modifier: one cluster.
        ("a\U0001f44d\U0001f3fd", 3, "a"),
        # Family emoji joined with ZWJs: dropped whole rather than leaving a dangling joiner.
        ("a\U0001f468\u200d\U0001f469\u200d\U0001f467", 6, "a"),
        # Heart + variation selector 16.
        ("ab\u2764\ufe0f", 3, "ab"),
        # Flags are two regional indicators: keep both or neither.
        ("a\U0001f1ec\U0001f1e7\U0001f1eb\U0001f1f7", 7, "a\U0001f1ec\U0001f1e7"),
        ("a\U0001f1ec\U0001f1e7", 4, "a"),
        # Hangul and CJK count one unit each.
        ("한국어텍스트", 3, "한국어"),
    ],
)
def test_cut_is_unicode_safe(text, limit, expected) -> None:
    result = cut(text, limit)
    assert result == expected
    assert utf16_len(result) <= limit
    result.encode("utf-8")  # a lone surrogate would raise here


def test_utf16_length_counts_astral_characters_twice() -> None:
    assert utf16_len("a\U0001f600") == 3
    over = map_contact({"id": "c_1", "first_name": "\U0001f600" * 30}, None)
    assert over.payload["firstname"] == "\U0001f600" * 25
    assert over.warnings


@pytest.mark.parametrize("good", ["c_123", "A", "a-b_C9", "x" * 41])
def test_external_id_prefix_and_fits_the_column(good) -> None:
    assert external_id(good) == "wavecnct_" + good
    assert len(external_id(good)) <= 50


@pytest.mark.parametrize("bad", ["", "x" * 42, "c 1", "c'1", "c/1", None, 12])
def test_external_id_rejects_ids_outside_the_contract(bad) -> None:
    with pytest.raises(FieldError) as err:
        external_id(bad)
    assert err.value.field == "id"
    with pytest.raises(FieldError):
        map_contact({"id": bad}, None)


def test_contact_id_is_deterministic_uuid5_per_account_and_contact() -> None:
    first = contact_id("acct_1", "c_1")
    assert first == contact_id("acct_1", "c_1")
    assert uuid.UUID(first).version == 5
    assert len({first, contact_id("acct_2", "c_1"), contact_id("acct_1", "c_2")}) == 3


def test_content_hash_is_stable_and_tracks_every_mapped_value() -> None:
    base = map_contact(FULL, OWNER).content_hash
    assert base == map_contact(dict(reversed(FULL.items())), OWNER).content_hash
    # Fields outside the mapping (version, updated_at) don't change the hash.
    assert base == map_contact({**FULL, "version": 99, "updated_at": "2027-01-01T00:00:00Z"}, OWNER).content_hash
    changed = {map_contact({**FULL, col.wave_field: "changed"}, OWNER).content_hash for col in COLUMNS}
    assert base not in changed and len(changed) == len(COLUMNS)
    assert map_contact(FULL, None).content_hash != base


def test_owner_email_reads_the_assigned_team_member() -> None:
    assert owner_email(FULL) == "owner@contoso.com"
    assert owner_email({"id": "c_1"}) is None
    assert owner_email({"id": "c_1", "assigned_team_member": {"id": "tm", "email": None}}) is None
