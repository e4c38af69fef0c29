"""Connection state: one row per Wave account in the `connections` table.

The row holds what the status endpoint shows (state, instance, who connected, backfill progress) and
the connection's generation: a new id on every successful connect. Queue messages carry the generation,
so work queued for an earlier connection becomes a no-op after a disconnect or reconnect.

Counters (synced, deleted, failed, skipped) live in a few shard rows per generation beside the main row,
so that many workers can count at once without fighting over one ETag.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableEntity, UpdateMode

from core.errors import ConcurrencyError, FieldError
from core.storage import iso
from core.tables import etag_of, update_row

TABLE = "connections"
MAIN_ROW = "connection"
COUNTER_SHARDS = 8
ACCOUNT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

PENDING, CONNECTED, NEEDS_REAUTH, DISCONNECTED = "pending", "connected", "needs_reauth", "disconnected"
STATES = (PENDING, CONNECTED, NEEDS_REAUTH, DISCONNECTED)
DELETE_POLICIES = ("delete", "deactivate", "ignore")
COUNTER_NAMES = ("synced", "deleted", "failed", "skipped")


def utcnow() -> str:
    return iso(datetime.now(UTC))


def valid_account_id(account_id: str) -> bool:
    return bool(ACCOUNT_ID_RE.fullmatch(account_id or ""))


def invalid_account_id() -> FieldError:
    """What every route answers (400) for an account id that cannot be one."""
    return FieldError("account_id must be 1-64 letters, digits, '_' or '-'", field="account_id",
                      code="invalid_account_id")


@dataclass
class Backfill:
    """The progress of the account's current backfill run (sync/backfill.py), kept on its connection row."""

    state: str = "idle"  # idle | running | done | failed
    run_id: str | None = None
    pages: int = 0
    contacts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    # Pages run side by side (sync/backfill.py): which are done, and how far the chain of cursors got.
    queued: int = 0  # the highest page whose successor is queued
    done_upto: int = 0  # every page up to this one is done ...
    done_after: str = ""  # ... and these later ones ("7,9")
    last_page: int = 0  # the page Wave answered without a next cursor (0: not read yet)

    def _after(self) -> set[int]:
        return {int(p) for p in self.done_after.split(",") if p}

    def page_done(self, page: int) -> bool:
        return page <= self.done_upto or page in self._after()

    def mark_done(self, page: int) -> bool:
        """Record `page` as done; False if it already was."""
        if self.page_done(page):
            return False
        after = self._after() | {page}
        while self.done_upto + 1 in after:
            self.done_upto += 1
            after.discard(self.done_upto)
        self.done_after = ",".join(str(p) for p in sorted(after))
        return True


@dataclass
class Counters:
    synced: int = 0
    deleted: int = 0
    failed: int = 0
    skipped: int = 0
    last_sync_at: str | None = None  # when any of them last moved


@dataclass
class Connection:
    account_id: str
    state: str = PENDING
    generation: str | None = None
    instance_url: str | None = None
    tenant_id: str | None = None
    plan: str | None = None
    initiated_by: str | None = None  # the Wave user who clicked Connect
    connected_by: str | None = None  # the Microsoft account that signed in
    connected_at: str | None = None
    dataverse_user_id: str | None = None
    auto_sync: bool = False
    delete_policy: str = "delete"
    secret_name: str | None = None
    reason_category: str | None = None  # why the connection is not healthy, for the status page
    reason: str | None = None
    disconnected_by: str | None = None
    disconnected_at: str | None = None
    token_refreshed_at: str | None = None
    backfill: Backfill = field(default_factory=Backfill)
    etag: str | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.state == CONNECTED

    def accepts(self, generation: str | None) -> bool:
        """True when work tagged with `generation` belongs to this live connection (live_connection)."""
        return generation is not None and live_connection(self, generation) is not None



@dataclass
class LiveConnection(Connection):
    """A connection that is live: connected, with a generation and an instance. Only `live_connection`
    makes one, so code holding one needs no further check (and a type checker sees that)."""

    generation: str = ""
    instance_url: str = ""


