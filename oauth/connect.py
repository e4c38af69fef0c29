"""Connecting an account to Dynamics 365: start the sign-in, finish it, disconnect.

Plain functions that take their clients as arguments; oauth/api.py wires them to HTTP. A connection
is only called good after the signed-in user proved, through Dataverse itself, that it can do what the
sync needs. Until a callback succeeds, a live connection stays exactly as it was.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msal
from azure.core.exceptions import AzureError

from core.connections import (
    CONNECTED,
    DELETE_POLICIES,
    DISCONNECTED,
    NEEDS_REAUTH,
    PENDING,
    ConcurrencyError,
    Connection,
    ConnectionStore,
    utcnow,
    valid_account_id,
)
from core.log import outcome
from core.settings import Settings
from core.storage import QueueSender
from oauth.authority import confidential_client
from oauth.errors import ConnectFailed, InvalidInput
from oauth.instance_url import Instance, parse_instance_url
from oauth.return_url import validate_return_url
from oauth.sessions import OAuthSession, SessionStore, expiry
from oauth.token_store import TokenStore, first_line

log = logging.getLogger(__name__)

ELIGIBLE_PLANS = ("pro", "teams", "enterprise")
# What the sync does as the signed-in user: create, update and assign contacts, read them back, and
# look up owners among the systemusers.
REQUIRED_PRIVILEGES = ("prvCreateContact", "prvWriteContact", "prvAssignContact", "prvReadContact", "prvReadUser")


class DataverseAccess(Protocol):  # sync.dataverse.DataverseClient
    def whoami(self) -> Any: ...

    def retrieve_user_privileges(self, user_id: str) -> set[str]: ...


DataverseFactory = Callable[[str, Callable[[bool], str]], DataverseAccess]


@dataclass(frozen=True)
class ConnectRequest:
    account_id: str
    plan: str
    instance: Instance
    return_url: str | None
    auto_sync: bool
    initiated_by: str
    delete_policy: str


def parse_connect_request(account_id: str, body: object, settings: Settings) -> ConnectRequest:
    """Validate every field of a connect call; InvalidInput names the first bad one."""
    if not valid_account_id(account_id):
        raise InvalidInput("account_id must be 1-64 letters, digits, '_' or '-'", field="account_id",
                           code="invalid_account_id")
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", field="body", code="invalid_json")
    plan = body.get("plan")
    if not isinstance(plan, str) or not plan.strip():
        raise InvalidInput("plan is required (pro, teams or enterprise)", field="plan")
    if plan.strip().lower() not in ELIGIBLE_PLANS:
        raise InvalidInput(f"the {plan.strip()[:40]!r} plan does not include the Dynamics 365 integration; "
                           "it needs Pro, Teams or Enterprise", field="plan", code="plan_not_eligible", status=403)
    dev_hosts = settings.dev.allowed_instance_hosts if settings.is_development else ()
    instance = parse_instance_url(body.get("instance_url"), dev_hosts)
    return_url = validate_return_url(body.get("return_url"), settings.wave_return_url_prefixes)
    auto_sync = body.get("auto_sync", False)
    if not isinstance(auto_sync, bool):
        raise InvalidInput("auto_sync must be true or false", field="auto_sync")
    initiated_by = body.get("initiated_by")
    if not isinstance(initiated_by, str) or not initiated_by.strip() or len(initiated_by) > 256:
        raise InvalidInput("initiated_by is required: the Wave user starting the connection (at most 256 "
                           "characters)", field="initiated_by")
    delete_policy = body.get("delete_policy", "delete")
    if delete_policy not in DELETE_POLICIES:
        raise InvalidInput(f"delete_policy must be one of {', '.join(DELETE_POLICIES)}", field="delete_policy")
    return ConnectRequest(account_id=account_id, plan=plan.strip().lower(), instance=instance, return_url=return_url,
                          auto_sync=auto_sync, initiated_by=initiated_by.strip(), delete_policy=delete_policy)


def start_connect(req: ConnectRequest, *, settings: Settings, sessions: SessionStore,
                  connections: ConnectionStore) -> dict[str, str]:
    """Begin the auth-code + PKCE sign-in; returns {authorize_url, expires_at}."""
    app = confidential_client(settings, login_host=req.instance.login_host)
    flow = app.initiate_auth_code_flow([req.instance.scope], redirect_uri=settings.oauth_redirect_uri,
                                       prompt="select_account")
    expires_at = expiry()
    sessions.create(OAuthSession(
        state=flow["state"], account_id=req.account_id, instance_url=req.instance.url,
        login_host=req.instance.login_host, plan=req.plan, initiated_by=req.initiated_by, auto_sync=req.auto_sync,
        delete_policy=req.delete_policy, return_url=req.return_url, expires_at=expires_at, flow=flow))
    _mark_pending(connections, req)
    outcome(log, "connect", "started", account_id=req.account_id, instance=req.instance.host)
    return {"authorize_url": flow["auth_uri"], "expires_at": expires_at}


def _mark_pending(connections: ConnectionStore, req: ConnectRequest) -> None:
    """A row in `pending` for a new or disconnected account; a live or needs_reauth row is left alone."""

    def pending(conn: Connection) -> bool:
        if conn.state in (CONNECTED, NEEDS_REAUTH):
            return False
        conn.state, conn.instance_url, conn.plan = PENDING, req.instance.url, req.plan
        conn.initiated_by, conn.auto_sync, conn.delete_policy = req.initiated_by, req.auto_sync, req.delete_policy
        conn.reason_category = conn.reason = None
        return True

    for _ in range(3):
        if connections.update(req.account_id, pending) is not None:
            return
        row = Connection(account_id=req.account_id)
        pending(row)
        try:
            connections.save(row)
            return
        except ConcurrencyError:  # another connect created it just now: update that row instead
            continue


# -- the callback -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackOutcome:
    session: OAuthSession
    connected: bool
    category: str | None = None
    message: str = ""
    connected_by: str | None = None


def microsoft_error(error: str, description: str | None) -> ConnectFailed:
    """Entra's `error` / `error_description` on the redirect, as a category and a sentence for people."""
    detail = first_line(description)
    if "AADSTS65004" in detail or error == "access_denied":
        return ConnectFailed("consent", "Sign-in was cancelled or the permissions Wave asked for were declined"
                                        f"{f' ({detail})' if detail else ''}. Connect again and accept to continue.")
    if error in ("consent_required", "interaction_required") or "AADSTS65001" in detail or "AADSTS90094" in detail:
        return ConnectFailed("consent", "Your organisation requires an administrator to approve Wave's access "
                                        f"to Dynamics 365 (admin consent){f' ({detail})' if detail else ''}.")
    return ConnectFailed("auth", f"Microsoft sign-in failed: {detail or error}.")


