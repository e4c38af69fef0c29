"""Connect, callback, confirm, status and disconnect through the HTTP surface, against the Entra stand-in,
the Key Vault simulator, a Dataverse simulator and Azurite (README "Connecting Dynamics")."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from core.settings import StorageSettings
from devstack.dataverse_sim import ADMIN_PRIVILEGES
from tests.fixtures.identity import (
    RETURN_URL,
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
from tests.test_instance_url import HOSTILE_INSTANCE_URLS


def _sessions_of(tables, account_id: str) -> list:
    return list(tables("oauthsessions").query_entities("account_id eq @a", parameters={"a": account_id}))



def test_happy_path_connects_and_keeps_tokens_in_key_vault(devhost, identity, fresh_entra, store, tables):
    acct = new_account()
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    assert started.status_code == 200, started.text
    body = started.json()
    authorize = urlsplit(body["authorize_url"])
    query = parse_qs(authorize.query)
    assert body["authorize_url"].startswith(f"{identity.entra.authority}/oauth2/v2.0/authorize?")
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert f"{identity.dataverse.url}/user_impersonation" in query["scope"][0].split()
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10)
    assert status(devhost, acct)["state"] == "pending"

    done = callback(devhost, sign_in(identity, body["authorize_url"]))
    assert done.status_code == 302
    assert done.headers["Location"].startswith(f"{RETURN_URL}?dynamics=confirm&completion=")
    assert not done.content  # the browser gets a redirect, never a token
    completion = completion_of(done)
    assert len(completion) >= 22  # at least 128 random bits, URL-safe base64
    assert not list(tables("pendingsignins").query_entities(  # kept only as a hash
        "RowKey eq @c or PartitionKey eq @c", parameters={"c": completion}))
    waiting = status(devhost, acct)
    assert waiting["state"] == "pending" and waiting["pending_sign_in"]["signed_in_as"] == "admin@contoso.test"
    assert waiting["pending_sign_in"]["instance_url"] == identity.dataverse.url

    confirmed = confirm(devhost, acct, completion)
    assert confirmed.status_code == 200, confirmed.text
    assert (confirmed.json()["instance_url"], confirmed.json()["connected_by"]) == \
        (identity.dataverse.url, "admin@contoso.test")
    st = status(devhost, acct)
    assert st["state"] == "connected" and st["reason"] is None and st["pending_sign_in"] is None
    assert st["instance_url"] == identity.dataverse.url
    assert st["connected_by"] == "admin@contoso.test" and st["connected_at"]
    assert (st["auto_sync"], st["delete_policy"]) == (False, "delete")
    assert st["counters"] == {"synced": 0, "deleted": 0, "failed": 0, "skipped": 0} and st["failures"] == []
    assert st["backfill"]["state"] == "idle"

    row = store.get(acct)
    assert row.generation and row.tenant_id == identity.entra.tenant_id and row.dataverse_user_id
    assert row.secret_name == f"dyn-{acct.replace('_', '-')}-{row.generation}"
    assert secrets_of(identity, acct) == {row.secret_name}
    cache = json.loads(identity.keyvault.value(row.secret_name))
    assert cache["RefreshToken"] and cache["AccessToken"]
    assert _sessions_of(tables, acct) == []  # the sign-in session is gone once used


def test_auto_sync_opens_a_backfill_run(devhost, identity, fresh_entra, store):
    acct = new_account()
    assert connect_account(devhost, identity, acct, auto_sync=True).status_code == 200
    st = status(devhost, acct)
    assert st["auto_sync"] is True and st["backfill"]["started_at"]
    assert store.get(acct).backfill.run_id


def test_the_connected_client_calls_dataverse_with_the_stored_tokens(devhost, identity, fresh_entra, store):
    from functions.services import services

    acct = new_account()
    connect_account(devhost, identity, acct)
    conn = store.get(acct)
    client = services().dataverse(conn)
    assert client is services().dataverse(conn)  # one per instance and generation
    services().tokens.delete(None, conn.generation)  # forget the in-memory cache: Key Vault must serve it
    assert services().tokens.provider(conn)(False)
    assert client.whoami()


@pytest.mark.parametrize("plan", ["free", "starter", "PRO-trial"])
def test_plan_not_eligible_is_refused_and_nothing_is_stored(devhost, identity, tables, plan):
    acct = new_account()
    resp = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity, plan=plan))
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "plan_not_eligible" and resp.json()["error"]["field"] == "plan"
    assert api(devhost, "GET", f"/api/connections/{acct}").status_code == 404
    assert _sessions_of(tables, acct) == []


def test_hostile_instance_urls_are_refused_before_any_network_call(devhost, identity, tables):
    assert len(HOSTILE_INSTANCE_URLS) >= 20
    acct = new_account()
    entra_before = identity.entra.request_count()
    vault_before = len(identity.keyvault.requests)
    dataverse_before = len(identity.dataverse.request_log())
    for url in HOSTILE_INSTANCE_URLS:
        resp = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity, instance_url=url))
        assert resp.status_code == 400, url
        error = resp.json()["error"]
        assert (error["code"], error["field"]) == ("invalid_instance_url", "instance_url"), url
    assert identity.entra.request_count() == entra_before
    assert len(identity.keyvault.requests) == vault_before
    assert len(identity.dataverse.request_log()) == dataverse_before
    assert api(devhost, "GET", f"/api/connections/{acct}").status_code == 404
    assert _sessions_of(tables, acct) == []


@pytest.mark.parametrize(("override", "status_code", "code", "field"), [
    ({"return_url": "https://app.wave.test.evil.com/integrations/x"}, 400, "invalid_return_url", "return_url"),
    ({"return_url": "https://evil.com/"}, 400, "invalid_return_url", "return_url"),
    ({"return_url": None}, 400, "invalid_return_url", "return_url"),  # only Wave's page can confirm
    ({"auto_sync": "yes"}, 400, "invalid_request", "auto_sync"),
    ({"initiated_by": ""}, 400, "invalid_request", "initiated_by"),
    ({"delete_policy": "purge"}, 400, "invalid_request", "delete_policy"),
    ({"plan": None}, 400, "invalid_request", "plan"),
    ({"instance_url": None}, 400, "invalid_instance_url", "instance_url"),
])
def test_bad_connect_fields_are_named_and_nothing_is_stored(devhost, identity, tables, override, status_code, code,
                                                            field):
    acct = new_account()
    resp = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity, **override))
    assert resp.status_code == status_code
    assert (resp.json()["error"]["code"], resp.json()["error"]["field"]) == (code, field)
    assert api(devhost, "GET", f"/api/connections/{acct}").status_code == 404
    assert _sessions_of(tables, acct) == []


def test_bad_body_and_account_id_are_refused(devhost, identity):
    acct = new_account()
    resp = api(devhost, "POST", f"/api/connections/{acct}/connect", data=b"{not json")
    assert resp.status_code == 400 and resp.json()["error"]["field"] == "body"
    resp = api(devhost, "POST", f"/api/connections/{'a' * 65}/connect", json=connect_body(identity))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_account_id"
    assert api(devhost, "GET", "/api/connections/acct.x").json()["error"]["field"] == "account_id"


def test_connect_needs_the_function_key(devhost, identity):
    import requests

    resp = requests.post(f"{devhost.url}/api/connections/{new_account()}/connect", json=connect_body(identity),
                         timeout=30)
    assert resp.status_code == 401


def test_a_state_is_single_use(devhost, identity, fresh_entra, store, tables):
    acct = new_account()
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    query = sign_in(identity, started.json()["authorize_url"])
    assert callback(devhost, query).status_code == 302
    replay = callback(devhost, query)
    assert replay.status_code == 400 and "already completed" in replay.text
    assert store.get(acct).generation is None and len(secrets_of(identity, acct)) == 1
    assert len(pending_of(tables, acct)) == 1


@pytest.mark.parametrize("query", ["state=unknown-state&code=abc", "code=abc", "state=a%2Fb&code=x", ""])
def test_unknown_or_missing_state_is_a_clear_error_page(devhost, query):
    resp = callback(devhost, query)
    assert resp.status_code == 400 and resp.headers["Content-Type"].startswith("text/html")
    assert "cannot be used" in resp.text


def test_an_expired_state_is_refused(devhost, identity, fresh_entra, tables):
    acct = new_account()
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    (session,) = _sessions_of(tables, acct)
    session["expires_at"] = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    tables("oauthsessions").upsert_entity(session)  # ten minutes pass
    resp = callback(devhost, sign_in(identity, started.json()["authorize_url"]))
    assert resp.status_code == 400 and "expired" in resp.text
    assert status(devhost, acct)["state"] == "pending" and secrets_of(identity, acct) == set()


def test_consent_denied_comes_back_as_a_reason(devhost, identity, fresh_entra):
    acct = new_account()
    fresh_entra.deny_next_consent()
    done = signed_in(devhost, identity, acct)
    assert done.status_code == 302
    assert done.headers["Location"] == f"{RETURN_URL}?dynamics=error&reason=consent"
    st = status(devhost, acct)
    assert st["state"] == "pending" and st["reason"]["category"] == "consent"
    assert "AADSTS65004" in st["reason"]["message"]
    assert secrets_of(identity, acct) == set()


def test_a_missing_privilege_fails_the_connect_naming_it(devhost, identity, fresh_entra):
    acct = new_account()
    oid = str(uuid.uuid4())
    identity.dataverse.add_user("limited@contoso.test", oid=oid,
                                privileges=set(ADMIN_PRIVILEGES) - {"prvAssignContact"})
    fresh_entra.sign_in_as("limited@contoso.test", oid)
    done = signed_in(devhost, identity, acct)
    assert done.headers["Location"] == f"{RETURN_URL}?dynamics=error&reason=permission"
    st = status(devhost, acct)
    assert st["state"] == "pending" and st["reason"]["category"] == "permission"
    assert "prvAssignContact" in st["reason"]["message"] and "limited@contoso.test" in st["reason"]["message"]
    assert secrets_of(identity, acct) == set()


def test_a_failed_reconnect_leaves_the_live_connection_alone(devhost, identity, fresh_entra, store):
    acct = new_account()
    connect_account(devhost, identity, acct)
    before = store.get(acct)
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity, auto_sync=True))
    assert status(devhost, acct)["state"] == "connected"  # starting a reconnect does not break the live one
    fresh_entra.deny_next_consent()
    assert "dynamics=error" in callback(devhost, sign_in(identity, started.json()["authorize_url"])).headers["Location"]
    after = store.get(acct)
    assert (after.state, after.generation, after.secret_name, after.auto_sync) == \
        ("connected", before.generation, before.secret_name, False)
    assert after.reason is None and identity.keyvault.value(before.secret_name)


def test_disconnect_deletes_the_secret_and_reconnect_uses_a_new_one(devhost, identity, fresh_entra, store):
    from functions.services import services
    from oauth.errors import ConnectionGone, NotConnected

    acct = new_account()
    connect_account(devhost, identity, acct)
    live = store.get(acct)
    resp = api(devhost, "POST", f"/api/connections/{acct}/disconnect", json={"disconnected_by": "wave-user-9"})
    assert resp.status_code == 200
    st = resp.json()
    assert st["state"] == "disconnected" and st["disconnected_by"] == "wave-user-9" and st["disconnected_at"]
    assert live.secret_name not in identity.keyvault.names()
    assert live.secret_name in identity.keyvault.deleted_names()  # soft-deleted, as a real vault does
    gone = store.get(acct)
    assert gone.generation is None and not gone.accepts(live.generation)
    with pytest.raises(ConnectionGone):  # a worker still holding the old connection gets no token
        services().tokens.provider(live)(False)
    with pytest.raises(NotConnected):  # nor a client for the disconnected row
        services().dataverse(gone)
    assert store.get(acct).state == "disconnected"  # ...and does not disturb the row

    assert connect_account(devhost, identity, acct).json()["state"] == "connected"
    again = store.get(acct)
    assert again.state == "connected" and again.generation != live.generation
    assert again.secret_name != live.secret_name and secrets_of(identity, acct) == {again.secret_name}
    rows = list(store.table.query_entities("PartitionKey eq @a and RowKey eq 'connection'", parameters={"a": acct}))
    assert len(rows) == 1
    assert api(devhost, "POST", f"/api/connections/{new_account()}/disconnect").status_code == 404


def test_accounts_are_isolated(devhost, identity, fresh_entra, store):
    a, b = new_account(), new_account()
    connect_account(devhost, identity, a)
    assert api(devhost, "GET", f"/api/connections/{b}").status_code == 404
    assert api(devhost, "POST", f"/api/connections/{b}/disconnect").status_code == 404
    assert status(devhost, a)["state"] == "connected"
    connect_account(devhost, identity, b)
    secret_a, secret_b = store.get(a).secret_name, store.get(b).secret_name
    assert secret_a != secret_b
    api(devhost, "POST", f"/api/connections/{a}/disconnect")
    assert status(devhost, b)["state"] == "connected" and identity.keyvault.value(secret_b)
    assert status(devhost, a)["state"] == "disconnected" and status(devhost, a)["account_id"] == a
    # B's sign-in can only ever finish B's connection: the session, not the browser, names the account
    started = api(devhost, "POST", f"/api/connections/{a}/connect", json=connect_body(identity))
    callback(devhost, sign_in(identity, started.json()["authorize_url"]))
    assert store.get(b).secret_name == secret_b


def test_racing_callbacks_with_one_state_connect_once(devhost, identity, fresh_entra, store):
    from concurrent.futures import ThreadPoolExecutor

    acct = new_account()
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity))
    query = sign_in(identity, started.json()["authorize_url"])
    with ThreadPoolExecutor(4) as pool:
        answers = sorted(r.status_code for r in pool.map(lambda _: callback(devhost, query), range(4)))
    assert answers == [302, 400, 400, 400]
    assert store.get(acct).state == "pending" and len(secrets_of(identity, acct)) == 1


def test_a_vault_that_refuses_the_write_fails_the_connect_cleanly(devhost, identity, fresh_entra):
    acct = new_account()
    identity.keyvault.forbidden = True
    try:
        done = signed_in(devhost, identity, acct)
    finally:
        identity.keyvault.forbidden = False
    assert done.headers["Location"] == f"{RETURN_URL}?dynamics=error&reason=internal"
    st = status(devhost, acct)
    assert st["state"] == "pending" and "Key Vault" in st["reason"]["message"]
    assert secrets_of(identity, acct) == set()


def test_a_disabled_dynamics_user_cannot_connect(devhost, identity, fresh_entra):
    acct = new_account()
    oid = str(uuid.uuid4())
    identity.dataverse.add_user("gone@contoso.test", oid=oid, enabled=False)
    fresh_entra.sign_in_as("gone@contoso.test", oid)
    assert signed_in(devhost, identity, acct).headers["Location"].endswith("reason=permission")
    reason = status(devhost, acct)["reason"]
    assert reason["category"] == "permission" and "cannot use this Dynamics 365 environment" in reason["message"]
    assert secrets_of(identity, acct) == set()


def test_queued_work_of_a_disconnected_generation_is_a_no_op(devhost, identity, fresh_entra, store, wave, azurite):
    from core.storage import BACKFILL_PAGES, CONTACT_EVENTS, QueueSender, Tables
    from sync.events import validate_event
    from sync.messages import ContactMessage, PageMessage
    from sync.state import SNAPSHOTS, SnapshotStore
    from tests.fixtures.sync import wait_for

    acct = new_account()
    connect_account(devhost, identity, acct)
    created = wave.create_contact(acct, first_name="Live", last_name="One")
    cid = created["data"]["contact"]["id"]
    assert wave.send([created]) == [202]
    wait_for(lambda: identity.dataverse.contacts_by_external_id(f"wavecnct_{cid}"), 60, what="the live sync")
    live = store.get(acct)
    queues = QueueSender(StorageSettings(connection_string=azurite.connection_string))

    def drained() -> bool:
        return all(queues.client(q).get_queue_properties().approximate_message_count == 0
                   for q in (CONTACT_EVENTS, BACKFILL_PAGES))

    # control: a forced re-apply for the live generation does reach Dataverse (from the contact's snapshot, which
    # the live lane keeps where something may read it again, e.g. for a contact that failed)
    wait_for(drained, 60, what="the queues to drain")
    SnapshotStore(Tables(StorageSettings(connection_string=azurite.connection_string))(SNAPSHOTS)).put_if_newer(
        acct, validate_event(created).contact, deleted=False, event_id=created["id"])
    before = len(identity.dataverse.request_log())
    forced = ContactMessage(acct, cid, version=1, generation=live.generation, force=True)
    queues.send(CONTACT_EVENTS, forced.to_dict())
    wait_for(lambda: len(identity.dataverse.request_log()) > before, 60, what="the forced re-apply")

    assert api(devhost, "POST", f"/api/connections/{acct}/disconnect").status_code == 200
    wait_for(drained, 60, what="the queues to drain")
    before, wave_reads = len(identity.dataverse.request_log()), len(wave.api_requests(acct))
    queues.send(CONTACT_EVENTS, forced.to_dict())  # the same work, queued for the old generation
    queues.send(BACKFILL_PAGES, PageMessage(acct, live.generation, run_id="r-old", cursor=None, page=1).to_dict())
    wait_for(drained, 60, what="the old generation's messages to be consumed")
    assert len(identity.dataverse.request_log()) == before and len(wave.api_requests(acct)) == wave_reads
    assert status(devhost, acct)["state"] == "disconnected"


def test_status_reports_counters_of_the_live_generation_and_recent_failures(devhost, identity, fresh_entra, store,
                                                                            tables):
    from core.failures import FailureStore

    acct = new_account()
    connect_account(devhost, identity, acct)
    generation = store.get(acct).generation
    store.add_counts(acct, generation, synced=3, deleted=1)
    store.add_counts(acct, "an-older-generation", synced=100)  # not this connection's
    FailureStore(tables("failures")).record(acct, "c_bad", "validation", "lastname is required", version=2)
    st = status(devhost, acct)
    assert st["counters"] == {"synced": 3, "deleted": 1, "failed": 0, "skipped": 0} and st["last_sync_at"]
    (failure,) = st["failures"]
    assert failure["contact_id"] == "c_bad" and failure["category"] == "validation"
    assert failure["reason"] == "lastname is required" and failure["attempts"] == 1 and failure["last_attempt_at"]


def test_bad_disconnect_input_is_refused_and_the_connection_stays(devhost, identity, fresh_entra, store):
    acct = new_account()
    connect_account(devhost, identity, acct)
    live = store.get(acct)
    path = f"/api/connections/{acct}/disconnect"
    for kwargs, code, field in [
        ({"data": b"{not json"}, "invalid_json", "body"),
        ({"json": ["wave-user-9"]}, "invalid_json", "body"),
        ({"json": {"disconnected_by": "x" * 257}}, "invalid_request", "disconnected_by"),
        ({"json": {"disconnected_by": 7}}, "invalid_request", "disconnected_by"),
    ]:
        resp = api(devhost, "POST", path, **kwargs)
        assert resp.status_code == 400, kwargs
        assert (resp.json()["error"]["code"], resp.json()["error"]["field"]) == (code, field)
    resp = api(devhost, "POST", "/api/connections/acct.x/disconnect")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_account_id"
    after = store.get(acct)
    assert (after.state, after.generation) == ("connected", live.generation)
    assert api(devhost, "POST", path).json()["state"] == "disconnected"  # no body is allowed
