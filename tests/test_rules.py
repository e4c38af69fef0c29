"""Pure rules: signatures, the webhook schema, ordering, owner choice, retry timing. No I/O."""

from __future__ import annotations

import json

import pytest

from core.emails import normalise_email
from core.errors import FieldError
from dataverse.client import ContactRef, UserRef
from sync.events import MAX_BODY_BYTES, parse_body, validate_event
from sync.messages import BadMessage, ContactMessage, PageMessage
from sync.rules import (
    Applied,
    Step,
    backfill_writes,
    choose_owner,
    next_step,
    owner_lookup_problem,
    pick_row,
    requeue_pending,
    retry_delay,
    throttle_delay,
    unchanged,
    warning_text,
)
from sync.signature import SignatureError, sign, signature_header, verify
from sync.webhook import Answer, check_request

SECRETS = ("whsec_new", "whsec_old")
NOW = 1_764_230_400


def event(**over):
    doc = {"id": "evt_1", "type": "contact.updated", "created": NOW, "account_id": "acct_1",
           "data": {"contact": {"id": "c_1", "version": 7, "first_name": "Ada", "email": "ada@example.com",
                                "assigned_team_member": {"id": "tm_1", "email": "owner@contoso.com"}}}}
    doc.update(over)
    return doc


# -- signature ------------------------------------------------------------------------------------

def test_signature_accepts_any_configured_secret_and_any_v1_entry():
    body = b'{"x":1}'
    assert verify(signature_header(body, ["whsec_old"], NOW), body, SECRETS, NOW) == NOW
    rotating = f"t={NOW},v1={sign(body, 'unknown', NOW)},v1={sign(body, 'whsec_new', NOW)}"
    assert verify(rotating, body, SECRETS, NOW + 299) == NOW


@pytest.mark.parametrize("header,why", [
    (None, "missing"),
    ("", "missing"),
    ("v1=" + "0" * 64, "no timestamp"),
    (f"t={NOW}", "no v1"),
    (f"t=abc,v1={'0' * 64}", "timestamp"),
    (f"t={NOW},t={NOW},v1={'0' * 64}", "timestamp"),
    (f"t={NOW},v1={'0' * 64}", "does not match"),
    (f"t={NOW},garbage", "malformed"),
])
def test_signature_rejections_say_why(header, why):
    with pytest.raises(SignatureError, match=why):
        verify(header, b"{}", SECRETS, NOW)


def test_signature_is_over_the_raw_bytes_and_time_bound():
    body = b'{"x": 1}'
    header = signature_header(body, ["whsec_new"], NOW)
    with pytest.raises(SignatureError, match="does not match"):
        verify(header, b'{"x":1}', SECRETS, NOW)  # same JSON, other bytes
    with pytest.raises(SignatureError, match="tolerance"):
        verify(header, body, SECRETS, NOW + 301)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(header, body, SECRETS, NOW - 301)
    assert "whsec" not in str(SignatureError)


# -- schema ---------------------------------------------------------------------------------------

def test_valid_event_keeps_known_fields_and_absent_ones_become_null():
    ev = validate_event(event())
    assert (ev.account_id, ev.contact_id, ev.version, ev.deleted) == ("acct_1", "c_1", 7, False)
    assert ev.contact["last_name"] is None and ev.contact["first_name"] == "Ada"
    assert ev.contact["assigned_team_member"] == {"id": "tm_1", "email": "owner@contoso.com"}
    deleted = validate_event(event(type="contact.deleted", data={"contact": {"id": "c_1", "version": 8}}))
    assert deleted.deleted and deleted.version == 8


@pytest.mark.parametrize("doc,field", [
    ([], "body"),
    (event(id=""), "id"),
    (event(id="evt/1"), "id"),
    (event(type="contact.merged"), "type"),
    (event(created="yesterday"), "created"),
    (event(account_id="acct 1"), "account_id"),
    (event(account_id=7), "account_id"),
    (event(data=None), "data"),
    (event(data={"contact": []}), "data.contact"),
    (event(data={"contact": {"id": "c" * 42, "version": 1}}), "data.contact.id"),
    (event(data={"contact": {"id": "c_1"}}), "data.contact.version"),
    (event(data={"contact": {"id": "c_1", "version": -1}}), "data.contact.version"),
    (event(data={"contact": {"id": "c_1", "version": True}}), "data.contact.version"),
    (event(data={"contact": {"id": "c_1", "version": 1.5}}), "data.contact.version"),
    (event(data={"contact": {"id": "c_1", "version": 1, "email": 5}}), "data.contact.email"),
    (event(data={"contact": {"id": "c_1", "version": 1, "assigned_team_member": "x"}}),
     "data.contact.assigned_team_member"),
    (event(data={"contact": {"id": "c_1", "version": 1, "assigned_team_member": {"email": []}}}),
     "data.contact.assigned_team_member.email"),
])
def test_schema_errors_name_the_field(doc, field):
    with pytest.raises(FieldError) as err:
        validate_event(doc)
    assert err.value.field == field


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"{", b'{"a": NaN}', b"[" * 100_000])
def test_body_that_is_not_json_is_a_schema_error(raw):
    with pytest.raises(FieldError) as err:
        parse_body(raw)
    assert err.value.field == "body"