def live_connection(conn: Connection | None, generation: str | None = None) -> LiveConnection | None:
    """`conn` as a LiveConnection when it is connected (and, given `generation`, that is its generation:
    work queued for an earlier connection does not belong to this one); None otherwise."""
    if conn is None or conn.state != CONNECTED or not conn.generation or not conn.instance_url:
        return None
    if generation is not None and generation != conn.generation:
        return None
    if isinstance(conn, LiveConnection):
        return conn
    values = {f.name: getattr(conn, f.name) for f in fields(Connection)}
    return LiveConnection(**values)


_PLAIN = [f.name for f in fields(Connection) if f.name not in ("account_id", "backfill", "etag")]
_BACKFILL = [f.name for f in fields(Backfill)]


def _to_entity(conn: Connection) -> dict[str, Any]:
    entity: dict[str, Any] = {"PartitionKey": conn.account_id, "RowKey": MAIN_ROW}
    for name in _PLAIN:
        value = getattr(conn, name)
        if value is not None:
            entity[name] = value
    for name, value in asdict(conn.backfill).items():
        if value is not None:
            entity[f"backfill_{name}"] = value
    return entity


def _from_entity(entity: dict[str, Any]) -> Connection:
    known = {name: entity[name] for name in _PLAIN if name in entity}
    backfill = Backfill(**{n: entity[f"backfill_{n}"] for n in _BACKFILL if f"backfill_{n}" in entity})
    conn = Connection(account_id=entity["PartitionKey"], backfill=backfill, **known)
    conn.etag = etag_of(entity)
    return conn


class ConnectionStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def get(self, account_id: str) -> Connection | None:
        try:
            return _from_entity(self.table.get_entity(account_id, MAIN_ROW))
        except ResourceNotFoundError:
            return None

    def save(self, conn: Connection) -> Connection:
        """Insert a new row (etag None) or replace the row only if nobody changed it since it was read."""
        entity = _to_entity(conn)
        try:
            if conn.etag is None:
                meta = self.table.create_entity(entity)
            else:
                meta = self.table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=conn.etag, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise ConcurrencyError(f"connection {conn.account_id} changed concurrently") from exc
        conn.etag = meta.get("etag")
        return conn

    def update(self, account_id: str, mutate: Callable[[Connection], bool | None], attempts: int = 20
               ) -> Connection | None:
        """Read-modify-write with optimistic concurrency (core/tables.py update_row). `mutate` returns False
        to leave the row alone. Returns the row as it now is, or None when the account has none."""
        found: list[Connection] = []

        def change(old: TableEntity | None) -> dict[str, Any] | None:
            found.clear()
            if old is None:
                return None
            conn = _from_entity(old)
            found.append(conn)
            return None if mutate(conn) is False else _to_entity(conn)

        etag = update_row(self.table, account_id, MAIN_ROW, change, attempts=attempts, what="connection")
        if not found:
            return None
        if etag is not None:
            found[0].etag = etag
        return found[0]

    def all(self) -> Iterator[Connection]:
        for entity in self.table.query_entities("RowKey eq @rk", parameters={"rk": MAIN_ROW}):
            yield _from_entity(entity)

    # -- counters ------------------------------------------------------------------------------

    def add_counts(self, account_id: str, generation: str, *, synced: int = 0, deleted: int = 0,
                   failed: int = 0, skipped: int = 0) -> None:
        """Add to this generation's counters (one random shard row, retried on conflict)."""
        delta = {"synced": synced, "deleted": deleted, "failed": failed, "skipped": skipped}
        if not any(delta.values()):
            return
        row = f"counters-{generation}-{random.randrange(COUNTER_SHARDS)}"

        def add(old: TableEntity | None) -> dict[str, Any]:
            entity = dict(old) if old is not None else {"PartitionKey": account_id, "RowKey": row}
            for name, value in delta.items():
                entity[name] = int(entity.get(name, 0)) + value
            entity["updated_at"] = utcnow()
            return entity

        update_row(self.table, account_id, row, add, attempts=30, what="counters of")

    def counters(self, account_id: str, generation: str | None) -> Counters:
        total = Counters()
        if not generation:
            return total
        prefix = f"counters-{generation}-"
        for entity in self.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            parameters={"pk": account_id, "lo": prefix, "hi": prefix + "~"},
        ):
            for name in COUNTER_NAMES:
                setattr(total, name, getattr(total, name) + int(entity.get(name, 0)))
            updated = entity.get("updated_at")
            if updated and (total.last_sync_at is None or updated > total.last_sync_at):
                total.last_sync_at = updated
        return total
