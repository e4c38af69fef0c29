"""Retrying failed contacts (`POST /api/connections/{account_id}/failures/retry`, functions/connections.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.storage import CONTACT_EVENTS, iso
from sync.backfill import start_backfill
from sync.context import SyncContext
from sync.messages import ContactMessage
from sync.rules import REQUEUE_PENDING_SECONDS, requeue_pending


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
