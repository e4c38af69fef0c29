"""The connection status document (README "Connecting Dynamics") that Wave's admin page shows."""

from __future__ import annotations

from typing import Any

from core.connections import Connection, Counters
from core.failures import Failure
from oauth.pending import PendingSignIn


def connection_status(conn: Connection, counters: Counters, failures: list[Failure],
                      waiting: list[PendingSignIn] | None = None) -> dict[str, Any]:
    # A sign-in that finished at Microsoft and waits for Wave's confirm; the connection above is unchanged.
    pending = waiting[0] if waiting else None
    reason = {"category": conn.reason_category, "message": conn.reason} if conn.reason_category else None
    return {
        "account_id": conn.account_id,
        "state": conn.state,
        "instance_url": conn.instance_url,
        "connected_by": conn.connected_by,
        "connected_at": conn.connected_at,
        "initiated_by": conn.initiated_by,
        "auto_sync": conn.auto_sync,
        "delete_policy": conn.delete_policy,
        "reason": reason,
        "pending_sign_in": None if pending is None else {
            "instance_url": pending.instance_url, "signed_in_as": pending.connected_by,
            "initiated_by": pending.initiated_by, "expires_at": pending.expires_at},
        "disconnected_by": conn.disconnected_by,
        "disconnected_at": conn.disconnected_at,
        "backfill": {
            "state": conn.backfill.state,
            "pages": conn.backfill.pages,
            "contacts": conn.backfill.contacts,
            "started_at": conn.backfill.started_at,
            "finished_at": conn.backfill.finished_at,
        },
        "counters": {"synced": counters.synced, "deleted": counters.deleted, "failed": counters.failed,
                     "skipped": counters.skipped},
        "last_sync_at": counters.last_sync_at,
        "failures": [
            {"contact_id": f.contact_id, "category": f.category, "reason": f.reason, "attempts": f.attempts,
             "last_attempt_at": f.last_at}
            for f in failures
        ],
    }
