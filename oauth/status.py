"""The connection status document (DESIGN §2.3) that Wave's admin page shows."""

from __future__ import annotations

from typing import Any

from core.connections import Connection, Counters
from core.failures import Failure


def connection_status(conn: Connection, counters: Counters, failures: list[Failure]) -> dict[str, Any]:
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