def finish_connect(params: Mapping[str, str], *, settings: Settings, sessions: SessionStore,
                   connections: ConnectionStore, tokens: TokenStore, queues: QueueSender,
                   dataverse: DataverseFactory, start_backfill: Callable[..., Any]) -> CallbackOutcome:
    """Consume the sign-in named by `state` and, if Microsoft and Dataverse agree, activate the connection.

    SessionInvalid propagates (unknown, used or expired state: nothing changes).
    """
    session = sessions.consume(params.get("state", ""))
    try:
        if params.get("error"):
            raise microsoft_error(params["error"], params.get("error_description"))
        cache = msal.SerializableTokenCache()
        claims, provider = _redeem(settings, session, params, cache)
        username = str(claims.get("preferred_username") or claims.get("upn") or claims.get("email") or "")
        user_id = _check_access(dataverse(session.instance_url, provider), username)
        generation = _activate(session, claims, username, user_id, cache, connections, tokens)
    except ConnectFailed as failed:
        _record_failure(connections, session, failed)
        outcome(log, "connect", "failed", account_id=session.account_id, category=failed.category)
        return CallbackOutcome(session, False, failed.category, failed.message)
    if session.auto_sync:
        start_backfill(connections, queues, session.account_id)
    outcome(log, "connect", "connected", account_id=session.account_id, generation=generation)
    return CallbackOutcome(session, True, connected_by=username)


def _redeem(settings: Settings, session: OAuthSession, params: Mapping[str, str],
            cache: msal.SerializableTokenCache) -> tuple[dict[str, Any], Callable[[bool], str]]:
    """Exchange the code (with the PKCE verifier kept in the session) for tokens in `cache`."""
    try:
        app = confidential_client(settings, login_host=session.login_host, cache=cache)
        result = app.acquire_token_by_auth_code_flow(session.flow, dict(params))
    except (OSError, ValueError) as exc:  # Entra unreachable, or a response that does not match the flow
        raise ConnectFailed("auth", f"Microsoft sign-in could not be completed ({type(exc).__name__}). "
                                    "Try connecting again.") from exc
    if "access_token" not in result:
        detail = first_line(result.get("error_description")) or result.get("error")
        raise ConnectFailed("auth", f"Microsoft sign-in failed: {detail}.")
    scope = f"{session.instance_url}/user_impersonation"
    first = result["access_token"]

    def provider(force_refresh: bool = False) -> str:
        if not force_refresh:
            return first
        accounts = app.get_accounts()
        fresh = app.acquire_token_silent_with_error([scope], accounts[0], force_refresh=True) if accounts else None
        if not fresh or "access_token" not in fresh:
            raise ConnectFailed("auth", "Microsoft would not renew the new sign-in's token.")
        return fresh["access_token"]

    return dict(result.get("id_token_claims") or {}), provider


