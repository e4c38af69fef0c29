"""Upkeep of the sync tables, so that they do not grow forever and contact data leaves with a connection.

- `ownercache` keeps every looked-up email for its TTL; a row is only ignored once expired.
- A disconnect deletes the account's contact content: the stored snapshots (`contactsnapshots`), the
  failure records (whose reasons may quote a value) and the owner cache (team members' emails). What
  stays, `contactstate`, holds ids, versions and a content hash only, so that a reconnect finds the
  Dynamics rows it wrote instead of creating them again. The disconnect route deletes a bounded number
  of rows; the daily timer finishes for every account that is still disconnected (a large account, or a
  process that stopped half-way).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from core.connections import DISCONNECTED, ConnectionStore
from core.failures import TABLE as FAILURES
from core.storage import Tables, delete_expired, delete_rows, iso
from sync.owners import TABLE as OWNERS
from sync.state import SNAPSHOTS

EXPIRING = (OWNERS,)
# Per table, the rows of an account that a disconnect deletes: those written up to the moment given
# (a reconnect's own rows come later and stay); the owner cache is only a cache, all of it goes.
CONTACT_DATA = {
    SNAPSHOTS: "PartitionKey eq @pk and received_at le @before",
    FAILURES: "PartitionKey eq @pk and last_at le @before",
    OWNERS: "PartitionKey eq @pk",
}
# What the disconnect route deletes per table before answering; the daily timer does the rest.
DISCONNECT_ROWS = 1000


@dataclass(frozen=True)
class Forgotten:
    rows: dict[str, int]  # deleted per table
    complete: bool  # False: rows remain for the daily timer


def purge_expired_rows(tables: Tables, now: datetime | None = None) -> dict[str, int]:
    """Rows deleted per table."""
    cutoff = iso(now or datetime.now(UTC))
    return {name: delete_expired(tables(name), cutoff) for name in EXPIRING}


def forget_contact_data(tables: Tables, account_id: str, before: str, limit: int | None = None) -> Forgotten:
    """Delete the account's contact content written up to `before` (ISO UTC text), at most `limit` rows
    per table."""
    rows, complete = {}, True
    for name, query in CONTACT_DATA.items():
        rows[name], done = delete_rows(tables(name), query, {"pk": account_id, "before": before}, limit=limit)
        complete = complete and done
    return Forgotten(rows, complete)


def forget_disconnected(tables: Tables, connections: ConnectionStore, now: datetime | None = None) -> int:
    """Finish deleting the contact data of every account that is disconnected; returns the rows deleted.
    Only rows written before this run started go, so an account reconnecting meanwhile keeps its new ones."""
    before = iso(now or datetime.now(UTC))
    removed = 0
    for conn in connections.all():
        if conn.state == DISCONNECTED:
            removed += sum(forget_contact_data(tables, conn.account_id, before).rows.values())
    return removed
