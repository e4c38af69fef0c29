"""Connecting an account to Dynamics 365: start the sign-in, finish it, confirm it, disconnect.

Plain functions that take their clients as arguments; oauth/api.py wires them to HTTP. Connecting has two
phases (oauth/pending.py says why): the callback finishes Microsoft's sign-in and checks, through
Dataverse itself, that the user can do what the sync needs, but only keeps the result pending; the
connection goes live when Wave's backend confirms it for the Wave user who started the connect. Until a
confirm succeeds, a live connection stays exactly as it was.
"""

from __future__ import annotations

import hmac
import logging
import re
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
    Connection,
    ConnectionStore,
    invalid_account_id,
    utcnow,
    valid_account_id,
)
from core.errors import ConcurrencyError, FieldError
from core.log import outcome
from core.settings import Settings
from core.storage import QueueSender
from dataverse.client import WhoAmI
from dataverse.errors import DataverseError
from dataverse.transport import TokenProvider
from oauth.authority import confidential_client
from oauth.errors import ConnectFailed
from oauth.instance_url import Instance, parse_instance_url
from oauth.pending import PendingSignIn, PendingStore, code_hash, new_completion_code, well_formed
from oauth.return_url import validate_return_url
from oauth.sessions import OAuthSession, SessionStore, expiry
from oauth.token_store import TokenStore

log = logging.getLogger(__name__)

ELIGIBLE_PLANS = ("pro", "teams", "enterprise")
# What the sync does as the signed-in user: create, update and assign contacts, read them back, and
# look up owners among the systemusers.
REQUIRED_PRIVILEGES = ("prvCreateContact", "prvWriteContact", "prvAssignContact", "prvReadContact", "prvReadUser")


class DataverseAccess(Protocol):  # dataverse/client.py DataverseClient
    def whoami(self) -> WhoAmI: ...

    def retrieve_user_privileges(self, user_id: str) -> set[str]: ...


# sync/backfill.py start_backfill, handed in by functions/connections.py: oauth/ does not import sync/.
BackfillStarter = Callable[[ConnectionStore, QueueSender, str], str | None]
DataverseFactory = Callable[[str, TokenProvider], DataverseAccess]


@dataclass(frozen=True)
class ConnectRequest:
    account_id: str
    plan: str
    instance: Instance
    return_url: str
    auto_sync: bool
    initiated_by: str
    delete_policy: str


def _account_and_body(account_id: str, body: object) -> dict[str, object]:
    if not valid_account_id(account_id):
        raise invalid_account_id()
    if not isinstance(body, dict):
        raise FieldError("the body must be a JSON object", field="body", code="invalid_json")
    return body


def parse_connect_request(account_id: str, body: object, settings: Settings) -> ConnectRequest:
    """Validate every field of a connect call; FieldError names the first bad one."""
    body = _account_and_body(account_id, body)
    plan = body.get("plan")
    if not isinstance(plan, str) or not plan.strip():
        raise FieldError("plan is required (pro, teams or enterprise)", field="plan")
    if plan.strip().lower() not in ELIGIBLE_PLANS:
        raise FieldError(f"the {plan.strip()[:40]!r} plan does not include the Dynamics 365 integration; "
                         "it needs Pro, Teams or Enterprise", field="plan", code="plan_not_eligible", status=403)
    dev_hosts = settings.dev.allowed_instance_hosts if settings.is_development else ()
    instance = parse_instance_url(body.get("instance_url"), dev_hosts)
    return_url = validate_return_url(body.get("return_url"), settings.wave_return_url_prefixes)
    if return_url is None:  # the browser must come back to Wave: only Wave can confirm the sign-in
        raise FieldError("return_url is required: the Wave page the browser returns to after sign-in, "
                         "where Wave confirms the connection", field="return_url", code="invalid_return_url")
    auto_sync = body.get("auto_sync", False)
    if not isinstance(auto_sync, bool):
        raise FieldError("auto_sync must be true or false", field="auto_sync")
    initiated_by = body.get("initiated_by")
    if not isinstance(initiated_by, str) or not initiated_by.strip() or len(initiated_by) > 256:
        raise FieldError("initiated_by is required: the Wave user starting the connection (at most 256 "
                         "characters)", field="initiated_by")
    delete_policy = body.get("delete_policy", "delete")
    if delete_policy not in DELETE_POLICIES:
        raise FieldError(f"delete_policy must be one of {', '.join(DELETE_POLICIES)}", field="delete_policy")
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


