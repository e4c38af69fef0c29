"""Sync actions on a connection (Functions key auth, called by Wave's backend):

    POST /api/connections/{account_id}/sync             start a full backfill now -> 202 {"run_id"}
    POST /api/connections/{account_id}/failures/retry   re-queue the contacts that failed -> 202
                                                        {"requeued", "already_queued", "backfill_run_id"}

Both answer 409 `not_connected` when the account has no active connection, and 400 for a malformed id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import azure.functions as func

from core.connections import valid_account_id
from core.http import Blueprint, error_response, json_response
from core.log import outcome
from core.storage import CONTACT_EVENTS, iso
from sync.backfill import start_backfill
from sync.context import SyncContext, sync_context
from sync.messages import ContactMessage
from sync.rules import REQUEUE_PENDING_SECONDS, requeue_pending

log = logging.getLogger(__name__)
bp = Blueprint()


@dataclass(frozen=True)
class RetryResult:
    requeued: int
    already_queued: int  # queued by an earlier retry and not yet settled by the worker
    backfill_run_id: str | None


def retry_failures(ctx: SyncContext, account_id: str, generation: str, now: datetime | None = None) -> RetryResult:
    """Re-queue every failed contact whose snapshot is stored; failures without one (an invalid contact
    from Wave's API, a failed backfill page) can only be re-read from Wave, so a backfill starts.

    Each failure is marked when queued (conditionally, so two retries at once queue it once) and skipped
    while the mark is pending: pressing Retry twice does not send a contact through Dataverse twice."""
    now = now or datetime.now(UTC)
    marked, stale_before = iso(now), iso(now - timedelta(seconds=REQUEUE_PENDING_SECONDS))
    requeued, pending, reread = 0, 0, False
    for failure in ctx.failures.all(account_id):
        if requeue_pending(failure.requeued_at, stale_before) or not ctx.failures.mark_requeued(failure, marked):
            pending += 1
            continue
        snapshot = ctx.snapshots.get(account_id, failure.contact_id)
        if snapshot is None:
            reread = True
            continue
        message = ContactMessage(account_id, failure.contact_id, snapshot.version, generation)
        try:
            ctx.queues.send(CONTACT_EVENTS, message.to_dict())
        except Exception:
            ctx.failures.unmark_requeued(failure, marked)  # not queued: the next retry must try again
            raise
        requeued += 1
    run_id = start_backfill(ctx.connections, ctx.queues, account_id) if reread else None
    return RetryResult(requeued, pending, run_id)


def _not_connected(account_id: str) -> func.HttpResponse:
    return error_response(409, "not_connected", f"account {account_id} has no active Dynamics connection")


def _bad_id() -> func.HttpResponse:
    return error_response(400, "invalid_account_id", "account_id must be 1-64 characters A-Z a-z 0-9 _ -",
                          field="account_id")


@bp.function_name("start_sync")
@bp.route(route="connections/{account_id}/sync", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def start_sync(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    if not valid_account_id(account_id):
        return _bad_id()
    ctx = sync_context()
    run_id = start_backfill(ctx.connections, ctx.queues, account_id)
    if run_id is None:
        return _not_connected(account_id)
    outcome(log, "sync", "backfill_started", account_id=account_id, run_id=run_id)
    return json_response({"run_id": run_id, "state": "running"}, 202)


@bp.function_name("retry_failures")
@bp.route(route="connections/{account_id}/failures/retry", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
def retry(req: func.HttpRequest) -> func.HttpResponse:
    account_id = req.route_params.get("account_id", "")
    if not valid_account_id(account_id):
        return _bad_id()
    ctx = sync_context()
    conn = ctx.connections.get(account_id)
    if conn is None or not conn.active or not conn.generation:
        return _not_connected(account_id)
    result = retry_failures(ctx, account_id, conn.generation)
    outcome(log, "sync", "failures_requeued", account_id=account_id, requeued=result.requeued,
            already_queued=result.already_queued, run_id=result.backfill_run_id)
    return json_response({"requeued": result.requeued, "already_queued": result.already_queued,
                          "backfill_run_id": result.backfill_run_id}, 202)
