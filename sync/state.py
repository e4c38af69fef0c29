"""Per-contact state in Table Storage (DESIGN §3), partitioned by account:

- `contactsnapshots`: the newest snapshot Wave sent by webhook (queue messages carry only ids, so the
  worker reads the contact from here; an older snapshot never replaces a newer one).
- `contactstate`: what was last written to Dataverse (dynamics id, version, content hash, deleted,
  last result). Writes are conditional on the ETag read, so two writers of one contact notice each other.
  An account's states are split over STATE_BUCKETS partitions (`<account>~<n>`).
- `webhookevents`: event ids already accepted, with an expiry (dedupe of Wave's redeliveries).
"""

from __future__ import annotations

import json
import re
import uuid
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.data.tables import EdmType, EntityProperty, TableClient, UpdateMode

from core.connections import utcnow
from core.errors import AppError
from core.storage import int64, iso, read_int
from sync.rules import Applied, is_duplicate

SNAPSHOTS, STATE, EVENTS = "contactsnapshots", "contactstate", "webhookevents"
DEDUPE_DAYS = 7
# A table property holds 64 KiB and an entity 1 MiB: the snapshot's UTF-8 JSON (at most the 256 KiB
# webhook body) is stored as binary chunks, whose size does not depend on which characters it holds.
_CHUNK = 60_000
_MAX_CHUNKS = 15
# Table Storage allows at most 15 comparisons in one filter.
_FILTER_KEYS = 14
TRANSACTION_SIZE = 100
# An account's contact states are spread over this many partitions by a hash of the contact id. A
# backfill writes a whole account's states within minutes, and one partition is served by one server
# (with a target of about 2,000 entities/s); Azurite, which scans a partition on every insert, showed
# the cost of one partition per account first: a page's state writes got 8x slower by 20,000 rows.
STATE_BUCKETS = 8


class StateConflict(AppError):
    """Another writer changed the contact's state since it was read."""


def _etag(entity: Any) -> str | None:
    return getattr(entity, "metadata", {}).get("etag")


Query = tuple[str, dict[str, str]]  # a filter and its parameters


def _rowkey_queries(partition: str, keys: list[str]) -> list[Query]:
    """OR-ed RowKeys, a few per query (Table Storage answers these by scanning the partition)."""
    queries = []
    for start in range(0, len(keys), _FILTER_KEYS):
        chunk = keys[start:start + _FILTER_KEYS]
        params = {f"k{i}": k for i, k in enumerate(chunk)}
        clause = " or ".join(f"RowKey eq @k{i}" for i in range(len(chunk)))
        # (the SDK reads a parameter name up to the next space, so none may touch the parenthesis)
        queries.append((f"PartitionKey eq @pk and ( {clause} )", {"pk": partition, **params}))
    return queries


def _range_query(partition: str, keys: list[str]) -> Query:
    """Everything from the smallest key to the largest: only for keys that are (nearly) adjacent in
    RowKey order, such as one page of a listing sorted by id, or scattered keys would read the partition."""
    return ("PartitionKey eq @pk and RowKey ge @lo and RowKey le @hi",
            {"pk": partition, "lo": min(keys), "hi": max(keys)})


# A page's Table requests run side by side: each mostly waits on the storage service, so a few threads
# overlap them.
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tables")


def query_keys(table: TableClient, keys_by_partition: dict[str, Iterable[str]], *, adjacent: bool = False,
               select: list[str] | None = None) -> dict[str, Any]:
    """Entities by RowKey, from one or more partitions, the queries side by side.

    `adjacent`: each partition's keys are neighbours in RowKey order, so one range query per partition
    reads them (an OR of many RowKeys would make Table Storage scan the partition)."""
    wanted: set[str] = set()
    queries: list[Query] = []
    for partition, keys in keys_by_partition.items():
        ordered = sorted(set(keys))
        if not ordered:
            continue
        wanted.update(ordered)
        queries += [_range_query(partition, ordered)] if adjacent else _rowkey_queries(partition, ordered)

    def one(query: Query) -> list[Any]:
        return list(table.query_entities(query[0], parameters=query[1], select=select))

    results = [one(q) for q in queries] if len(queries) <= 1 else list(_POOL.map(one, queries))
    return {entity["RowKey"]: entity for rows in results for entity in rows if entity["RowKey"] in wanted}


