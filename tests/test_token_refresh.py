"""Token provider and the daily upkeep timer: memory-first tokens, write-back only on change, idle refresh,
invalid_grant -> needs_reauth (with a reason), and expired sign-in sessions removed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests

from core.connections import ConnectionStore
from oauth.errors import ReauthRequired
from oauth.token_store import TokenStore
from tests.fixtures.identity import api, connect_account, connect_body, status
from tests.fixtures.stack import MASTER_KEY


def _account() -> str:
    return f"acct_{uuid.uuid4().hex[:12]}"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _make_idle(store: ConnectionStore, account_id: str, days: int = 8) -> None:
    """As if the connection's tokens were last refreshed `days` ago."""
    then = _iso(datetime.now(UTC) - timedelta(days=days))
    store.update(account_id, lambda c: setattr(c, "token_refreshed_at", then))


def _run_upkeep(devhost) -> None:
    resp = requests.post(f"{devhost.url}/admin/functions/refresh_idle_tokens",
                         headers={"x-functions-key": MASTER_KEY}, timeout=60)
    assert resp.status_code == 202


def _vault_calls(identity, method: str | None = None) -> int:
    return sum(1 for r in identity.keyvault.requests if method is None or r.method == method)


def test_tokens_come_from_memory_and_key_vault_is_written_only_when_msal_changed_the_cache(
        devhost, identity, fresh_entra, store):
    from functions.services import services

    acct = _account()
    connect_account(devhost, identity, acct)
    conn = store.get(acct)
    s = services()
    before = _vault_calls(identity)
    tokens = {s.tokens.provider(conn)(False) for _ in range(5)}
    assert len(tokens) == 1 and _vault_calls(identity) == before  # hot path: no Key Vault call at all

    other_process = TokenStore(s.settings, s.secrets, s.connections)  # a second instance of the app
    gets = _vault_calls(identity, "GET")
    assert other_process.provider(conn)(False) in tokens
    assert other_process.provider(conn)(False) in tokens
    assert _vault_calls(identity, "GET") == gets + 1  # read once per process per generation
    puts = _vault_calls(identity, "PUT")
    cache_before = identity.keyvault.value(conn.secret_name)
    assert other_process.provider(conn)(True)  # (same-second tokens may be byte-identical: not compared)
    assert _vault_calls(identity, "PUT") == puts + 1  # the refresh changed the cache: written back once
    assert identity.keyvault.value(conn.secret_name) != cache_before
    assert store.get(acct).token_refreshed_at >= conn.token_refreshed_at


def test_invalid_grant_moves_the_connection_to_needs_reauth_and_raises(devhost, identity, fresh_entra, store):
    from functions.services import services

    acct = _account()
    connect_account(devhost, identity, acct)
    conn = store.get(acct)
    client = services().dataverse(conn)
    assert client.whoami()
    fresh_entra.fail_refresh()
    identity.dataverse.revoke_tokens()  # Dataverse answers 401: the client forces a refresh, which fails
    with pytest.raises(ReauthRequired) as info:
        client.whoami()
    assert info.value.account_id == acct
    st = status(devhost, acct)
    assert st["state"] == "needs_reauth" and st["reason"]["category"] == "auth"
    assert "AADSTS700082" in st["reason"]["message"] and "reconnect" in st["reason"]["message"]
    assert "Trace ID" not in st["reason"]["message"]
    assert not store.get(acct).accepts(conn.generation)  # its queued work is dropped

    fresh_entra.fail_refresh(False)  # the admin reconnects: a new generation, the old secret deleted
    assert connect_account(devhost, identity, acct).json()["state"] == "connected"
    again = store.get(acct)
    assert again.state == "connected" and again.reason is None and again.generation != conn.generation
    assert conn.secret_name in identity.keyvault.deleted_names()


def test_upkeep_refreshes_idle_connections_only(devhost, identity, fresh_entra, store):
    idle, busy = _account(), _account()
    connect_account(devhost, identity, idle)
    connect_account(devhost, identity, busy)
    _make_idle(store, idle)
    busy_before = store.get(busy)
    idle_cache = identity.keyvault.value(store.get(idle).secret_name)
    busy_cache = identity.keyvault.value(busy_before.secret_name)
    _run_upkeep(devhost)
    after = store.get(idle)
    assert after.state == "connected"
    assert after.token_refreshed_at > _iso(datetime.now(UTC) - timedelta(minutes=5))
    assert identity.keyvault.value(after.secret_name) != idle_cache  # a new refresh token was stored
    assert store.get(busy).token_refreshed_at == busy_before.token_refreshed_at
    assert identity.keyvault.value(busy_before.secret_name) == busy_cache


def test_upkeep_marks_a_dead_refresh_token_needs_reauth(devhost, identity, fresh_entra, store):
    acct = _account()
    connect_account(devhost, identity, acct)
    _make_idle(store, acct, days=30)
    fresh_entra.fail_refresh()
    _run_upkeep(devhost)
    st = status(devhost, acct)
    assert st["state"] == "needs_reauth" and st["reason"]["category"] == "auth"
    assert "inactivity" in st["reason"]["message"]


def test_upkeep_removes_expired_sign_in_sessions(devhost, identity, tables):
    stale, live = _account(), _account()
    for acct in (stale, live):
        assert api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity)).status_code == 200
    sessions = tables("oauthsessions")
    (row,) = sessions.query_entities("account_id eq @a", parameters={"a": stale})
    row["expires_at"] = _iso(datetime.now(UTC) - timedelta(minutes=1))
    sessions.upsert_entity(row)
    _run_upkeep(devhost)
    assert list(sessions.query_entities("account_id eq @a", parameters={"a": stale})) == []
    assert len(list(sessions.query_entities("account_id eq @a", parameters={"a": live}))) == 1
