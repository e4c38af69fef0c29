"""The connections API (Functions key auth, called by Wave's backend) and the OAuth callback. Thin: parse,
validate, call oauth/connect.py or sync/, answer.

    POST /api/connections/{account_id}/connect          start a sign-in -> 200 {authorize_url, expires_at}
    GET  /api/oauth/callback                            (anonymous, the admin's browser) keep the sign-in pending
    POST /api/connections/{account_id}/confirm          make the pending sign-in live -> 200 status
    GET  /api/connections/{account_id}                  status
    POST /api/connections/{account_id}/disconnect       stop the sync, delete tokens and contact data -> 200 status
    POST /api/connections/{account_id}/sync             start a full backfill now -> 202 {"run_id"}
    POST /api/connections/{account_id}/failures/retry   re-queue the contacts that failed -> 202
                                                        {"requeued", "already_queued", "backfill_run_id"}

The route's account id is the only key any of these functions reads or writes by, so one account can
never see or change another's connection; a malformed one is answered 400 `invalid_account_id` by every
route, and `sync` and `failures/retry` answer 409 `not_connected` without a live connection.
"""

from __future__ import annotations

import logging

import azure.functions as func
from azure.core.exceptions import AzureError

from core.connections import invalid_account_id, live_connection, utcnow, valid_account_id
from core.errors import FieldError
from core.log import outcome
from functions.http import Blueprint, error_response, json_response
from functions.pages import page, redirect
from functions.services import services
from oauth import connect as flow
from oauth.errors import SessionInvalid
from oauth.pending import TABLE as PENDING_TABLE
from oauth.pending import PendingStore
from oauth.return_url import with_result
from oauth.sessions import TABLE as SESSIONS_TABLE
from oauth.sessions import SessionStore
from oauth.status import connection_status
from sync.backfill import start_backfill
from sync.retry import retry_failures
from sync.upkeep import DISCONNECT_ROWS, forget_contact_data

log = logging.getLogger(__name__)
bp = Blueprint()


def _sessions() -> SessionStore:
    return SessionStore(services().tables(SESSIONS_TABLE))


def _pending() -> PendingStore:
    return PendingStore(services().tables(PENDING_TABLE))


def _json_body(req: func.HttpRequest) -> object:
    try:
        return req.get_json()
    except ValueError:
        return None


def _account(req: func.HttpRequest) -> str | None:
    account_id = req.route_params.get("account_id", "")
    return account_id if valid_account_id(account_id) else None


def _refused(error: FieldError) -> func.HttpResponse:
    return error_response(error.status, error.code, error.message, field=error.field)


def _bad_account() -> func.HttpResponse:
    return _refused(invalid_account_id())


def _status(account_id: str) -> func.HttpResponse:
    s = services()
    conn = s.connections.get(account_id)
    if conn is None:
        return error_response(404, "not_found", f"account {account_id} has no Dynamics 365 connection")
    return json_response(connection_status(conn, s.connections.counters(account_id, conn.generation),
                                           s.failures.recent(account_id), _pending().waiting(account_id)))


