"""No access token, refresh token, id token, authorization code, PKCE verifier, client secret or webhook
secret appears in any log line while a connection is made, refused, refreshed, lost and disconnected.

Every logger is opened to DEBUG (MSAL, azure-core, urllib3 included) and the real values are taken from
where they live: the Entra stand-in's record of what it issued, the Key Vault simulator's record of the
bearer tokens it saw, the sign-in session row, and the app's settings.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import requests

from core.connections import ConnectionStore
from core.settings import StorageSettings
from core.storage import Tables
from tests.fixtures.identity import api, callback, completion_of, confirm, connect_body, sign_in, signed_in
from tests.fixtures.stack import MASTER_KEY

LOGGERS = ("", "msal", "azure", "azure.core.pipeline.policies.http_logging_policy", "azure.identity", "urllib3",
           "devhost", "oauth", "core", "sync", "requests")


def test_no_secret_reaches_a_log_line(devhost, identity, fresh_entra, app_env, azurite, caplog):
    tables = Tables(StorageSettings(connection_string=azurite.connection_string))
    store = ConnectionStore(tables("connections"))
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    acct = f"acct_{uuid.uuid4().hex[:12]}"
    verifiers: list[str] = []

    # connect, capturing the PKCE verifier the session keeps server-side
    started = api(devhost, "POST", f"/api/connections/{acct}/connect", json=connect_body(identity, auto_sync=True))
    (session,) = tables("oauthsessions").query_entities("account_id eq @a", parameters={"a": acct})
    flow = json.loads(session["flow"])
    verifiers.append(flow["code_verifier"])  # (the nonce is not a secret: it travels in the browser's URL)
    query = sign_in(identity, started.json()["authorize_url"])
    completions = [completion_of(callback(devhost, query))]  # one-time codes: never logged either
    assert callback(devhost, query).status_code == 400  # a replayed code+state is logged too
    assert confirm(devhost, acct, completions[0]).status_code == 200

    # refresh through the upkeep timer, then a refused refresh (needs_reauth), a denied consent, a reconnect
    then = (datetime.now(UTC) - timedelta(days=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    store.update(acct, lambda c: setattr(c, "token_refreshed_at", then))
    admin = {"x-functions-key": MASTER_KEY}
    assert requests.post(f"{devhost.url}/admin/functions/refresh_idle_tokens", headers=admin, timeout=60).ok
    store.update(acct, lambda c: setattr(c, "token_refreshed_at", then))
    fresh_entra.fail_refresh()
    assert requests.post(f"{devhost.url}/admin/functions/refresh_idle_tokens", headers=admin, timeout=60).ok
    assert api(devhost, "GET", f"/api/connections/{acct}").json()["state"] == "needs_reauth"
    fresh_entra.reset()
    fresh_entra.deny_next_consent()
    assert "dynamics=error" in signed_in(devhost, identity, acct).headers["Location"]
    completions.append(completion_of(signed_in(devhost, identity, acct)))
    assert confirm(devhost, acct, completions[-1]).status_code == 200
    assert api(devhost, "POST", f"/api/connections/{acct}/disconnect").status_code == 200

    issued = identity.entra.issued()
    secrets = {
        *issued["codes"], *issued["access_tokens"], *issued["id_tokens"], *issued["refresh_tokens"],
        *identity.keyvault.tokens_seen, *verifiers, *completions,
        app_env["DYNAMICS_CLIENT_SECRET"], app_env["WAVE_API_TOKEN"], *app_env["WAVE_WEBHOOK_SECRETS"].split(","),
    }
    code = parse_qs(urlsplit(f"?{query}").query)["code"][0]
    made = (code in secrets, len(issued["refresh_tokens"]) >= 3)  # connect, refresh, reconnect
    assert made == (True, True), "the flow must really have made and refreshed tokens"

    lines = [r.getMessage() + "\n" + (r.exc_text or "") for r in caplog.records]
    handled = [line for line in lines if '"function": "oauth_callback"' in line or '"kind": "connect"' in line]
    assert handled, "the app's own log lines (dev host threads included) must be in the capture"
    assert any("msal" in r.name for r in caplog.records) and any("urllib3" in r.name for r in caplog.records)
    leaks = sorted({f"{r.name}: {s[:12]}..." for r, line in zip(caplog.records, lines, strict=True)
                    for s in secrets if s and s in line})
    assert not leaks, leaks
