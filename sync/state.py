"""Per-contact state in Table Storage, partitioned by account:

- `contactsnapshots`: the newest snapshot Wave sent by webhook (queue messages carry only ids, so the
  worker reads the contact from here; an older snapshot never replaces a newer one).
- `contactstate`: what was last written to Dataverse (dynamics id, version, content hash, deleted,
  last result). Writes are conditional on the ETag read, so two writers of one contact notice each other.
  An account's states are split over STATE_BUCKETS partitions (`<account>~<n>`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableEntity, UpdateMode

from core.connections import utcnow
from core.errors import ConcurrencyError
from core.storage import int64, read_int
from core.tables import (
    ChangesetFailed,
    Operation,
    etag_of,
    query_keys,
    side_by_side,
    submit_changeset,
    transaction_chunks,
    update_row,
)
from sync.pending import pending_rows_of, pending_versions
from sync.rules import Applied

SNAPSHOTS, STATE = "contactsnapshots", "contactstate"
# A table property holds 64 KiB and an entity 1 MiB: the snapshot's UTF-8 JSON (at most the 256 KiB
# webhook body) is stored as binary chunks, whose size does not depend on which characters it holds.
_CHUNK = 60_000
_MAX_CHUNKS = 15
# An account's contact states are spread over this many partitions by a hash of the contact id. A
# backfill writes a whole account's states within minutes, and one partition is served by one server
# (with a target of about 2,000 entities/s); Azurite, which scans a partition on every insert, showed
# the cost of one partition per account first: a page's state writes got 8x slower by 20,000 rows.
STATE_BUCKETS = 8


# -- snapshots ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    account_id: str
    contact_id: str
    version: int
    deleted: bool
    contact: dict[str, Any]


class SnapshotStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def put_if_newer(self, account_id: str, contact: dict[str, Any], *, deleted: bool, event_id: str) -> bool:
        """Store the snapshot unless one with an equal or newer version is stored. True if stored."""
        data = json.dumps(contact, separators=(",", ":"), ensure_ascii=False).encode()
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        if len(chunks) > _MAX_CHUNKS:
            raise ValueError("snapshot too large for a table row")
        entity = {"PartitionKey": account_id, "RowKey": contact["id"], "version": int64(contact["version"]),
                  "deleted": deleted, "event_id": event_id, "received_at": utcnow(), "chunks": len(chunks),
                  **{f"data{i}": chunk for i, chunk in enumerate(chunks)}}

        def newer(old: TableEntity | None) -> dict[str, Any] | None:
            stored = read_int(old["version"]) or 0 if old is not None else None
            return None if stored is not None and stored >= int(contact["version"]) else entity

        return update_row(self.table, account_id, contact["id"], newer, what="snapshot") is not None

    def get(self, account_id: str, contact_id: str) -> Snapshot | None:
        """The contact's newest snapshot: the stored one, or a newer change still pending (sync/pending.py)."""
        try:
            found: Snapshot | None = self._from_entity(self.table.get_entity(account_id, contact_id))
        except ResourceNotFoundError:
            found = None
        for change in pending_rows_of(self.table, account_id, contact_id):
            if found is None or (change.version, change.deleted) > (found.version, found.deleted):
                found = Snapshot(account_id, contact_id, change.version, change.deleted, change.contact)
        return found

    def versions(self, account_id: str, contact_ids: Iterable[str], *, adjacent: bool = False) -> dict[str, int]:
        """Stored and pending snapshot versions by contact id (`adjacent`: the ids are neighbours in id order)."""
        ids = list(contact_ids)
        rows = query_keys(self.table, {account_id: ids}, adjacent=adjacent, select=["RowKey", "version"])
        stored = {key: read_int(row["version"]) or 0 for key, row in rows.items()}
        # and the changes webhooks accepted that no drain has applied yet (sync/pending.py)
        for key, version in pending_versions(self.table, account_id, ids).items():
            stored[key] = max(stored.get(key, version), version)
        return stored

    @staticmethod
    def _from_entity(e: Any) -> Snapshot:
        data = b"".join(bytes(e[f"data{i}"]) for i in range(int(e["chunks"])))
        return Snapshot(e["PartitionKey"], e["RowKey"], read_int(e["version"]) or 0, bool(e["deleted"]),
                        json.loads(data))