# -- the callback: finish Microsoft's sign-in, keep the result pending ---------------------------------


@dataclass(frozen=True)
class CallbackOutcome:
    session: OAuthSession
    ok: bool
    category: str | None = None
    message: str = ""
    completion: str | None = None  # the one-time code the browser takes back to Wave, on success


# Entra's `error` is an OAuth error code (RFC 6749 §4.1.2.1: printable ASCII, in practice [a-z_]); the
# description is free text from the redirect's query, which anyone can forge. Only a recognisable code
# and an AADSTS number from it are kept (https://learn.microsoft.com/entra/identity-platform/reference-error-codes).
_ERROR_CODE_RE = re.compile(r"^[a-z_]{1,64}$")
_AADSTS_RE = re.compile(r"\bAADSTS\d{4,7}\b")


def microsoft_error(error: str, description: str | None) -> ConnectFailed:
    """Entra's `error` / `error_description` on the redirect, as a category and a short sentence for people.

    Nothing of the description is kept but an AADSTS code, so no text from the query reaches the status."""
    code = error if _ERROR_CODE_RE.fullmatch(error) else "unrecognised_error"
    found = _AADSTS_RE.search((description or "")[:2000])
    aadsts = found.group(0) if found else ""
    ref = f" ({aadsts})" if aadsts else ""
    if aadsts == "AADSTS65004" or code == "access_denied":
        return ConnectFailed("consent", f"Sign-in was cancelled or the permissions Wave asked for were declined{ref}. "
                                        "Connect again and accept to continue.")
    if code in ("consent_required", "interaction_required") or aadsts in ("AADSTS65001", "AADSTS90094"):
        return ConnectFailed("consent", "Your organisation requires an administrator to approve Wave's access "
                                        f"to Dynamics 365 (admin consent){ref}.")
    return ConnectFailed("auth", f"Microsoft sign-in failed: {code}{ref}.")


def finish_connect(params: Mapping[str, str], *, settings: Settings, sessions: SessionStore,
                   connections: ConnectionStore, pending: PendingStore, tokens: TokenStore,
                   dataverse: DataverseFactory) -> CallbackOutcome:
    """Consume the sign-in named by `state` and, if Microsoft and Dataverse agree, keep it pending for Wave.

    Nothing goes live here. SessionInvalid propagates (unknown, used or expired state: nothing changes).
    """
    session = sessions.consume(params.get("state", ""))
    try:
        if params.get("error"):
            raise microsoft_error(params["error"], params.get("error_description"))
        cache = msal.SerializableTokenCache()
        claims, provider = _redeem(settings, session, params, cache)
        username = str(claims.get("preferred_username") or claims.get("upn") or claims.get("email") or "")
        user_id = _check_access(dataverse(session.instance_url, provider), username)
        completion = _keep_pending(session, claims, username, user_id, cache, pending, tokens)
    except ConnectFailed as failed:
        _record_failure(connections, session, failed)
        outcome(log, "connect", "failed", account_id=session.account_id, category=failed.category)
        return CallbackOutcome(session, False, failed.category, failed.message)
    outcome(log, "connect", "awaiting_confirm", account_id=session.account_id)
    return CallbackOutcome(session, True, completion=completion)


