"""The live lane's pending changes: what webhooks accepted and no drain has applied yet, per connection.

A webhook stores its snapshot as a pending row in the account's partition of `contactsnapshots`
(RowKey `~p~<contact id>~<version, 16 digits>`: insert-only, so no read is needed to keep the newest, and
the same version of a contact twice is a duplicate). A drain (sync/drain.py) reads an account's pending rows
in bulk, applies the newest of each contact and deletes what it applied. Contact ids never hold `~`, so
these rows never mix with the snapshot rows (RowKey = contact id) and sort after them.

Whether a drain is scheduled is one row per account in `contactdrains` (the drain marker): the webhook that
creates it sends the one drain message; the webhooks that find it send nothing. A drain that runs out of
pending rows deletes the marker and only then looks once more, so a change stored while it finished is
either seen by that last look or finds no marker and schedules a new drain. One drain at a time works on an
account (the lease, a row in `contactdrains` too); a marker older than STALE_MARKER_SECONDS (its webhook's
process died before sending) is found by the `resume_stalled_drains` timer, which sends the message.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableEntity, UpdateMode

from core.connections import utcnow
from core.storage import CONTACT_EVENTS, int64, iso, read_int
from core.tables import (
    TRANSACTION_SIZE,
    ChangesetFailed,
    Operation,
    etag_of,
    insert_row,
    row_exists,
    side_by_side,
    submit_changeset,
)

DRAINS = "contactdrains"
PREFIX = "~p~"
_END = "~p~~"  # after every pending row: '~' sorts after the characters of ids and digits
_CHUNK = 60_000  # as sync/state.py stores snapshots: binary chunks of at most 64 KiB per property
_MAX_CHUNKS = 15
_MARKER, _LEASE = "marker", "lease"
STALE_MARKER_SECONDS = 60


def pending_key(contact_id: str, version: int) -> str:
    return f"{PREFIX}{contact_id}~{version:016d}"


def snapshot_entity(account_id: str, row_key: str, contact: dict[str, Any], *, deleted: bool, event_id: str
                    ) -> dict[str, Any]:
    """A snapshot as a table row (the snapshot store's shape): its UTF-8 JSON in binary chunks."""
    data = json.dumps(contact, separators=(",", ":"), ensure_ascii=False).encode()
    chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
    if len(chunks) > _MAX_CHUNKS:
        raise ValueError("snapshot too large for a table row")
    return {"PartitionKey": account_id, "RowKey": row_key, "version": int64(contact["version"]),
            "deleted": deleted, "event_id": event_id, "received_at": utcnow(), "chunks": len(chunks),
            **{f"data{i}": chunk for i, chunk in enumerate(chunks)}}


@dataclass(frozen=True)
class PendingChange:
    account_id: str
    contact_id: str
    version: int
    deleted: bool
    contact: dict[str, Any]
    row_key: str
    event_id: str = ""


def _change(e: TableEntity) -> PendingChange:
    data = b"".join(bytes(e[f"data{i}"]) for i in range(int(e["chunks"])))
    contact_id = e["RowKey"][len(PREFIX):].rsplit("~", 1)[0]
    return PendingChange(e["PartitionKey"], contact_id, read_int(e["version"]) or 0, bool(e["deleted"]),
                         json.loads(data), e["RowKey"], str(e.get("event_id") or ""))


def newest_by_contact(changes: Iterable[PendingChange]) -> dict[str, PendingChange]:
    """The newest pending change of each contact (a delete wins over an update of the same version)."""
    newest: dict[str, PendingChange] = {}
    for c in changes:
        seen = newest.get(c.contact_id)
        if seen is None or (c.version, c.deleted) > (seen.version, seen.deleted):
            newest[c.contact_id] = c
    return newest


# A transaction's body may be 4 MiB, and a snapshot of up to 256 KiB grows by a third in base64:
# https://learn.microsoft.com/rest/api/storageservices/performing-entity-group-transactions
_TRANSACTION_BYTES = 3_000_000


def _by_size(groups: list[list[Operation]]) -> list[list[Operation]]:
    """Transactions of at most TRANSACTION_SIZE operations and _TRANSACTION_BYTES of snapshot data; each group
    (one contact's operations) stays in one transaction."""
    chunks: list[list[Operation]] = []
    size = 0
    for group in groups:
        n = sum(len(v) for op in group for v in op[1].values() if isinstance(v, bytes)) * 4 // 3 + 512 * len(group)
        if not chunks or len(chunks[-1]) + len(group) > TRANSACTION_SIZE or size + n > _TRANSACTION_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].extend(group)
        size += n
    return chunks