def test_check_request_orders_size_then_signature_then_schema():
    big = b"x" * (MAX_BODY_BYTES + 1)
    answer = check_request(big, None, SECRETS, NOW)
    assert isinstance(answer, Answer) and answer.status == 413  # before the signature is even looked at
    body = json.dumps({"id": 1}).encode()
    assert check_request(body, None, SECRETS, NOW).status == 401
    signed = check_request(body, signature_header(body, ["whsec_new"], NOW), SECRETS, NOW)
    assert signed.status == 400 and signed.body["error"]["field"] == "id"
    good = json.dumps(event()).encode()
    assert check_request(good, signature_header(good, ["whsec_old"], NOW), SECRETS, NOW).version == 7


# -- ordering -------------------------------------------------------------------------------------

def test_versions_only_move_forward():
    assert next_step(None, 1, deleted=False) is Step.UPSERT
    assert next_step(Applied(version=3), 4, deleted=False) is Step.UPSERT
    assert next_step(Applied(version=3), 3, deleted=False) is Step.STALE
    assert next_step(Applied(version=3), 2, deleted=False) is Step.STALE
    assert next_step(Applied(version=3), 3, deleted=False, force=True) is Step.UPSERT
    assert next_step(Applied(version=3), 2, deleted=False, force=True) is Step.STALE


def test_a_delete_is_never_undone_by_an_older_update():
    after_delete = Applied(version=5, deleted=True, dynamics_id="d")
    assert next_step(after_delete, 4, deleted=False) is Step.STALE
    assert next_step(after_delete, 5, deleted=False, force=True) is Step.UPSERT  # same version: only a repair
    assert next_step(Applied(version=4), 5, deleted=True) is Step.DELETE
    assert next_step(after_delete, 6, deleted=False) is Step.UPSERT  # re-created in Wave later


def test_unchanged_content_skips_only_a_live_known_row():
    assert unchanged(Applied(3, False, "h", "d"), "h")
    assert not unchanged(Applied(3, False, "h", "d"), "h2")
    assert not unchanged(Applied(3, True, "h", "d"), "h")
    assert not unchanged(Applied(3, False, "h", None), "h")
    assert not unchanged(None, "h")


def test_backfill_never_overwrites_a_newer_live_version():
    assert backfill_writes(3, None, None)
    assert not backfill_writes(3, Applied(version=4), None)
    assert not backfill_writes(3, Applied(version=3), None)
    assert not backfill_writes(3, None, pending_version=4)
    assert backfill_writes(3, Applied(version=2), pending_version=3)


def test_a_retried_failure_counts_as_queued_until_its_mark_is_stale():
    stale_before = "2026-11-27T09:00:00Z"  # now minus REQUEUE_PENDING_SECONDS
    assert requeue_pending("2026-11-27T09:59:59Z", stale_before)
    assert requeue_pending("2026-11-27T09:00:01Z", stale_before)
    assert not requeue_pending("2026-11-27T09:00:00Z", stale_before)
    assert not requeue_pending("2026-11-27T08:00:00Z", stale_before)
    assert not requeue_pending(None, stale_before)  # never queued, or settled by the worker


# -- owners ---------------------------------------------------------------------------------------

def _user(uid: str, accessmode: int | None, disabled: bool = False) -> UserRef:
    return UserRef(uid, "seller@contoso.test", accessmode, None, disabled)