def _redeem(settings: Settings, session: OAuthSession, params: Mapping[str, str],
            cache: msal.SerializableTokenCache) -> tuple[dict[str, Any], TokenProvider]:
    """Exchange the code (with the PKCE verifier kept in the session) for tokens in `cache`."""
    try:
        app = confidential_client(settings, login_host=session.login_host, cache=cache)
        result = app.acquire_token_by_auth_code_flow(session.flow, dict(params))
    except (OSError, ValueError) as exc:  # Entra unreachable, or a response that does not match the flow
        raise ConnectFailed("auth", f"Microsoft sign-in could not be completed ({type(exc).__name__}). "
                                    "Try connecting again.") from exc
    if "access_token" not in result:
        raise microsoft_error(str(result.get("error") or ""), result.get("error_description"))
    scope = f"{session.instance_url}/user_impersonation"
    first = str(result["access_token"])

    def provider(force_refresh: bool = False) -> str:
        if not force_refresh:
            return first
        accounts = app.get_accounts()
        fresh = app.acquire_token_silent_with_error([scope], accounts[0], force_refresh=True) if accounts else None
        if not fresh or "access_token" not in fresh:
            raise ConnectFailed("auth", "Microsoft would not renew the new sign-in's token.")
        return str(fresh["access_token"])

    return dict(result.get("id_token_claims") or {}), provider


def _check_access(client: DataverseAccess, username: str) -> str:
    """The signed-in user's systemuserid, once Dataverse confirms every privilege the sync needs."""
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


def _keep_pending(session: OAuthSession, claims: Mapping[str, Any], username: str, user_id: str,
                  cache: msal.SerializableTokenCache, pending: PendingStore, tokens: TokenStore) -> str:
    """Store the tokens under a new generation and the sign-in as pending; returns its completion code."""
    generation = uuid.uuid4().hex
    try:
        name = tokens.store_new(session.account_id, generation, cache)
    except AzureError as exc:
        raise ConnectFailed("internal", f"The sign-in could not be stored in Key Vault ({type(exc).__name__}). "
                                        "Try connecting again; if it keeps failing, contact Wave support.") from exc
    code = new_completion_code()
    try:
        pending.create(PendingSignIn(
            account_id=session.account_id, code_hash=code_hash(code), generation=generation, secret_name=name,
            instance_url=session.instance_url, plan=session.plan, initiated_by=session.initiated_by,
            connected_by=username, dataverse_user_id=user_id, auto_sync=session.auto_sync,
            delete_policy=session.delete_policy, expires_at=expiry(), tenant_id=claims.get("tid")))
    except Exception:
        tokens.delete(name, generation)  # nothing points at it
        raise
    return code


def _record_failure(connections: ConnectionStore, session: OAuthSession, failed: ConnectFailed) -> None:
    """Show why a connect failed on a pending row; a live or needs_reauth connection is not touched."""

    def note(conn: Connection) -> bool:
        if conn.state != PENDING:
            return False
        conn.reason_category, conn.reason = failed.category, failed.message
        return True

    connections.update(session.account_id, note)


# -- confirm: Wave's backend, for its signed-in user, makes the pending sign-in live ------------------------


@dataclass(frozen=True)
class ConfirmRequest:
    account_id: str
    completion: str
    confirmed_by: str


def parse_confirm_request(account_id: str, body: object) -> ConfirmRequest:
    body = _account_and_body(account_id, body)
    completion = body.get("completion")
    if not isinstance(completion, str) or not well_formed(completion):
        raise FieldError("completion must be the code Wave's return page received after sign-in",
                         field="completion")
    confirmed_by = body.get("confirmed_by")
    if not isinstance(confirmed_by, str) or not confirmed_by.strip() or len(confirmed_by) > 256:
        raise FieldError("confirmed_by is required: the signed-in Wave user confirming the connection (at most "
                         "256 characters)", field="confirmed_by")
    return ConfirmRequest(account_id, completion, confirmed_by.strip())