def pending_rows_of(table: TableClient, account_id: str, contact_id: str) -> list[PendingChange]:
    """The pending changes of one contact."""
    rows = table.query_entities("PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi",
                                parameters={"pk": account_id, "lo": f"{PREFIX}{contact_id}~",
                                            "hi": f"{PREFIX}{contact_id}~~"})
    return [_change(e) for e in rows]


def pending_versions(table: TableClient, account_id: str, contact_ids: Iterable[str]) -> dict[str, int]:
    """The newest pending version of each of the contacts that has one (one range query)."""
    ids = sorted(set(contact_ids))
    if not ids:
        return {}
    wanted = set(ids)
    rows = table.query_entities("PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi",
                                parameters={"pk": account_id, "lo": PREFIX + ids[0], "hi": PREFIX + ids[-1] + "~~"},
                                select=["RowKey", "version"])
    out: dict[str, int] = {}
    for e in rows:
        cid = e["RowKey"][len(PREFIX):].rsplit("~", 1)[0]
        if cid in wanted:
            out[cid] = max(out.get(cid, -1), read_int(e["version"]) or 0)
    return out


class PendingStore:
    def __init__(self, snapshots: TableClient, drains: TableClient) -> None:
        self.table, self.drains = snapshots, drains

    # -- the webhook's side --------------------------------------------------------------------------

    def add(self, account_id: str, contact: dict[str, Any], *, deleted: bool, event_id: str) -> bool:
        """Store the change as pending; False when this version of the contact is already pending."""
        entity = snapshot_entity(account_id, pending_key(contact["id"], int(contact["version"])), contact,
                                 deleted=deleted, event_id=event_id)
        return insert_row(self.table, entity)

    def remove(self, account_id: str, contact_id: str, version: int) -> None:
        """Undo `add` when no drain could be scheduled for it, so Wave's retry is not a duplicate."""
        with contextlib.suppress(ResourceNotFoundError):
            self.table.delete_entity(account_id, pending_key(contact_id, version))

    def mark(self, account_id: str) -> bool:
        """Note that a drain is scheduled; False when one already is (then nothing needs sending).

        Read first, since during a burst the marker nearly always exists: a point read costs the caller and
        storage less than an insert refused with 409. Reading instead of inserting keeps the guarantee: the
        caller stored its pending row before, so a marker seen here was deleted (if at all) after that row
        was there, and the drain deleting it looks at the pending rows once more afterwards."""
        if row_exists(self.drains, account_id, _MARKER):
            return False
        return insert_row(self.drains, {"PartitionKey": account_id, "RowKey": _MARKER, "at": utcnow()})

    def unmark(self, account_id: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self.drains.delete_entity(account_id, _MARKER)

    # -- the drain's side ----------------------------------------------------------------------------

    def read(self, account_id: str, limit: int) -> list[PendingChange]:
        """Up to `limit` pending changes of the account, in contact id order."""
        rows = self.table.query_entities("PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi",
                                         parameters={"pk": account_id, "lo": PREFIX, "hi": _END},
                                         results_per_page=min(limit, 1000))
        out: list[PendingChange] = []
        for e in rows:
            out.append(_change(e))
            if len(out) >= limit:
                break
        return out

    def versions(self, account_id: str, contact_ids: Iterable[str]) -> dict[str, int]:
        return pending_versions(self.table, account_id, contact_ids)

    def delete(self, account_id: str, changes: Iterable[PendingChange]) -> None:
        """Delete pending rows (a disconnected account's)."""
        self.settle(account_id, [], changes)

    def settle(self, account_id: str, keep: Iterable[PendingChange], changes: Iterable[PendingChange]) -> None:
        """After a pass: each change in `keep` becomes its contact's snapshot (`contactsnapshots`, RowKey = contact
        id; sync/worker.py and `failures/retry` read it there) and the pass's pending rows go, a contact's in
        the same transaction, so that a kept change is always in one of the two places (SnapshotStore.get reads
        both)."""
        by_contact: dict[str, list[Operation]] = {}
        for c in changes:
            by_contact.setdefault(c.contact_id, []).append(
                ("delete", {"PartitionKey": account_id, "RowKey": c.row_key}, None))
        for c in keep:
            by_contact.setdefault(c.contact_id, []).insert(0, ("upsert", snapshot_entity(
                account_id, c.contact_id, c.contact, deleted=c.deleted, event_id=c.event_id), None))

        def one(chunk: list[Operation]) -> None:
            try:
                submit_changeset(self.table, chunk)
            except ChangesetFailed:  # one of the rows is gone already (another drain): row by row
                for op, entity, _etag in chunk:
                    if op == "upsert":
                        self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)
                    else:
                        with contextlib.suppress(ResourceNotFoundError):
                            self.table.delete_entity(account_id, entity["RowKey"])

        side_by_side(one, _by_size(list(by_contact.values())))

    def claim(self, account_id: str, holder: str, seconds: float) -> bool:
        """Take (or renew) the account's drain lease for `seconds`; False while another drain holds it."""
        now = datetime.now(UTC)
        entity = {"PartitionKey": account_id, "RowKey": _LEASE, "holder": holder,
                  "until": iso(now + timedelta(seconds=seconds)), "at": utcnow()}
        try:
            old = self.drains.get_entity(account_id, _LEASE)
        except ResourceNotFoundError:
            try:
                self.drains.create_entity(entity)
                return True
            except ResourceExistsError:
                return False
        if old.get("holder") != holder and str(old.get("until") or "") > iso(now):
            return False
        try:
            self.drains.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag_of(old),
                                      match_condition=MatchConditions.IfNotModified)
            return True
        except (ResourceModifiedError, ResourceNotFoundError):
            return False

    def release(self, account_id: str, holder: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            old = self.drains.get_entity(account_id, _LEASE)
            if old.get("holder") == holder:
                with contextlib.suppress(ResourceModifiedError):
                    self.drains.delete_entity(account_id, _LEASE, etag=etag_of(old),
                                              match_condition=MatchConditions.IfNotModified)

    def stalled(self, older_than: str) -> list[str]:
        """Accounts whose drain marker is older than `older_than` (ISO UTC text): a drain message that was
        never sent, or a drain that died."""
        rows = self.drains.query_entities("RowKey eq @m and at le @t", parameters={"m": _MARKER, "t": older_than},
                                          select=["PartitionKey"])
        return [e["PartitionKey"] for e in rows]

    def touch(self, account_id: str) -> None:
        """Renew the marker's time (the stalled-drain timer sent a message for it)."""
        with contextlib.suppress(ResourceNotFoundError):
            self.drains.update_entity({"PartitionKey": account_id, "RowKey": _MARKER, "at": utcnow()},
                                      mode=UpdateMode.MERGE)


class _Sender(Protocol):
    def send(self, queue_name: str, message: dict[str, object], *, delay_seconds: int = 0) -> None: ...


def resume_stalled_drains(pending: PendingStore, queues: _Sender, now: datetime | None = None) -> int:
    """Send a drain message for every marker nobody renewed for STALE_MARKER_SECONDS; returns how many."""
    cutoff = iso((now or datetime.now(UTC)) - timedelta(seconds=STALE_MARKER_SECONDS))
    accounts = pending.stalled(cutoff)
    for account_id in accounts:
        pending.touch(account_id)
        queues.send(CONTACT_EVENTS, {"drain": True, "account_id": account_id, "attempt": 0})
    return len(accounts)
