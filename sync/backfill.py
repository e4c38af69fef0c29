"""Backfill: import every existing Wave contact of an account, one page per queue message.

`start_backfill` opens a run and enqueues its first page; the page worker (the backfill-pages queue
trigger) reads a page, writes it to Dataverse in bulk and enqueues the next cursor.
"""

from __future__ import annotations

import uuid

from core.connections import Connection, ConnectionStore, utcnow
from core.storage import BACKFILL_PAGES, QueueSender


def start_backfill(connections: ConnectionStore, queues: QueueSender, account_id: str) -> str | None:
    """Open a new backfill run for the live connection and enqueue its first page.

    Returns the run id, or None when the account has no active connection. A run already in progress
    is superseded: its remaining pages see a different run id and stop.
    """
    run_id = uuid.uuid4().hex
    started: dict[str, Connection] = {}

    def begin(conn: Connection) -> bool:
        started.clear()
        if not conn.active:
            return False
        conn.backfill.state, conn.backfill.run_id = "running", run_id
        conn.backfill.pages = conn.backfill.contacts = 0
        conn.backfill.started_at, conn.backfill.finished_at = utcnow(), None
        started["conn"] = conn
        return True

    connections.update(account_id, begin)
    conn = started.get("conn")
    if conn is None:
        return None
    queues.send(BACKFILL_PAGES, {"account_id": account_id, "generation": conn.generation, "run_id": run_id,
                                 "cursor": None, "page": 1})
    return run_id
