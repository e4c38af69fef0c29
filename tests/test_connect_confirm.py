"""The second phase of connect: a sign-in is kept pending until Wave's backend confirms it for the Wave
user who started it (README "Connecting Dynamics"). Through the public HTTP surface, the Entra stand-in's
sign-in, the Key Vault simulator, a Dataverse simulator and Azurite."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from devstack.dataverse_sim import ADMIN_PRIVILEGES
from sync.mapping import EXTERNAL_ID_PREFIX
from tests.fixtures.identity import (
    api,
    callback,
    completion_of,
    confirm,
    connect_account,
    connect_body,
    new_account,
    pending_of,
    secrets_of,
    sign_in,
    signed_in,
    status,
)
from tests.fixtures.stack import MASTER_KEY


def _snapshot(devhost, store, tables, identity, account_id: str) -> tuple:
    """Everything a refused confirm must leave as it was."""
    row = store.get(account_id)
    pending = sorted((p["RowKey"], bool(p.get("used"))) for p in pending_of(tables, account_id))
    return (row.state, row.generation, row.secret_name, row.backfill.run_id, pending,
            sorted(secrets_of(identity, account_id)), status(devhost, account_id)["state"])


def _expire(tables, account_id: str) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for row in pending_of(tables, account_id):
        row["expires_at"] = past  # ten minutes pass
        tables("pendingsignins").upsert_entity(row)


def _run_timer(devhost, name: str) -> None:
    resp = requests.post(f"{devhost.url}/admin/functions/{name}", headers={"x-functions-key": MASTER_KEY}, timeout=60)
    assert resp.ok, resp.text


def test_a_forwarded_authorize_url_connects_nothing(devhost, identity, fresh_entra, store, tables, wave):
    """An admin of Wave account A forwards A's authorize URL to the admin of another company's Dynamics."""
    acct = new_account()
    wave.seed(acct, 25)  # A's contacts, which must never reach the victim's Dynamics
    victim = "it-admin@fabrikam.test"
    oid = str(uuid.uuid4())
    identity.dataverse.add_user(victim, oid=oid, privileges=set(ADMIN_PRIVILEGES))
    started = api(devhost, "POST", f"/api/connections/{acct}/connect",
                  json=connect_body(identity, auto_sync=True, initiated_by="attacker@wave-a.test"))
    assert started.status_code == 200

    fresh_entra.sign_in_as(victim, oid)  # the victim's browser, which never saw Wave, signs in
    landed = callback(devhost, sign_in(identity, started.json()["authorize_url"]))
    completion = completion_of(landed)  # ... and lands on Wave's page, where it is not signed in: no confirm

    row = store.get(acct)
    assert (row.state, row.generation, row.secret_name, row.backfill.run_id) == ("pending", None, None, None)
    assert status(devhost, acct)["pending_sign_in"]["signed_in_as"] == victim
    # Even a Wave user holding the code (the victim, signed in to Wave themselves) cannot confirm it for A,
    # and the attacker, who is the initiator, does not have the code.
    before = _snapshot(devhost, store, tables, identity, acct)
    refused = confirm(devhost, acct, completion, confirmed_by=victim)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_initiator"
    guessed = confirm(devhost, acct, "A" * 43, confirmed_by="attacker@wave-a.test")
    assert guessed.status_code == 404 and guessed.json()["error"]["code"] == "unknown_completion"
    assert _snapshot(devhost, store, tables, identity, acct) == before
    assert not [r for r in identity.dataverse.rows()
                if (r.get("externaluseridentifier") or "").startswith(EXTERNAL_ID_PREFIX)
                and r["externaluseridentifier"].removeprefix(EXTERNAL_ID_PREFIX) in
                {c["id"] for c in wave.contacts(acct)}]

    _expire(tables, acct)  # nobody confirmed: the sign-in and the victim's tokens go
    _run_timer(devhost, "purge_expired_sign_ins")
    assert pending_of(tables, acct) == [] and secrets_of(identity, acct) == set()


def test_the_initiator_confirms_and_the_backfill_starts(devhost, identity, fresh_entra, store, wave):
    acct = new_account()
    wave.seed(acct, 30)
    landed = signed_in(devhost, identity, acct, auto_sync=True, initiated_by="ada@wave.test")
    assert store.get(acct).backfill.run_id is None  # nothing starts before the confirm
    done = confirm(devhost, acct, completion_of(landed), confirmed_by="ada@wave.test")
    assert done.status_code == 200, done.text
    st = done.json()
    assert (st["state"], st["instance_url"], st["connected_by"]) == \
        ("connected", identity.dataverse.url, "admin@contoso.test")
    assert st["initiated_by"] == "ada@wave.test" and st["pending_sign_in"] is None
    from tests.fixtures.sync import wait_for

    wait_for(lambda: status(devhost, acct)["backfill"]["state"] == "done", 60, what="the backfill")
    ids = {f"{EXTERNAL_ID_PREFIX}{c['id']}" for c in wave.contacts(acct)}
    assert ids <= {r.get("externaluseridentifier") for r in identity.dataverse.rows()}


def test_refused_confirms_name_the_reason_and_change_nothing(devhost, identity, fresh_entra, store, tables):
    acct, other = new_account(), new_account()
    completion = completion_of(signed_in(devhost, identity, acct))
    foreign = completion_of(signed_in(devhost, identity, other))
    before = _snapshot(devhost, store, tables, identity, acct)
    other_before = _snapshot(devhost, store, tables, identity, other)

    cases = [
        ({"completion": completion, "confirmed_by": "someone-else"}, 403, "not_initiator", "confirmed_by"),
        ({"completion": foreign, "confirmed_by": "wave-user-1"}, 404, "unknown_completion", "completion"),
        ({"completion": "short", "confirmed_by": "wave-user-1"}, 400, "invalid_request", "completion"),
        ({"completion": completion + "'", "confirmed_by": "wave-user-1"}, 400, "invalid_request", "completion"),
        ({"completion": completion}, 400, "invalid_request", "confirmed_by"),
        ({"completion": completion, "confirmed_by": "x" * 257}, 400, "invalid_request", "confirmed_by"),
        ([completion], 400, "invalid_json", "body"),
    ]
    for body, code, error, field in cases:
        resp = api(devhost, "POST", f"/api/connections/{acct}/confirm", json=body)
        assert resp.status_code == code, (body, resp.text)
        assert (resp.json()["error"]["code"], resp.json()["error"]["field"]) == (error, field)
    assert api(devhost, "POST", f"/api/connections/{acct}/confirm", data=b"{not json").status_code == 400
    assert requests.post(f"{devhost.url}/api/connections/{acct}/confirm", timeout=30,  # no function key
                         json={"completion": completion, "confirmed_by": "wave-user-1"}).status_code == 401
    assert _snapshot(devhost, store, tables, identity, acct) == before
    assert _snapshot(devhost, store, tables, identity, other) == other_before

    assert confirm(devhost, acct, completion).status_code == 200
    used = confirm(devhost, acct, completion)
    assert used.status_code == 409 and used.json()["error"]["code"] == "completion_used"

    _expire(tables, other)
    expired = confirm(devhost, other, foreign)
    assert expired.status_code == 410 and expired.json()["error"]["code"] == "completion_expired"
    assert _snapshot(devhost, store, tables, identity, other) == \
        (*other_before[:4], [(k, False) for k, _ in other_before[4]], *other_before[5:])


def test_a_live_connection_stays_until_the_new_sign_in_is_confirmed(devhost, identity, fresh_entra, store):
    acct = new_account()
    assert connect_account(devhost, identity, acct).status_code == 200
    live = store.get(acct)
    completion = completion_of(signed_in(devhost, identity, acct, auto_sync=True))
    st = status(devhost, acct)
    assert st["state"] == "connected" and st["pending_sign_in"]["expires_at"]
    still = store.get(acct)
    assert (still.generation, still.secret_name, still.auto_sync) == (live.generation, live.secret_name, False)
    assert identity.keyvault.value(live.secret_name)

    assert confirm(devhost, acct, completion).status_code == 200
    now = store.get(acct)
    assert now.state == "connected" and now.generation != live.generation and now.auto_sync is True
    assert live.secret_name in identity.keyvault.deleted_names()
    assert secrets_of(identity, acct) == {now.secret_name}


def test_racing_confirms_activate_once(devhost, identity, fresh_entra, store):
    acct = new_account()
    completion = completion_of(signed_in(devhost, identity, acct))
    with ThreadPoolExecutor(4) as pool:
        answers = sorted(r.status_code for r in pool.map(lambda _: confirm(devhost, acct, completion), range(4)))
    assert answers == [200, 409, 409, 409]
    assert store.get(acct).state == "connected" and len(secrets_of(identity, acct)) == 1


def test_expired_sign_ins_are_purged_but_a_confirmed_ones_tokens_stay(devhost, identity, fresh_entra, store, tables):
    acct = new_account()
    abandoned = signed_in(devhost, identity, acct)
    assert abandoned.status_code == 302
    kept = completion_of(signed_in(devhost, identity, acct))
    assert confirm(devhost, acct, kept).status_code == 200
    live = store.get(acct)
    assert len(secrets_of(identity, acct)) == 2  # the live one and the abandoned sign-in's

    _expire(tables, acct)
    _run_timer(devhost, "purge_expired_sign_ins")
    assert pending_of(tables, acct) == []
    assert secrets_of(identity, acct) == {live.secret_name} and identity.keyvault.value(live.secret_name)
    assert status(devhost, acct)["state"] == "connected"


def _state_of(authorize_url: str) -> str:
    return parse_qs(urlsplit(authorize_url).query)["state"][0]


def test_the_callbacks_error_text_is_bounded_and_never_shown_verbatim(devhost, identity, fresh_entra):
    acct = new_account()
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    forged = {"state": _state_of(started.json()["authorize_url"]), "error": "access_denied",
              "error_description": "<script>alert(1)</script> AADSTS65004: " + "x" * 3000}
    resp = callback(devhost, urlencode(forged))
    assert resp.status_code == 302 and resp.headers["Location"].endswith("dynamics=error&reason=consent")
    reason = status(devhost, acct)["reason"]
    assert reason["category"] == "consent" and "AADSTS65004" in reason["message"]
    assert "<" not in reason["message"] and "xxx" not in reason["message"] and len(reason["message"]) < 200

    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    odd = {"state": _state_of(started.json()["authorize_url"]), "error": "<b>bold</b>", "error_description": "y" * 50}
    assert callback(devhost, urlencode(odd)).headers["Location"].endswith("reason=auth")
    message = status(devhost, acct)["reason"]["message"]
    assert "<b>" not in message and "yyy" not in message and "unrecognised_error" in message


def test_an_oversized_callback_is_refused_before_it_touches_the_sign_in(devhost, identity, fresh_entra, tables):
    acct = new_account()
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    state = _state_of(started.json()["authorize_url"])
    resp = callback(devhost, urlencode({"state": state, "code": "c" * 9000}))
    assert resp.status_code == 400 and resp.headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Referrer-Policy"] == "no-referrer" and resp.headers["X-Frame-Options"] == "DENY"
    # the sign-in was not consumed: the real redirect still completes it
    assert completion_of(callback(devhost, sign_in(identity, started.json()["authorize_url"])))


@pytest.mark.parametrize("query", ["state=unknown-state&code=abc", ""])
def test_every_callback_page_refuses_framing_and_referrers(devhost, query):
    resp = callback(devhost, query)
    assert resp.status_code == 400
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Referrer-Policy"] == "no-referrer"