# -- contact sync state ---------------------------------------------------------------------------

@dataclass
class ContactState:
    account_id: str
    contact_id: str
    dynamics_id: str | None = None
    version: int | None = None
    content_hash: str | None = None
    deleted: bool = False
    last_result: str | None = None  # synced | deleted | skipped | failed:<category>
    updated_at: str | None = None
    # why the contact was written without something it asked for (e.g. an owner email that could not be
    # looked up); never the value itself, since states outlive a disconnect
    warning: str | None = None
    etag: str | None = field(default=None, compare=False)

    @property
    def applied(self) -> Applied:
        return Applied(self.version, self.deleted, self.content_hash, self.dynamics_id)

    def entity(self) -> dict[str, Any]:
        e: dict[str, Any] = {"PartitionKey": state_partition(self.account_id, self.contact_id),
                             "RowKey": self.contact_id, "deleted": self.deleted,
                             "updated_at": self.updated_at or utcnow()}
        for name in ("dynamics_id", "content_hash", "last_result", "warning"):
            value = getattr(self, name)
            if value is not None:
                e[name] = value
        if self.version is not None:
            e["version"] = int64(self.version)
        return e


def state_partition(account_id: str, contact_id: str) -> str:
    """The partition of a contact's state: the account's, split into STATE_BUCKETS by a hash of the id."""
    return f"{account_id}~{zlib.crc32(contact_id.encode()) % STATE_BUCKETS}"


def _state_from(e: Any) -> ContactState:
    return ContactState(e["PartitionKey"].rsplit("~", 1)[0], e["RowKey"], e.get("dynamics_id"),
                        read_int(e.get("version")), e.get("content_hash"), bool(e.get("deleted", False)),
                        e.get("last_result"), e.get("updated_at"), e.get("warning"), etag_of(e))


class ContactStateStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table

    def get(self, account_id: str, contact_id: str) -> ContactState | None:
        try:
            return _state_from(self.table.get_entity(state_partition(account_id, contact_id), contact_id))
        except ResourceNotFoundError:
            return None

    def get_many(self, account_id: str, contact_ids: Iterable[str], *, adjacent: bool = False
                 ) -> dict[str, ContactState]:
        """States by contact id (`adjacent`: the ids are neighbours in id order, one range query per bucket)."""
        by_partition: dict[str, list[str]] = {}
        for cid in contact_ids:
            by_partition.setdefault(state_partition(account_id, cid), []).append(cid)
        return {k: _state_from(e) for k, e in query_keys(self.table, by_partition, adjacent=adjacent).items()}

    def save(self, state: ContactState) -> ContactState:
        """Create (etag None) or replace only if unchanged since read; ConcurrencyError otherwise."""
        state.updated_at = utcnow()
        try:
            if state.etag is None:
                meta = self.table.create_entity(state.entity())
            else:
                meta = self.table.update_entity(state.entity(), mode=UpdateMode.REPLACE, etag=state.etag,
                                                match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise ConcurrencyError(f"state of {state.account_id}/{state.contact_id} changed concurrently") from exc
        state.etag = meta.get("etag")
        return state

    def save_many(self, states: list[ContactState]) -> list[ContactState]:
        """Save states in transactions of up to 100 (one partition each), sent side by side; returns the
        ones that conflicted.

        A transaction is all or nothing, so a chunk that hits a conflict is retried row by row to find
        which contacts another writer touched.
        """
        def one(chunk: list[ContactState]) -> list[ContactState]:
            now = utcnow()
            ops: list[Operation] = []
            for s in chunk:
                s.updated_at = now
                ops.append(("create", s.entity(), None) if s.etag is None else ("replace", s.entity(), s.etag))
            try:
                submit_changeset(self.table, ops)
                return []
            except ChangesetFailed:
                conflicts = []
                for s in chunk:
                    try:
                        self.save(s)
                    except ConcurrencyError:
                        conflicts.append(s)
                return conflicts

        by_partition: dict[str, list[ContactState]] = {}
        for state in states:
            by_partition.setdefault(state_partition(state.account_id, state.contact_id), []).append(state)
        return [s for conflicts in side_by_side(one, transaction_chunks(by_partition.values())) for s in conflicts]