@bp.function_name("connect")
@bp.route(route="connections/{account_id}/connect", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def connect(req: func.HttpRequest) -> func.HttpResponse:
    s = services()
    try:
        request = flow.parse_connect_request(req.route_params.get("account_id", ""), _json_body(req), s.settings)
    except FieldError as exc:
        outcome(log, "connect", "rejected", field=exc.field, code=exc.code)
        return _refused(exc)
    try:
        answer = flow.start_connect(request, settings=s.settings, sessions=_sessions(), connections=s.connections)
    except (OSError, ValueError) as exc:  # the cloud's Entra metadata could not be fetched
        outcome(log, "connect", "unavailable", level=logging.WARNING, account_id=request.account_id,
                error=type(exc).__name__)
        return error_response(502, "identity_provider_unavailable",
                              "Microsoft sign-in could not be reached; try again shortly")
    return json_response(answer)


# The callback is anonymous: before any storage call, refuse what no real redirect from Entra carries
# (its codes are a few KB at most).
_MAX_CALLBACK_PARAM = 8192


@bp.function_name("oauth_callback")
@bp.route(route="oauth/callback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def oauth_callback(req: func.HttpRequest) -> func.HttpResponse:
    params = dict(req.params)
    if len(params) > 16 or any(len(k) > 64 or len(v) > _MAX_CALLBACK_PARAM for k, v in params.items()):
        outcome(log, "oauth_callback", "oversized")
        return page("This sign-in link is not valid", "The link carries more than a sign-in ever does.",
                    ok=False, status=400, hint="Start the connection again from Wave's Integrations page.")
    s = services()
    try:
        result = flow.finish_connect(params, settings=s.settings, sessions=_sessions(), connections=s.connections,
                                     pending=_pending(), tokens=s.tokens, dataverse=s.dataverse_client)
    except SessionInvalid as exc:
        outcome(log, "oauth_callback", "invalid_state")
        return page("This sign-in link cannot be used", f"{exc}.",
                    ok=False, status=400, hint="Start the connection again from Wave's Integrations page.")
    if not result.session.return_url:  # a sign-in started before return_url was required
        return page("Return to Wave", "Start the connection again from Wave's Integrations page.", ok=False)
    if result.ok and result.completion:
        return redirect(with_result(result.session.return_url, dynamics="confirm", completion=result.completion))
    return redirect(with_result(result.session.return_url, dynamics="error", reason=result.category or "internal"))


@bp.function_name("confirm")
@bp.route(route="connections/{account_id}/confirm", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def confirm(req: func.HttpRequest) -> func.HttpResponse:
    s = services()
    try:
        request = flow.parse_confirm_request(req.route_params.get("account_id", ""), _json_body(req))
        flow.confirm_connect(request, pending=_pending(), connections=s.connections, tokens=s.tokens,
                             queues=s.queues, start_backfill=start_backfill)
    except FieldError as exc:
        outcome(log, "confirm", "refused", code=exc.code)
        return _refused(exc)
    return _status(request.account_id)


@bp.function_name("connection_status")
@bp.route(route="connections/{account_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def status(req: func.HttpRequest) -> func.HttpResponse:
    account_id = _account(req)
    return _bad_account() if account_id is None else _status(account_id)


@bp.function_name("disconnect")
@bp.route(route="connections/{account_id}/disconnect", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def disconnect(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    try:
        who = flow.parse_disconnect_request(account_id, _json_body(req) if req.get_body() else {})
    except FieldError as exc:
        return _refused(exc)
    s = services()
    conn = flow.disconnect(account_id, who, connections=s.connections, tokens=s.tokens)
    if conn is None:
        return error_response(404, "not_found", f"account {account_id} has no Dynamics 365 connection")
    _forget_contact_data(account_id, conn.disconnected_at or utcnow())
    return _status(account_id)


def _forget_contact_data(account_id: str, before: str) -> None:
    """The disconnected account's contact content goes now, as far as DISCONNECT_ROWS per table; the daily
    purge_expired_sync_rows finishes what is left (or what a storage error here left)."""
    try:
        forgotten = forget_contact_data(services().tables, account_id, before, limit=DISCONNECT_ROWS)
    except AzureError as exc:
        outcome(log, "connect", "contact_data_left_for_upkeep", level=logging.WARNING, account_id=account_id,
                error=type(exc).__name__)
        return
    outcome(log, "connect", "contact_data_deleted", account_id=account_id, complete=forgotten.complete,
            **forgotten.rows)


def _not_connected(account_id: str) -> func.HttpResponse:
    return error_response(409, "not_connected", f"account {account_id} has no active Dynamics connection")


@bp.function_name("start_sync")
@bp.route(route="connections/{account_id}/sync", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def start_sync(req: func.HttpRequest) -> func.HttpResponse:
    account_id = _account(req)
    if account_id is None:
        return _bad_account()
    s = services()
    run_id = start_backfill(s.connections, s.queues, account_id)
    if run_id is None:
        return _not_connected(account_id)
    outcome(log, "sync", "backfill_started", account_id=account_id, run_id=run_id)
    return json_response({"run_id": run_id, "state": "running"}, 202)


@bp.function_name("retry_failures")
@bp.route(route="connections/{account_id}/failures/retry", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def retry(req: func.HttpRequest) -> func.HttpResponse:
    account_id = _account(req)
    if account_id is None:
        return _bad_account()
    ctx = services().sync
    conn = live_connection(ctx.connections.get(account_id))
    if conn is None:
        return _not_connected(account_id)
    result = retry_failures(ctx, account_id, conn.generation)
    outcome(log, "sync", "failures_requeued", account_id=account_id, requeued=result.requeued,
            already_queued=result.already_queued, run_id=result.backfill_run_id)
    return json_response({"requeued": result.requeued, "already_queued": result.already_queued,
                          "backfill_run_id": result.backfill_run_id}, 202)