def confirm_connect(req: ConfirmRequest, *, pending: PendingStore, connections: ConnectionStore,
                    tokens: TokenStore, queues: QueueSender, start_backfill: BackfillStarter) -> None:
    """Activate the pending sign-in `req.completion` names; FieldError (4xx, nothing changed) otherwise."""
    found = pending.find(req.account_id, req.completion)
    if found is None:
        raise FieldError("no sign-in of this account has this completion code", field="completion",
                         code="unknown_completion", status=404)
    if found.used:
        raise FieldError("this sign-in was already confirmed", field="completion", code="completion_used",
                         status=409)
    if found.expired():
        raise FieldError("this sign-in expired: it must be confirmed within 10 minutes; connect again",
                         field="completion", code="completion_expired", status=410)
    if not hmac.compare_digest(req.confirmed_by.encode(), found.initiated_by.encode()):
        raise FieldError("only the Wave user who started this connection can confirm it", field="confirmed_by",
                         code="not_initiator", status=403)
    if not pending.claim(found):  # a second confirm racing this one got there first
        raise FieldError("this sign-in was already confirmed", field="completion", code="completion_used",
                         status=409)
    _activate(found, req.confirmed_by, connections, tokens)
    if found.auto_sync:
        start_backfill(connections, queues, found.account_id)
    outcome(log, "connect", "connected", account_id=found.account_id, generation=found.generation)


def _activate(signin: PendingSignIn, confirmed_by: str, connections: ConnectionStore, tokens: TokenStore) -> None:
    """Switch the row to the sign-in's generation, then drop the previous generation's secret."""
    now = utcnow()
    previous: dict[str, str | None] = {}

    def connect(conn: Connection) -> None:
        previous.update(generation=conn.generation, secret_name=conn.secret_name)
        conn.state, conn.generation, conn.secret_name = CONNECTED, signin.generation, signin.secret_name
        conn.instance_url, conn.tenant_id, conn.plan = signin.instance_url, signin.tenant_id, signin.plan
        conn.initiated_by, conn.connected_by, conn.connected_at = confirmed_by, signin.connected_by, now
        conn.dataverse_user_id, conn.auto_sync = signin.dataverse_user_id, signin.auto_sync
        conn.delete_policy, conn.token_refreshed_at, conn.reason_category, conn.reason = \
            signin.delete_policy, now, None, None
        conn.disconnected_by = conn.disconnected_at = None

    try:
        if connections.update(signin.account_id, connect) is None:
            row = Connection(account_id=signin.account_id)
            connect(row)
            connections.save(row)
    except Exception:
        tokens.delete(signin.secret_name, signin.generation)  # the row never pointed at it
        raise
    if previous.get("secret_name") and previous["secret_name"] != signin.secret_name:
        tokens.delete(previous["secret_name"], previous.get("generation"))


def purge_expired_sign_ins(pending: PendingStore, tokens: TokenStore) -> int:
    """Delete pending sign-ins past their 10 minutes, with the tokens of those never confirmed."""
    removed = 0
    for signin in pending.expired():
        if not pending.delete(signin):  # changed since read: the next run looks again
            continue
        removed += 1
        if not signin.used:  # a confirmed one's secret belongs to the live connection now
            tokens.delete(signin.secret_name, signin.generation)
    if removed:
        outcome(log, "connect", "pending_sign_ins_purged", removed=removed)
    return removed


# -- disconnect -------------------------------------------------------------------------------------


def parse_disconnect_request(account_id: str, body: object) -> str | None:
    """Who disconnects (optional); FieldError for a bad account id, body or field. No body is an empty one."""
    who = _account_and_body(account_id, body).get("disconnected_by")
    if who is not None and (not isinstance(who, str) or len(who) > 256):
        raise FieldError("disconnected_by must be a string of at most 256 characters", field="disconnected_by")
    return who


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