class _ChangesetFailed(Exception):
    """A transaction was refused as a whole (one of its rows conflicted, or the service said no)."""


def _json_entity(entity: dict[str, Any]) -> str:
    """Strings, booleans, plain ints as Edm.Int32 and `int64` properties as Edm.Int64 (a string with its
    type annotation), as the SDK writes them; a plain int beyond 32 bits is refused, as the SDK does."""
    out: dict[str, Any] = {}
    for name, value in entity.items():
        if isinstance(value, EntityProperty) and value.edm_type == EdmType.INT64:
            out[f"{name}@odata.type"], out[name] = "Edm.Int64", str(int(value.value))
            continue
        if not isinstance(value, (str, bool, int)) or (
                isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31):
            raise TypeError(f"{name}: {value!r} is not a string, a boolean, a 32-bit int or an int64()")
        out[name] = value
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _key(value: str) -> str:
    return quote(value.replace("'", "''"), safe="")


def submit_changeset(table: TableClient, ops: list[tuple[str, dict[str, Any], str | None]]) -> None:
    """One entity-group transaction of ("create" | "replace", entity, etag) operations on one partition.

    What `TableClient.submit_transaction` sends, built here as plain text: the SDK builds the multipart
    body with the email package and runs its policies per part, about 1 ms of CPU per entity, which made
    writing a backfill page's states cost more than everything else on the page. The request still goes
    through the client's own pipeline (authentication, retries). Raises _ChangesetFailed when the service
    refuses the transaction (nothing of it was applied).
    """
    base = table.url.split("?", 1)[0].rstrip("/")
    changeset, batch = f"changeset_{uuid.uuid4()}", f"batch_{uuid.uuid4()}"
    parts = [f"--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"]
    for op, entity, etag in ops:
        if op == "create":
            line = f"POST {base}/{table.table_name} HTTP/1.1\r\n"
        else:
            line = (f"PUT {base}/{table.table_name}(PartitionKey='{_key(entity['PartitionKey'])}',"
                    f"RowKey='{_key(entity['RowKey'])}') HTTP/1.1\r\nIf-Match: {etag or '*'}\r\n")
        parts.append(f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                     f"\r\n{line}Content-Type: application/json\r\nAccept: application/json;odata=minimalmetadata\r\n"
                     f"Prefer: return-no-content\r\nDataServiceVersion: 3.0\r\n\r\n{_json_entity(entity)}\r\n")
    parts.append(f"--{changeset}--\r\n--{batch}--\r\n")
    request = HttpRequest("POST", f"{base}/$batch", content="".join(parts).encode(), headers={
        "Content-Type": f"multipart/mixed; boundary={batch}", "Accept": "application/json",
        "DataServiceVersion": "3.0", "MaxDataServiceVersion": "3.0;NetFx", "x-ms-version": table.api_version})
    # the client's own pipeline (auth, retries); streamed, as the SDK does, so nothing decodes the multipart
    response = table._client.send_request(request, stream=True)
    if response.status_code != 202:
        raise _ChangesetFailed(f"transaction answered {response.status_code}")
    statuses = [int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3})", response.read(), flags=re.M)]
    if len(statuses) != len(ops) or any(not 200 <= code < 300 for code in statuses):
        raise _ChangesetFailed(f"transaction refused: {statuses[:3]}")


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
        for _ in range(20):
            try:
                old = self.table.get_entity(account_id, contact["id"])
            except ResourceNotFoundError:
                try:
                    self.table.create_entity(entity)
                    return True
                except ResourceExistsError:
                    continue
            if (read_int(old["version"]) or 0) >= int(contact["version"]):
                return False
            try:
                self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=_etag(old),
                                         match_condition=MatchConditions.IfNotModified)
                return True
            except ResourceModifiedError:
                continue
        raise StateConflict(f"snapshot {account_id}/{contact['id']} kept changing")

    def get(self, account_id: str, contact_id: str) -> Snapshot | None:
        try:
            return self._from_entity(self.table.get_entity(account_id, contact_id))
        except ResourceNotFoundError:
            return None

    def versions(self, account_id: str, contact_ids: Iterable[str], *, adjacent: bool = False) -> dict[str, int]:
        """Stored snapshot versions by contact id (`adjacent`: the ids are neighbours in id order)."""
        rows = query_keys(self.table, {account_id: contact_ids}, adjacent=adjacent, select=["RowKey", "version"])
        return {key: read_int(row["version"]) or 0 for key, row in rows.items()}

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
                        e.get("last_result"), e.get("updated_at"), e.get("warning"), _etag(e))


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
        """Create (etag None) or replace only if unchanged since read; StateConflict otherwise."""
        state.updated_at = utcnow()
        try:
            if state.etag is None:
                meta = self.table.create_entity(state.entity())
            else:
                meta = self.table.update_entity(state.entity(), mode=UpdateMode.REPLACE, etag=state.etag,
                                                match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise StateConflict(f"state of {state.account_id}/{state.contact_id} changed concurrently") from exc
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
            ops: list[tuple[str, dict[str, Any], str | None]] = []
            for s in chunk:
                s.updated_at = now
                ops.append(("create", s.entity(), None) if s.etag is None else ("replace", s.entity(), s.etag))
            try:
                submit_changeset(self.table, ops)
                return []
            except _ChangesetFailed:
                conflicts = []
                for s in chunk:
                    try:
                        self.save(s)
                    except StateConflict:
                        conflicts.append(s)
                return conflicts

        by_partition: dict[str, list[ContactState]] = {}
        for state in states:
            by_partition.setdefault(state_partition(state.account_id, state.contact_id), []).append(state)
        chunks = [group[start:start + TRANSACTION_SIZE] for group in by_partition.values()
                  for start in range(0, len(group), TRANSACTION_SIZE)]
        if len(chunks) <= 1:
            return one(chunks[0]) if chunks else []
        return [s for conflicts in _POOL.map(one, chunks) for s in conflicts]


# -- webhook event dedupe -------------------------------------------------------------------------

class EventLog:
    def __init__(self, table: TableClient, days: int = DEDUPE_DAYS) -> None:
        self.table, self.days = table, days

    def first_time(self, account_id: str, event_id: str) -> bool:
        """Record the event id; False when it was already recorded and has not expired."""
        now = datetime.now(UTC)
        entity = {"PartitionKey": account_id, "RowKey": event_id, "received_at": iso(now),
                  "expires_at": iso(now + timedelta(days=self.days))}
        try:
            self.table.create_entity(entity)
            return True
        except ResourceExistsError:
            pass
        try:
            old = self.table.get_entity(account_id, event_id)
        except ResourceNotFoundError:
            return self.first_time(account_id, event_id)
        if is_duplicate(old.get("expires_at"), iso(now)):
            return False
        try:  # expired: this delivery counts as new, unless a concurrent one just claimed it
            self.table.update_entity(entity, mode=UpdateMode.REPLACE, etag=_etag(old),
                                     match_condition=MatchConditions.IfNotModified)
            return True
        except ResourceModifiedError:
            return False
        except ResourceNotFoundError:  # the daily upkeep deleted the expired row meanwhile
            return self.first_time(account_id, event_id)

    def forget(self, account_id: str, event_id: str) -> None:
        """Undo `first_time` when the event could not be queued, so Wave's retry is not a duplicate."""
        self.table.delete_entity(account_id, event_id)