def _check_access(client: DataverseAccess, username: str) -> str:
    """The signed-in user's systemuserid, once Dataverse confirms every privilege the sync needs."""
    from sync.dataverse import DataverseError

    who = f"{username} " if username else "the signed-in user "
    try:
        user_id = client.whoami().user_id
        held = client.retrieve_user_privileges(user_id)
    except DataverseError as exc:
        status = getattr(exc, "status", None)
        if status == 403:
            raise ConnectFailed("permission", f"{who}cannot use this Dynamics 365 environment (not a user there, "
                                              f"disabled, or without a security role): {exc}") from exc
        if status == 401:
            raise ConnectFailed("auth", f"Dynamics 365 did not accept the sign-in ({exc}). Check that the "
                                        "environment belongs to the directory signed in to.") from exc
        raise ConnectFailed("transient", f"Dynamics 365 did not answer the access check ({exc}). "
                                         "Try connecting again.") from exc
    except OSError as exc:
        raise ConnectFailed("transient", f"Dynamics 365 could not be reached ({type(exc).__name__}). "
                                         "Try connecting again.") from exc
    missing = missing_privileges(held)
    if missing:
        raise ConnectFailed("permission", f"{who}lacks the Dynamics 365 privilege{'s' if len(missing) > 1 else ''} "
                                          f"{', '.join(missing)}. Give them a security role that can create, "
                                          "write, assign and read contacts and read users, then connect again.")
    return user_id


def missing_privileges(held: set[str]) -> list[str]:
    names = {p.lower() for p in held}
    return [p for p in REQUIRED_PRIVILEGES if p.lower() not in names]


def _activate(session: OAuthSession, claims: Mapping[str, Any], username: str, user_id: str,
              cache: msal.SerializableTokenCache, connections: ConnectionStore, tokens: TokenStore) -> str:
    """Store the tokens under a new generation, switch the row to it, then drop the old generation."""
    generation = uuid.uuid4().hex
    try:
        name = tokens.store_new(session.account_id, generation, cache)
    except AzureError as exc:
        raise ConnectFailed("internal", f"The sign-in could not be stored in Key Vault ({type(exc).__name__}). "
                                        "Try connecting again; if it keeps failing, contact Wave support.") from exc
    now = utcnow()
    previous: dict[str, str | None] = {}

    def connect(conn: Connection) -> None:
        previous.update(generation=conn.generation, secret_name=conn.secret_name)
        conn.state, conn.generation, conn.secret_name = CONNECTED, generation, name
        conn.instance_url, conn.tenant_id, conn.plan = session.instance_url, claims.get("tid"), session.plan
        conn.initiated_by, conn.connected_by, conn.connected_at = session.initiated_by, username, now
        conn.dataverse_user_id, conn.auto_sync, conn.delete_policy = user_id, session.auto_sync, session.delete_policy
        conn.token_refreshed_at, conn.reason_category, conn.reason = now, None, None
        conn.disconnected_by = conn.disconnected_at = None

    try:
        if connections.update(session.account_id, connect) is None:
            row = Connection(account_id=session.account_id)
            connect(row)
            connections.save(row)
    except Exception:
        tokens.delete(name, generation)  # the row never pointed at it
        raise
    if previous.get("secret_name") and previous["secret_name"] != name:
        tokens.delete(previous["secret_name"], previous.get("generation"))
    return generation


def _record_failure(connections: ConnectionStore, session: OAuthSession, failed: ConnectFailed) -> None:
    """Show why a connect failed on a pending row; a live or needs_reauth connection is not touched."""

    def note(conn: Connection) -> bool:
        if conn.state != PENDING:
            return False
        conn.reason_category, conn.reason = failed.category, failed.message
        return True

    connections.update(session.account_id, note)


# -- disconnect -------------------------------------------------------------------------------------


def disconnect(account_id: str, disconnected_by: str | None, *, connections: ConnectionStore,
               tokens: TokenStore) -> Connection | None:
    """Stop the sync (no generation: queued work becomes a no-op) and delete the stored tokens."""
    previous: dict[str, str | None] = {}
    now = utcnow()

    def stop(conn: Connection) -> None:
        previous.update(generation=conn.generation, secret_name=conn.secret_name)
        conn.state, conn.generation, conn.secret_name = DISCONNECTED, None, None
        conn.disconnected_by, conn.disconnected_at = disconnected_by, now
        conn.reason_category = conn.reason = None
        if conn.backfill.state == "running":
            conn.backfill.state, conn.backfill.finished_at = "cancelled", now

    conn = connections.update(account_id, stop)
    if conn is not None:
        tokens.delete(previous.get("secret_name"), previous.get("generation"))
        outcome(log, "connect", "disconnected", account_id=account_id)
    return conn