def test_owner_is_an_enabled_interactive_user_or_nobody():
    assert choose_owner([]) is None
    assert choose_owner([_user("u1", 0, disabled=True)]) is None
    assert choose_owner([_user("u1", 4)]) is None
    users = [_user("u9", 2), _user("u5", 0, disabled=True), _user("u7", 0)]
    assert choose_owner(users) == "u7"
    assert choose_owner(list(reversed(users))) == "u7"
    # an application user (4) first by id does not hide a read-only human who can own the contact
    assert choose_owner([_user("a0", 4), _user("b1", 1)]) == "b1"


def _row(cid: str, statecode: int, createdon: str | None) -> ContactRef:
    return ContactRef(cid, None, statecode, "wavecnct_dup", None, createdon)


def test_among_duplicate_rows_the_active_then_oldest_then_lowest_id_is_used():
    assert pick_row([]) is None
    rows = [_row("c3", 1, "2020-01-01T00:00:00Z"), _row("c2", 0, "2024-05-01T00:00:00Z"),
            _row("c1", 0, "2024-05-01T00:00:00Z"), _row("c4", 0, "2025-01-01T00:00:00Z")]
    assert pick_row(rows).contactid == "c1"
    assert pick_row(reversed(rows)).contactid == "c1"
    assert pick_row([_row("c9", 1, "2020-01-01T00:00:00Z")]).contactid == "c9"  # an inactive one is still used
    assert normalise_email("  Owner@Contoso.COM ") == "owner@contoso.com"
    assert normalise_email(" ") is None


def test_owner_emails_fold_ascii_letters_only():
    kelvin = "\u212aate@contoso.com"  # KELVIN SIGN, which str.lower() and casefold() turn into "k"
    assert normalise_email(kelvin) != normalise_email("kate@contoso.com") == "kate@contoso.com"
    assert normalise_email(kelvin) == kelvin
    assert normalise_email("\u0130STANBUL@Contoso.com") == "\u0130stanbul@contoso.com"  # dotted I stays
    assert normalise_email("\u00c9lodie@Contoso.com") == "\u00c9lodie@contoso.com"  # only A-Z fold
    assert normalise_email("ÉLODIE@X.COM") != normalise_email("élodie@x.com")


@pytest.mark.parametrize("email,problem", [
    ("owner@contoso.com", None),
    ("o'brien+sales@contoso.com", None),  # valid, odd characters are for the query builder to escape
    ("\"quoted@local\"@contoso.com", None),
    ("pel\u00e9@exemple.fr", None),
    ("a" * 241 + "@contoso.com", None),  # 253 characters
    ("a" * 242 + "@contoso.com", None),  # 254: the longest address
    ("a" * 243 + "@contoso.com", "255 characters long (at most 254)"),
    ("a" * 39_988 + "@contoso.com", "40000 characters long"),
    ("no-at-sign.contoso.com", "not shaped like an address"),
    ("@contoso.com", "not shaped like an address"),
    ("owner@", "not shaped like an address"),
    ("own er@contoso.com", "not shaped like an address"),
    ("owner@contoso.com\nBcc: x@y", "not shaped like an address"),
])
def test_owner_emails_that_cannot_be_looked_up(email, problem):
    found = owner_lookup_problem(email)
    assert (found is None) if problem is None else (problem in found)
    if found:
        assert email[:20] not in found  # the reason never quotes the address


def test_warning_text_is_bounded_and_absent_without_warnings():
    assert warning_text([]) is None and warning_text([None]) is None
    assert warning_text(["a", None, "b"]) == "a; b"
    assert len(warning_text(["x" * 5000])) == 1000


def test_retry_timing():
    assert [retry_delay(a) for a in range(4)] == [2, 4, 8, 16]
    assert retry_delay(30) == 300
    assert throttle_delay(2.1) == 3 and throttle_delay(None) == 2
    assert throttle_delay(4, jitter=0.5) == 6 and throttle_delay(4, jitter=0.99) == 8  # never before Retry-After


def test_messages_round_trip_and_reject_foreign_bodies():
    msg = ContactMessage("acct_1", "c_1", 3, "g1")
    assert ContactMessage.parse(json.dumps(msg.to_dict()).encode()) == msg
    assert "force" not in msg.to_dict() and ContactMessage.parse(
        json.dumps({**msg.to_dict(), "force": True}).encode()).force
    page = PageMessage("acct_1", "g1", "r1", None, 1)
    assert PageMessage.parse(json.dumps(page.retry().to_dict()).encode()).attempt == 1
    for bad in (b"nope", b"[]", b'{"account_id": "a"}'):
        with pytest.raises(BadMessage):
            ContactMessage.parse(bad)
